"""Deployment helpers: fail-fast checks of live sources, sources prepared for predict, torch-free ONNX.

What Ultralytics 8.4.190 already does, and what this module adds (see docs/deployment.md):

- Webcam index (`source=0`): `LoadStreams` raises `ConnectionError("... Failed to open 0")` at once when no camera
  has that index. `check_webcam` says the same earlier and names the video devices that do exist.
- Stream URL (rtsp://, rtmp://, tcp://, http(s):// without a media suffix): OpenCV's FFmpeg backend waits up to its
  built-in 30 s per open and per read for a host that accepts the connection but sends nothing (an http URL first
  costs Ultralytics' own 3 s probe), and Ultralytics re-opens a stream that stops answering, 30 s more. `check_stream`
  opens the stream with a short timeout and needs one decoded frame, or raises `ConnectionError`; `prepare_source`
  also sets FFmpeg's socket timeout (`OPENCV_FFMPEG_CAPTURE_OPTIONS="timeout;<us>"`, unless the user set it) so the
  captures Ultralytics opens afterwards give up as quickly.
- Video files: `prepare_source` hands local videos to `tood_yolo.data.video.video_loader`, whose captures skip (and
  log) frames FFmpeg cannot decode instead of ending the video there; Ultralytics' predictor accepts a loader object as
  `source`.
- `detect_onnx` and the functions before it run an exported TOOD ONNX model with onnxruntime, numpy and OpenCV
  alone: no torch, no Ultralytics. docs/deployment.md carries that section verbatim (a test keeps them equal).

This module imports neither torch nor Ultralytics at import time: it can be loaded by path where torch is absent.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time
import urllib.parse
from pathlib import Path

import cv2
import numpy as np

LOGGER = logging.getLogger("ultralytics")  # Ultralytics' own logger, without importing Ultralytics (and torch)
STREAM_TIMEOUT = float(os.environ.get("TOOD_STREAM_TIMEOUT", 10))  # seconds a live source gets to deliver a frame
RATE_LOG_S = 10.0  # seconds between frame-rate lines while a long video or a live stream runs
FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


# --- onnxruntime-only inference (verbatim in docs/deployment.md; needs numpy, opencv-python, onnxruntime) ---
def letterbox(image, size=640, color=114):
    """Resize a BGR image to fit a size x size square and pad it, exactly as Ultralytics' LetterBox.

    Returns the NCHW float32 RGB input in [0, 1] and (gain_x, gain_y, pad_x, pad_y) to map boxes back.
    """
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - nw) / 2, (size - nh) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(color,) * 3)
    x = np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255
    return x, (nw / w, nh / h, left, top)


def nms(boxes, scores, iou=0.7):
    """Greedy NMS on (N, 4) xyxy boxes: indices kept, best first (a box goes when its IoU with a kept one > iou)."""
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lt, rb = np.maximum(boxes[i, :2], boxes[rest, :2]), np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.clip(rb - lt, 0, None).prod(1)
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.array(keep, dtype=np.int64)


def postprocess(output, shape, ratio_pad, conf=0.25, iou=0.7, max_det=300):
    """Decode one image's (4 + nc, A) output (xywh pixels, class scores) to boxes in the original image.

    Best class per anchor, score > conf, class-wise NMS (boxes offset by class, as Ultralytics), at most max_det.
    Returns xyxy boxes (N, 4), scores (N,) and class ids (N,), best first.
    """
    scores_all = output[4:].T  # (A, nc)
    cls = scores_all.argmax(1)
    scores = scores_all[np.arange(len(cls)), cls]
    keep = scores > conf
    xywh, scores, cls = output[:4].T[keep], scores[keep], cls[keep]
    boxes = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
    i = nms(boxes + cls[:, None] * 7680.0, scores, iou)[:max_det]
    boxes, scores, cls = boxes[i], scores[i], cls[i]
    gain_x, gain_y, pad_x, pad_y = ratio_pad
    boxes = (boxes - [pad_x, pad_y, pad_x, pad_y]) / [gain_x, gain_y, gain_x, gain_y]
    boxes = boxes.clip(0, [shape[1], shape[0], shape[1], shape[0]])
    return boxes.astype(np.float32), scores, cls


def detect_onnx(session, image, imgsz=640, conf=0.25, iou=0.7, max_det=300):
    """Run an onnxruntime InferenceSession of an exported TOOD (or YOLO) detector on one BGR image."""
    x, ratio_pad = letterbox(image, imgsz)
    output = session.run(None, {session.get_inputs()[0].name: x})[0][0]  # (4 + nc, A)
    return postprocess(output, image.shape[:2], ratio_pad, conf, iou, max_det)


# --- end of the onnxruntime-only section ---


def _video_devices() -> list[str]:
    return sorted(glob.glob("/dev/video*"))


def is_webcam(source) -> bool:
    """Whether Ultralytics reads `source` as a local camera index (an int or a numeric string)."""
    return isinstance(source, int) and not isinstance(source, bool) or isinstance(source, str) and source.isnumeric()


def is_stream_url(source) -> bool:
    """Whether Ultralytics reads `source` as a network stream: rtsp/rtmp/tcp, or http(s) without a media suffix.

    (An http(s) URL ending in an image or video suffix is downloaded as a file instead.)
    """
    if not isinstance(source, str):
        return False
    s = source.lower()
    if s.startswith(("rtsp://", "rtmp://", "tcp://")):
        return True
    if s.startswith(("http://", "https://")):
        suffix = urllib.parse.urlsplit(s).path.rpartition(".")[-1]
        return suffix not in _media_formats()
    return False


def _media_formats() -> set[str]:
    try:  # ultralytics.data.utils pulls in torch: only where it is already loaded
        from ultralytics.data.utils import IMG_FORMATS, VID_FORMATS

        return set(IMG_FORMATS) | set(VID_FORMATS)
    except ImportError:
        return {"bmp", "jpg", "jpeg", "png", "tif", "tiff", "webp", "mp4", "avi", "mov", "mkv", "webm", "mpg", "ts"}


def set_ffmpeg_timeout(timeout: float = STREAM_TIMEOUT) -> None:
    """Make every later FFmpeg capture of a network source give up after `timeout` s without data (default 30 s).

    Sets FFmpeg's socket timeout through OpenCV's `OPENCV_FFMPEG_CAPTURE_OPTIONS`, unless that variable is already set
    (the user's own options win). It also covers the captures Ultralytics' `LoadStreams` opens and re-opens.
    """
    os.environ.setdefault(FFMPEG_OPTIONS_ENV, f"timeout;{int(timeout * 1e6)}")


def check_webcam(index: int | str) -> None:
    """Raise `ConnectionError` at once if no camera with this index opens and gives a frame."""
    index = int(index)
    cap = cv2.VideoCapture(index)
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        devices = _video_devices() if sys.platform.startswith("linux") else []
        found = f"video devices here: {', '.join(devices)}" if devices else "no video device found"
        if not sys.platform.startswith("linux"):
            found = "check that the camera is connected and not used by another program"
        raise ConnectionError(f"Webcam source={index} could not be opened or gave no frame ({found}).")


def check_stream(url: str, timeout: float = STREAM_TIMEOUT) -> tuple[int, int]:
    """Open a network stream with a `timeout` (s) and read one frame; return its (width, height).

    Raises:
        ConnectionError: the stream did not open, or gave no frame within the timeout.
    """
    t0 = time.perf_counter()
    ms = int(timeout * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
    finally:
        cap.release()
    dt = time.perf_counter() - t0
    if not ok or frame is None:
        raise ConnectionError(
            f"Stream {url} gave no video frame within {timeout:g} s (failed after {dt:.1f} s): the host is "
            f"unreachable, refused the connection, or sent no decodable video. Check the URL, the network and the "
            f"camera; set TOOD_STREAM_TIMEOUT=<seconds> for a slower source."
        )
    return frame.shape[1], frame.shape[0]


def _has_video(source) -> bool:
    """Whether a local file/folder/glob/list source names at least one video file."""
    from ultralytics.data.utils import VID_FORMATS

    items = source if isinstance(source, (list, tuple)) else [source]
    files = []
    for p in map(str, items):
        if "*" in p:
            files += glob.glob(p, recursive=True)
        elif os.path.isdir(p):
            files += glob.glob(os.path.join(glob.escape(p), "*.*"))
        else:
            files.append(p)
    return any(f.rpartition(".")[-1].lower() in VID_FORMATS for f in files)


def prepare_source(source, batch: int = 1, vid_stride: int = 1, channels: int = 3, timeout: float = STREAM_TIMEOUT):
    """Check a predict/track `source` before Ultralytics opens it; return what to pass on as `source`.

    - a webcam index: `check_webcam` (a clear `ConnectionError` at once when it does not open);
    - a stream URL, or a `.streams` file of them: `check_stream` on each (`ConnectionError` within `timeout` s), and
      the FFmpeg socket timeout for the captures Ultralytics opens next (`set_ffmpeg_timeout`);
    - local videos (a file, folder, glob or list with a video in it): `tood_yolo.data.video.video_loader`, which
      skips corrupt frames;
    - anything else (images, arrays, `screen`, ...) is returned unchanged.
    """
    if isinstance(source, Path):
        source = str(source)
    if is_webcam(source):
        check_webcam(source)
        return source
    if isinstance(source, str) and source.lower().endswith(".streams") and os.path.isfile(source):
        urls = Path(source).read_text().split()
    elif is_stream_url(source):
        urls = [source]
    else:
        urls = []
    if urls:
        set_ffmpeg_timeout(timeout)
        for url in urls:
            check_webcam(url) if is_webcam(url) else check_stream(url, timeout)
        return source
    local = isinstance(source, str) and not source.lower().startswith(("http://", "https://", "screen")) or (
        isinstance(source, (list, tuple)) and all(isinstance(s, (str, Path)) for s in source)
    )
    if local and _has_video(source):
        from ..data.video import video_loader  # Ultralytics and torch: not at import (see the module docstring)

        return video_loader(source, batch=batch, vid_stride=vid_stride, channels=channels)
    return source


def run(model, source, mode: str = "predict", **kwargs):
    """`model.predict` or `model.track` on a `prepare_source`d source, as a generator of Results (stream=True).

    `batch` and `vid_stride` in kwargs also reach the loader; `stream` is always True (videos are not kept in memory).
    """
    if mode not in {"predict", "track"}:
        raise ValueError(f"mode must be 'predict' or 'track', got {mode!r}")
    kwargs.pop("stream", None)
    src = prepare_source(source, batch=kwargs.get("batch") or 1, vid_stride=kwargs.get("vid_stride") or 1)
    rate = FrameRate()
    try:
        for result in getattr(model, mode)(source=src, stream=True, **kwargs):
            rate.tick()
            yield result
    finally:
        rate.log(final=True)


class FrameRate:
    """End-to-end frames per second of a prediction stream (read, pre-process, inference, NMS, saving, and whatever
    the consumer does between frames), logged every `RATE_LOG_S` seconds and when the stream ends."""

    def __init__(self):
        self.frames, self.start = 0, time.perf_counter()
        self.last_log = self.start

    def tick(self) -> None:
        """One more frame; logs the rate so far when `RATE_LOG_S` has passed since the last line."""
        self.frames += 1
        if time.perf_counter() - self.last_log >= RATE_LOG_S:
            self.log()

    def log(self, final: bool = False) -> None:
        now = time.perf_counter()
        self.last_log, elapsed = now, now - self.start
        if self.frames:
            done = "done: " if final else ""
            LOGGER.info(f"{done}{self.frames} frame(s) in {elapsed:.1f} s, {self.frames / elapsed:.1f} frames/s")
