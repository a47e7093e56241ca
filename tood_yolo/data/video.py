"""Video files with damaged frames: the one owner of skipping them.

A frame that FFmpeg cannot decode (e.g. a damaged JPEG in an MJPG AVI, a damaged header in MPEG-4) makes
`cv2.VideoCapture.grab()` return False, which Ultralytics' `LoadImagesAndVideos` takes for the end of the video: the
rest of the video is silently dropped. `SkippingLoader` is that loader with captures that skip such frames and log each
skip. `tood_yolo.register` makes it the loader of every `predict` (`load_inference_source` builds it from
`ultralytics.data.build.LoadImagesAndVideos`); `video_loader` builds one to pass as `source`, as
`tood_yolo.tools.deploy.prepare_source` and `predict.py` do.
"""

from __future__ import annotations

import cv2
from ultralytics.data.build import SourceTypes
from ultralytics.data.loaders import LoadImagesAndVideos
from ultralytics.utils import LOGGER

MAX_SKIPPED_FRAMES = 250  # consecutive undecodable frames after which a video is taken as ended


class SkippingCapture:
    """A `cv2.VideoCapture` of a file whose `grab`/`retrieve` skip undecodable frames, logging each, instead of
    ending the video there. Every other attribute is the capture's own."""

    def __init__(self, cap: cv2.VideoCapture, path: str):
        self._cap, self.path = cap, path
        self.frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.pos = 0  # frames consumed, decoded or not
        self.skipped = 0  # total undecodable frames skipped

    def __getattr__(self, name):
        return getattr(self._cap, name)

    def grab(self) -> bool:
        for _ in range(MAX_SKIPPED_FRAMES + 1):
            if self._cap.grab():
                self.pos += 1
                return True
            if self.pos + 1 >= self.frames:  # the last frame: the end of the video (or a count that was too high)
                return False
            self.pos += 1
            self.skipped += 1
            LOGGER.warning(f"Video Frame Read Error {self.path}: frame {self.pos} of {self.frames} could "
                           f"not be decoded, skipped")
        return False

    def retrieve(self, *args):
        ok, im = self._cap.retrieve(*args)
        if not ok or im is None:
            self.skipped += 1
            LOGGER.warning(f"Video Frame Read Error {self.path}: frame {self.pos} could not be decoded, "
                           f"skipped")
        return ok, im

    def read(self, *args):
        return self.retrieve(*args) if self.grab() else (False, None)


class SkippingLoader(LoadImagesAndVideos):
    """Ultralytics' image/video loader whose video captures skip (and log) undecodable frames."""

    def _new_video(self, path: str):
        super()._new_video(path)
        self.cap = SkippingCapture(self.cap, path)


def video_loader(source, batch: int = 1, vid_stride: int = 1, channels: int = 3) -> SkippingLoader:
    """A loader for a file, folder, glob or list of files, to pass as `source` to `YOLO.predict`/`track`.

    Ultralytics' `LoadImagesAndVideos`, except that an undecodable video frame is skipped and logged instead of
    ending its video. `batch` and `vid_stride` must be given here: the predictor uses the loader as it is.
    """
    loader = SkippingLoader(source, batch=batch, vid_stride=vid_stride, channels=channels)
    loader.source_type = SourceTypes(stream=False, screenshot=False, from_img=False, tensor=False)
    return loader
