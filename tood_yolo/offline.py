"""Offline guards: with YOLO_OFFLINE=1 Ultralytics reaches for nothing on the network, and says what is missing.

Ultralytics 8.4.190 reads YOLO_OFFLINE only for its connectivity flag (telemetry, update checks). It still looks a
missing weights file up among GitHub's release assets (`attempt_download_asset`: api.github.com, then github.com),
downloads a dataset whose images are missing (`data=coco8.yaml` is a YAML inside Ultralytics whose images are fetched
on first use) and, for a file Pillow cannot identify, tries to pip-install `pi-heif` in case it is a HEIF image.
`register()` calls `guard_downloads()` and `guard_datasets()` when YOLO_OFFLINE is set, and instead:

- a weights file that is neither on disk nor in Ultralytics' weights_dir is a `FileNotFoundError` at once;
- every download (`safe_download`, `download`) is refused with an `OfflineError` that names the URL;
- a dataset that is not on disk is a `FileNotFoundError` that says so (`check_det_dataset` never downloads);
- without pi-heif installed, an unreadable image keeps Pillow's own "cannot identify image file" error.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

class OfflineError(ConnectionError):
    """A download was asked for while YOLO_OFFLINE is set."""


def is_offline() -> bool:
    """Whether YOLO_OFFLINE asks for no network access (Ultralytics' `env_bool` spelling)."""
    return os.environ.get("YOLO_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def refuse_download(url=None, *args, **kwargs):
    """Stand-in for Ultralytics' `safe_download` / `download`: never fetches, names what was asked for."""
    raise OfflineError(f"offline (YOLO_OFFLINE=1): nothing is downloaded, {url} was not fetched")


def local_asset(file, *args, **kwargs) -> str:
    """Stand-in for `attempt_download_asset`: the file on disk or in Ultralytics' weights_dir, else an error."""
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import check_yolov5u_filename

    if str(file).lower().startswith(("http:/", "https:/")):
        refuse_download(file)
    path = Path(check_yolov5u_filename(str(file).strip().replace("'", "")))
    for p in (path, Path(SETTINGS["weights_dir"]) / path):
        if p.is_file():
            return str(p)
    raise FileNotFoundError(f"weights file {file} not found (offline: nothing is downloaded)")


def guard_downloads() -> None:
    """Refuse downloads, find weights locally, keep Pillow's error for unreadable images (once, from register)."""
    from PIL import Image
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import downloads, patches

    downloads.safe_download = downloads.download = refuse_download
    data_utils.safe_download = data_utils.download = refuse_download  # imported there by name
    downloads.attempt_download_asset = local_asset  # tasks.torch_safe_load imports it at each call
    if importlib.util.find_spec("pi_heif") is None:  # Ultralytics' fallback would try to pip-install it
        Image.open = patches._image_open


def guard_datasets() -> None:
    """Make `check_det_dataset` (as the trainer and validator call it) fail clearly instead of downloading (once,
    from register)."""
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

    for module in (data_utils, trainer, validator):  # the last two import it by name
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
