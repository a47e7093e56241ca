"""Offline guards: with YOLO_OFFLINE=1 Ultralytics reaches for nothing on the network, and says what is missing.

Ultralytics 8.4.190 reads YOLO_OFFLINE only for its connectivity flag (telemetry, update checks). It still looks a
missing weights file up among GitHub's release assets (`attempt_download_asset`: api.github.com, then github.com),
downloads a dataset whose images are missing (`data=coco8.yaml` is a YAML inside Ultralytics whose images are fetched
on first use), fetches a font for its plots, and, for a file Pillow cannot identify, tries pi-heif (a pip install
when allowed) in case it is a HEIF image. With YOLO_OFFLINE set, `register()` applies these guards instead:

- `ensure_offline_font`: a local font for the plots;
- `guard_downloads`: a weights file given by name that is neither on disk nor in Ultralytics' weights_dir is a
  `FileNotFoundError` at once; without pi-heif, an unreadable image keeps Pillow's "cannot identify image file";
- `guard_datasets`: a dataset that is not on disk is a `FileNotFoundError` that says so (nothing is downloaded).

A URL the user gives (`source=`, `model=`, `data=https://...`) is a request for the network and is still fetched.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path


def is_offline() -> bool:
    """Whether YOLO_OFFLINE is set to a true value (as Ultralytics reads it)."""
    from ultralytics.utils import env_bool

    return env_bool("YOLO_OFFLINE")


def guard_downloads() -> None:
    """Look weights given by name up on disk only; keep Pillow's error for unreadable images (once, from register)."""
    from PIL import Image
    from ultralytics.utils import SETTINGS, downloads, patches
    from ultralytics.utils.checks import check_yolov5u_filename

    attempt_download_asset = downloads.attempt_download_asset

    @functools.wraps(attempt_download_asset)
    def local_asset(file, *args, **kwargs) -> str:
        if str(file).lower().startswith(("http:/", "https:/")):
            return attempt_download_asset(file, *args, **kwargs)  # a URL: the user asked for a download
        path = Path(check_yolov5u_filename(str(file).strip().replace("'", "")))
        for p in (path, Path(SETTINGS["weights_dir"]) / path):
            if p.is_file():
                return str(p)
        raise FileNotFoundError(f"weights file {file} not found (offline: nothing is downloaded)")

    downloads.attempt_download_asset = local_asset  # tasks.torch_safe_load imports it at each call
    if importlib.util.find_spec("pi_heif") is None:
        Image.open = patches._image_open  # Pillow's own, without Ultralytics' pi-heif fallback


def guard_datasets() -> None:
    """`check_det_dataset` that never downloads and says so when a dataset is not on disk (once, from register).

    Replaced in `ultralytics.data.utils`, which modules imported later read, and in the trainer and validator, which
    imported it by name already.
    """
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer, validator

    original = data_utils.check_det_dataset

    @functools.wraps(original)
    def check_local_dataset(dataset, autodownload: bool = True, split: str = ""):
        try:
            return original(dataset, autodownload=False, split=split)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"dataset {dataset} not found locally (offline: nothing is downloaded); pass data=path/to/data.yaml "
                f"of a dataset on disk.\n{e}"
            ) from e

    for module in (data_utils, trainer, validator):
        module.check_det_dataset = check_local_dataset


def ensure_offline_font() -> None:
    """Give Ultralytics' `check_font` a local Arial.ttf (matplotlib's DejaVu Sans) so plots never fetch one."""
    from matplotlib import get_data_path
    from ultralytics.utils import USER_CONFIG_DIR

    src = Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dst = Path(USER_CONFIG_DIR) / name
        if not dst.exists() and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
