"""Deployment: predict/track on every source kind that exists here, live-source failures, exports, torch-free ONNX.

One tood-n checkpoint is made per module: the untrained backbone and FPN with a T-head fitted (a few seconds) to
find one orange rectangle on a noisy grey background. Its detections are therefore real and testable (a moving
object must be found and keep its track ID), and PyTorch and every export share its weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS

from tood_yolo.tools import deploy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMGSZ = 128  # TOOD's largest stride (P7) is 128: the smallest image size
W, H = 160, 128  # synthetic frame size
COLOR = (0, 165, 255)  # BGR orange


def scene(seed: int, box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey frame with one orange rectangle (random, or `box` xyxy): the image and its xyxy box."""
    rng = np.random.default_rng(seed)
    im = (60 + rng.integers(0, 20, (H, W, 3))).astype(np.uint8)
    if box is None:
        w, h = rng.integers(28, 56, 2)
        x, y = rng.integers(0, W - w), rng.integers(0, H - h)
        box = (x, y, x + w, y + h)
    x1, y1, x2, y2 = map(int, box)
    cv2.rectangle(im, (x1, y1), (x2 - 1, y2 - 1), COLOR, -1)
    return im, np.array([x1, y1, x2, y2], np.float32)


def moving(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame i (< 20) of a rectangle moving right by 5 px a frame."""
    return scene(1000 + i, (10 + 5 * i, 40, 50 + 5 * i, 80))


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N, 4) with one box b (4,)."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    inter = np.clip(np.minimum(a[:, 2:], b[2:]) - np.maximum(a[:, :2], b[:2]), 0, None).prod(1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(1) + (b[2:] - b[:2]).prod() - inter)


def write_video(path: Path, frames: list[np.ndarray], fourcc: str = "MJPG", fps: int = 10) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames[0].shape[1], frames[0].shape[0]))
    for f in frames:
        writer.write(f)
    writer.release()
    return path


@pytest.fixture(autouse=True)
def restore_ffmpeg_options(monkeypatch):
    """`prepare_source` sets OpenCV's FFmpeg options for streams process-wide: undo that after each test."""
    monkeypatch.setenv(deploy.FFMPEG_OPTIONS_ENV, "")
    monkeypatch.delenv(deploy.FFMPEG_OPTIONS_ENV)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 spinning threads run 10-50x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env() -> dict:
    return {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "true",
            "OMP_NUM_THREADS": "1"}


def fit_rectangle_detector(path: Path, steps: int = 120, negative_weight: float = 0.5) -> Path:
    """Save tood-n with its T-head fitted to the orange rectangle (backbone/FPN and inter convs stay at their init).

    A few seconds: backbone and FPN features of 64 letterboxed scenes are computed once, then the head (less its
    inter convs) is fitted by Adam on a simple loss: BCE of the aligned class-0 score (1 at anchors in the central
    half of the box on P3/P4, else 0), other classes pushed to 0 there, and L1 of the aligned boxes at those anchors.
    """
    from ultralytics.utils.tal import make_anchors

    torch.manual_seed(0)
    model = YOLO(str(ROOT / "cfg" / "tood-n.yaml"))
    net = model.model.eval()
    head = net.model[-1]
    images, boxes = [], []
    for i in range(64):  # letterboxed as the predictor will see them
        im, box = scene(i)
        x, (gx, gy, px, py) = deploy.letterbox(im, IMGSZ)
        images.append(x[0])
        boxes.append(box * [gx, gy, gx, gy] + [px, py, px, py])
    x = torch.from_numpy(np.stack(images))
    feats = {}
    hook = head.register_forward_pre_hook(lambda m, inp: feats.update(x=[f.detach() for f in inp[0]]))
    with torch.no_grad():
        net(x)
    hook.remove()
    feats, gt = feats["x"], torch.from_numpy(np.stack(boxes).astype(np.float32))
    points, strides = make_anchors(feats, head.stride, 0.5)
    points = points * strides  # anchor centres in pixels
    centre, wh = (gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]
    positive = ((points[None] - centre[:, None]).abs() < wh[:, None] / 4).all(-1) & (strides[:, 0] <= 16)

    head.train()
    params = [p for n, p in head.named_parameters() if not n.startswith("inter_convs")]
    for p in head.inter_convs.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(images), (8,), generator=g)
        out, pos = head([f[i] for f in feats]), positive[i]
        scores = out["scores"].clamp(1e-6, 1 - 1e-6)
        weight = torch.where(pos, 1.0, negative_weight)
        loss_cls = torch.nn.functional.binary_cross_entropy(scores[:, 0], pos.float(), weight=weight)
        loss_other = scores[:, 1:].permute(0, 2, 1)[pos].mean()  # other classes: 0 on the object too
        boxes = out["boxes"].permute(0, 2, 1) * strides[None]
        loss_box = (boxes - gt[i][:, None]).abs()[pos].mean() / 16
        opt.zero_grad()
        (10 * loss_cls + loss_other + loss_box).backward()
        opt.step()
    for p in head.parameters():
        p.requires_grad_(True)
    net.eval()
    model.save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return fit_rectangle_detector(tmp_path_factory.mktemp("ckpt") / "tood-n-rect.pt")


@pytest.fixture(scope="module")
def model(ckpt) -> YOLO:
    return YOLO(str(ckpt))


def found(result, box: np.ndarray, conf: float = 0.5) -> bool:
    """Whether a result has a box of class 0 with conf > `conf` overlapping `box` with IoU > 0.6."""
    b = result.boxes
    keep = (b.cls.numpy() == 0) & (b.conf.numpy() > conf)
    return bool(keep.any() and iou(b.xyxy.numpy()[keep], box).max() > 0.6)


def test_fitted_model_finds_the_object(model):
    hits = [found(model.predict(im, imgsz=IMGSZ, verbose=False)[0], box) for im, box in map(scene, range(500, 510))]
    assert sum(hits) >= 9, hits


def test_image_folder_and_glob(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    truth = {}
    for i in range(3):
        im, box = scene(600 + i)
        cv2.imwrite(str(folder / f"im{i}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 98])
        truth[f"im{i}"] = box
    im, truth["im3"] = scene(603)
    cv2.imwrite(str(folder / "im3.png"), im)

    results = list(deploy.run(model, str(folder), imgsz=IMGSZ, save=True, project=str(tmp_path), name="folder",
                              verbose=False))
    assert sorted(Path(r.path).stem for r in results) == ["im0", "im1", "im2", "im3"]
    assert all(found(r, truth[Path(r.path).stem]) for r in results)
    assert len(list((tmp_path / "folder").glob("im*"))) == 4  # annotated images saved

    results = list(deploy.run(model, str(folder / "*.jpg"), imgsz=IMGSZ, verbose=False))
    assert sorted(Path(r.path).name for r in results) == ["im0.jpg", "im1.jpg", "im2.jpg"]


def test_video_file_saved_annotated_and_streamed(model, tmp_path):
    frames, boxes = zip(*(moving(i) for i in range(12)))
    video = write_video(tmp_path / "moving.avi", list(frames))
    gen = deploy.run(model, str(video), imgsz=IMGSZ, save=True, project=str(tmp_path), name="vid", verbose=False)
    assert not isinstance(gen, list)  # a generator: frames are not kept
    results = list(gen)
    assert len(results) == 12
    assert sum(found(r, b) for r, b in zip(results, boxes)) >= 11
    out = tmp_path / "vid" / "moving.avi"
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    cap.release()


@contextlib.contextmanager
def ultralytics_log(level: int = logging.INFO):
    """The messages Ultralytics' logger emits at `level` or above inside the block (a list filled as they come)."""
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("ultralytics")
    old = logger.level
    logger.setLevel(level)  # YOLO_VERBOSE=false (conftest) keeps Ultralytics' logger at ERROR
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_shared_video_with_stride_logs_its_frame_rate(model, shared_data):
    video = shared_data("videos/dancer.avi")  # 1571 frames, 518x496
    with ultralytics_log() as logged:
        results = list(deploy.run(model, str(video), imgsz=IMGSZ, vid_stride=300, verbose=False))
    assert len(results) == 1571 // 300
    assert all(r.orig_shape == (496, 518) for r in results)
    assert any(re.fullmatch(r"done: 5 frame\(s\) in [\d.]+ s, [\d.]+ frames/s", m) for m in logged), logged


def test_corrupt_frame_is_skipped_and_logged(model, tmp_path):
    frames, boxes = zip(*(moving(i) for i in range(10)))
    video = write_video(tmp_path / "corrupt.avi", list(frames))
    data = bytearray(video.read_bytes())
    soi = [m.start() for m in re.finditer(b"\xff\xd8\xff", bytes(data))]
    assert len(soi) == 10  # one JPEG per frame
    data[soi[5] : soi[5] + 600] = bytes(600)  # frame 6 is no JPEG any more: FFmpeg cannot decode it
    video.write_bytes(data)

    with ultralytics_log(logging.WARNING) as logged:
        results = list(deploy.run(model, str(video), imgsz=IMGSZ, verbose=False))
    assert len(results) == 9  # Ultralytics alone stops at the bad frame and returns 5
    assert any("Video Frame Read Error" in m and "frame 6 of 10" in m for m in logged), logged
    assert found(results[-1], boxes[-1])  # the frames after the bad one are processed


class MJPEGHandler(BaseHTTPRequestHandler):
    """Serves /live as an MJPEG stream (multipart/x-mixed-replace) of `frames` at 10 fps.

    Once one client got every frame, the stream is over: later requests get 404, so a re-opening reader stops.
    """

    frames: list[bytes] = []
    finished = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/live" or type(self).finished:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for jpg in self.frames:
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpg), jpg)
                self.wfile.write(part)
                self.wfile.flush()
                time.sleep(0.1)
            type(self).finished = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # a probe that read a frame or a header and left


@pytest.fixture
def mjpeg_server():
    frames = [cv2.imencode(".jpg", moving(i)[0])[1].tobytes() for i in range(20)]
    handler = type("Handler", (MJPEGHandler,), {"frames": frames})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/live", handler
    server.shutdown()
    server.server_close()


def test_http_mjpeg_stream(model, mjpeg_server):
    url, handler = mjpeg_server
    t0 = time.perf_counter()
    results = []
    for r in deploy.run(model, url, imgsz=IMGSZ, verbose=False):
        results.append(r)
        assert time.perf_counter() - t0 < 60, "the stream did not end"
    assert handler.finished
    # live streams give the newest frame: expect most of the 20, each with the rectangle at its row and size
    with_box = [r for r in results if len(r.boxes)]
    assert len(with_box) >= 10, len(results)
    for r in with_box:
        x1, y1, x2, y2 = r.boxes.xyxy[0].numpy()
        assert abs(y1 - 40) < 6 and abs(y2 - 80) < 6 and abs((x2 - x1) - 40) < 8, (x1, y1, x2, y2)
    xs = [float(r.boxes.xyxy[0, 0]) for r in with_box]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 60  # the object moves right through the stream


def test_video_url_is_downloaded_and_read(model, tmp_path, monkeypatch):
    import functools
    from http.server import SimpleHTTPRequestHandler

    frames, boxes = zip(*(moving(i) for i in range(6)))
    write_video(tmp_path / "clip.avi", list(frames))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # Ultralytics downloads a media URL into the working directory
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.avi"
        results = list(deploy.run(model, url, imgsz=IMGSZ, verbose=False))
    finally:
        server.shutdown()
        server.server_close()
    assert len(results) == 6 and all(found(r, b) for r, b in zip(results, boxes))
    assert (tmp_path / "cwd" / "clip.avi").exists()


@pytest.fixture
def silent_server():
    """A TCP port on 127.0.0.1 that accepts connections (the kernel's backlog) and never sends a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_unresponsive_stream_fails_fast(silent_server, scheme):
    url = f"{scheme}://127.0.0.1:{silent_server}/live"
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"Stream {re.escape(url)} gave no video frame within 2 s"):
        deploy.prepare_source(url, timeout=2)
    assert time.perf_counter() - t0 < 8  # OpenCV alone waits 30 s (and Ultralytics first probes an http URL 3 s)


def test_refused_stream_fails_at_once():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="gave no video frame"):
        deploy.prepare_source(f"rtsp://127.0.0.1:{port}/live", timeout=5)
    assert time.perf_counter() - t0 < 3


def test_missing_webcam_index_fails_fast(model):
    index = next(i for i in range(63, 0, -1) if not Path(f"/dev/video{i}").exists())
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"Webcam source={index} could not be opened"):
        deploy.prepare_source(str(index))
    with pytest.raises(ConnectionError, match=f"Failed to open {index}"):  # Ultralytics' own loader: also at once
        model.predict(source=index, imgsz=IMGSZ, verbose=False)
    assert time.perf_counter() - t0 < 5


@pytest.mark.skipif(not sorted(Path("/dev").glob("video*")), reason="no camera here (/dev/video* absent)")
def test_real_webcam(model):
    results = deploy.run(model, 0, imgsz=IMGSZ, verbose=False)
    assert next(results).orig_img is not None


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="source=screen grabs an X display; none here (no DISPLAY)")
def test_screen_source(model):
    pytest.importorskip("mss", reason="source=screen needs the mss package")
    assert next(deploy.run(model, "screen", imgsz=IMGSZ, verbose=False)).orig_img is not None


def test_show_without_display_warns_and_runs(model, monkeypatch, tmp_path):
    monkeypatch.delenv("DISPLAY", raising=False)
    im, box = scene(700)
    results = model.predict(im, imgsz=IMGSZ, show=True, verbose=False)
    assert found(results[0], box)


def test_yolo_track_keeps_the_id(ckpt, env, tmp_path):
    frames, boxes = zip(*(moving(i) for i in range(14)))
    video = write_video(tmp_path / "track.avi", list(frames))
    p = subprocess.run(
        [str(BIN / "yolo"), "track", f"model={ckpt}", f"source={video}", "tracker=bytetrack.yaml", f"imgsz={IMGSZ}",
         "save_txt=True", "save_conf=True", f"project={tmp_path}", "name=track"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ids = []
    for i, box in enumerate(boxes):
        rows = np.loadtxt(tmp_path / "track" / "labels" / f"track_{i + 1}.txt", ndmin=2)  # cls cx cy w h conf id
        xyxy = np.concatenate((rows[:, 1:3] - rows[:, 3:5] / 2, rows[:, 1:3] + rows[:, 3:5] / 2), 1) * [W, H, W, H]
        best = rows[:, 5].argmax()  # the most confident track (the model also gives weaker duplicates)
        assert rows[best, 0] == 0 and iou(xyxy[best], box)[0] > 0.5, (i, rows)  # tracks are Kalman-smoothed
        ids.append(int(rows[best, 6]))
    assert len(set(ids)) == 1, ids  # one track follows the object through every frame


def assert_same_detections(a, b, conf: float, box_tol: float, conf_tol: float):
    """Every detection (xyxy, scores, classes arrays, or a Results) of either side with score > conf + conf_tol has one
    in the other: same class, boxes within box_tol px, scores within conf_tol (those at the threshold may fall on
    either side)."""
    a, b = (x if isinstance(x, tuple) else (x.boxes.xyxy.numpy(), x.boxes.conf.numpy(), x.boxes.cls.numpy())
            for x in (a, b))
    for (xb, xc, xk), (yb, yc, yk) in ((a, b), (b, a)):
        for box, c, k in zip(xb, xc, xk):
            if c <= conf + conf_tol:
                continue
            d = np.abs(np.asarray(yb) - box).reshape(-1, 4).max(1) + 1e9 * (np.asarray(yk) != k)
            j = d.argmin() if len(d) else None
            assert j is not None and d[j] < box_tol and abs(yc[j] - c) < conf_tol, (box, c, k)


def assert_close_top_detection(a, b, conf_tol: float, min_iou: float):
    """PyTorch's most confident detection (a) is in b: same class, IoU >= min_iou, score within conf_tol."""
    box, conf, cls = a.boxes.xyxy[0].numpy(), float(a.boxes.conf[0]), int(a.boxes.cls[0])
    same = b.boxes.cls.numpy() == cls
    overlaps = iou(b.boxes.xyxy.numpy()[same], box)
    assert len(overlaps) and overlaps.max() >= min_iou, (box, b.boxes.xyxy[:3])
    assert abs(float(b.boxes.conf.numpy()[same][overlaps.argmax()]) - conf) < conf_tol


SOURCES = [str(ASSETS / "bus.jpg"), str(ASSETS / "zidane.jpg")]


@pytest.fixture(scope="module")
def synthetic_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "rect.png"
    cv2.imwrite(str(path), scene(800)[0])
    return str(path)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_gives_pytorch_detections(model, ckpt, synthetic_image, fmt, tmp_path):
    kwargs = {"dynamic": True, "simplify": True} if fmt == "onnx" else {}
    f = YOLO(str(ckpt)).export(format=fmt, imgsz=256, **kwargs)
    exported = YOLO(f, task="detect")
    for source in [*SOURCES, synthetic_image]:
        a = model.predict(source, imgsz=256, conf=0.05, verbose=False)[0]
        b = exported.predict(source, imgsz=256, conf=0.05, verbose=False)[0]
        assert len(a.boxes) > 0
        assert_same_detections(a, b, 0.05, box_tol=0.02, conf_tol=1e-4)
    if fmt == "torchscript":  # and through the command line
        p = subprocess.run([str(BIN / "yolo"), "predict", f"model={f}", f"source={synthetic_image}", "imgsz=256",
                            f"project={tmp_path}", "name=cli"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 0 and list((tmp_path / "cli").glob("rect.*")), p.stdout[-2000:] + p.stderr[-2000:]


def test_onnx_with_nms_matches_pytorch_with_nms(model, ckpt):
    f = YOLO(str(ckpt)).export(format="onnx", imgsz=256, nms=True, simplify=True)  # conf 0.25 is baked in
    exported = YOLO(f, task="detect")
    for source in SOURCES[:1]:
        a = model.predict(source, imgsz=256, conf=0.25, verbose=False)[0]
        b = exported.predict(source, imgsz=256, conf=0.25, verbose=False)[0]
        assert len(a.boxes) > 0 and len(a.boxes) == len(b.boxes)
        assert_same_detections(a, b, 0.25, box_tol=0.02, conf_tol=1e-4)


def test_onnx_fp16_export_runs_close_to_pytorch(model, ckpt, synthetic_image):
    # On CPU Ultralytics exports FP32 and converts the graph to FP16 (inputs/outputs stay FP32). Scores near 1 round
    # to ties in FP16, so NMS may keep a neighbouring anchor's box: a few px off, hence IoU >= 0.8, not ~1.
    f = YOLO(str(ckpt)).export(format="onnx", imgsz=256, half=True)  # half=True is the deprecated quantize=16
    import onnx

    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(f).graph.initializer)
    a = model.predict(synthetic_image, imgsz=256, verbose=False)[0]
    b = YOLO(f, task="detect").predict(synthetic_image, imgsz=256, verbose=False)[0]
    assert_close_top_detection(a, b, conf_tol=0.02, min_iou=0.8)


def test_openvino_export_matches_pytorch(model, ckpt, synthetic_image):
    pytest.importorskip("openvino", reason="openvino is not installed (the 'export' extra of pyproject.toml)")
    f = YOLO(str(ckpt)).export(format="openvino", imgsz=256, dynamic=True)
    exported = YOLO(f, task="detect")
    for source in [synthetic_image, SOURCES[0]]:
        a = model.predict(source, imgsz=256, verbose=False)[0]
        b = exported.predict(source, imgsz=256, verbose=False)[0]
        # OpenVINO's CPU plugin computes in bf16 where the CPU has it (this one does): looser than ONNX
        assert_close_top_detection(a, b, conf_tol=0.03, min_iou=0.95)


TORCH_FREE = """
import json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import importlib.util
import cv2, onnxruntime as ort
spec = importlib.util.spec_from_file_location("deploy", sys.argv[1])
deploy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy)
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
out = {}
for path in sys.argv[3:]:
    boxes, scores, classes = deploy.detect_onnx(session, cv2.imread(path), imgsz=256, conf=0.1)
    out[path] = [boxes.tolist(), scores.tolist(), classes.tolist()]
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith(("torch", "ultralytics", "tood_yolo"))),
                  "out": out}))
"""


def test_onnx_runs_with_onnxruntime_alone_without_torch(model, ckpt, synthetic_image, tmp_path):
    f = YOLO(str(ckpt)).export(format="onnx", imgsz=256, dynamic=True, simplify=True)
    sources = [*SOURCES, synthetic_image]
    p = subprocess.run([sys.executable, "-c", TORCH_FREE, str(ROOT / "tood_yolo" / "tools" / "deploy.py"), f, *sources],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # only the blocked entry: neither torch, Ultralytics nor the tood_yolo package (its stdlib start-up hook may be)
    assert [m for m in result["modules"] if m != "tood_yolo_hook"] == ["torch"], result["modules"]
    assert len(result["out"][synthetic_image][1]) > 0
    for source in sources:
        got = tuple(np.array(v) for v in result["out"][source])
        ref = model.predict(source, imgsz=256, conf=0.1, verbose=False)[0]
        assert abs(len(got[1]) - len(ref.boxes)) <= 2  # detections at the threshold may fall on either side
        assert_same_detections(got, ref, 0.1, box_tol=0.05, conf_tol=1e-4)


def test_docs_carry_the_onnxruntime_section_verbatim():
    code = (ROOT / "tood_yolo" / "tools" / "deploy.py").read_text()
    start = code.index("# --- onnxruntime-only inference")
    section = code[code.index("\n", start) + 1 : code.index("# --- end of the onnxruntime-only section")].strip()
    docs = (ROOT / "docs" / "deployment.md").read_text()
    assert section in docs, "docs/deployment.md must carry deploy.py's onnxruntime-only section verbatim"
