"""Offline guards: with YOLO_OFFLINE=1 Ultralytics reaches for nothing on the network, and says what is missing.

Ultralytics 8.4.190 reads YOLO_OFFLINE only for its connectivity flag (telemetry, update checks). It still looks a
missing weights file up among GitHub's release assets (`attempt_download_asset`: api.github.com, then github.com),
downloads a dataset whose images are missing (`data=coco8.yaml` is a YAML inside Ultralytics whose images are fetched
on first use), fetches a font for its plots, and, for a file Pillow cannot identify, tries pi-heif (a pip install
when allowed) in case it is a HEIF image. With YOLO_OFFLINE set, `tood_yolo.register` puts these in their place:

- `ensure_offline_font`: a local font for the plots;
- `local_asset`: a weights file given by name that is neither on disk nor in Ultralytics' weights_dir is a
  `FileNotFoundError` at once; without pi-heif (`without_heif`), an unreadable image keeps Pillow's "cannot identify
  image file";
- `local_dataset`: a dataset that is not on disk is a `FileNotFoundError` that says so (nothing is downloaded).

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


def local_asset(attempt_download_asset):
    """Ultralytics' `attempt_download_asset` for weights given by name: on disk (as given, or in Ultralytics'
    weights_dir) or a `FileNotFoundError` at once. A URL is the user's request for a download and is still fetched."""
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import check_yolov5u_filename

    @functools.wraps(attempt_download_asset)
    def local(file, *args, **kwargs) -> str:
        if str(file).lower().startswith(("http:/", "https:/")):
            return attempt_download_asset(file, *args, **kwargs)
        path = Path(check_yolov5u_filename(str(file).strip().replace("'", "")))
        for p in (path, Path(SETTINGS["weights_dir"]) / path):
            if p.is_file():
                return str(p)
        raise FileNotFoundError(f"weights file {file} not found (offline: nothing is downloaded)")

    return local


def without_heif() -> bool:
    """Whether pi-heif is missing, so that Ultralytics' HEIF fallback for an unreadable image would pip-install it."""
    return importlib.util.find_spec("pi_heif") is None


def local_dataset(check_det_dataset):
    """Ultralytics' `check_det_dataset` that never downloads and says so when a dataset is not on disk."""

    @functools.wraps(check_det_dataset)
    def check_local_dataset(dataset, autodownload: bool = True, split: str = ""):
        try:
            return check_det_dataset(dataset, autodownload=False, split=split)
        except FileNotFoundError as e:
            # from None: Ultralytics' own message is in this one; its traceback would only bury it
            raise FileNotFoundError(
                f"dataset {dataset} not found locally (offline: nothing is downloaded); pass data=path/to/data.yaml "
                f"of a dataset on disk.\n{e}"
            ) from None

    return check_local_dataset


def ensure_offline_font() -> None:
    """Give Ultralytics' `check_font` a local Arial.ttf (matplotlib's DejaVu Sans) so plots never fetch one.

    Matplotlib's data folder is found beside its package (as `matplotlib.get_data_path` finds it) without importing
    matplotlib: this runs at start-up for every offline Ultralytics user, and `from ultralytics import YOLO` does not
    import matplotlib."""
    from ultralytics.utils import USER_CONFIG_DIR

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return
    src = Path(spec.origin).with_name("mpl-data") / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dst = Path(USER_CONFIG_DIR) / name
        if not dst.exists() and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
