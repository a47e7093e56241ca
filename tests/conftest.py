"""Shared test set-up: an offline Ultralytics and copies of ../shared/data in temporary folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Ultralytics reads these at import time: never reach for the network, never pip-install at run time.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> callable:
    """Return a function that copies a set from ../shared/data into a temp dir (Ultralytics writes .cache files)."""

    def copy(name: str) -> Path:
        src = SHARED_DATA / name
        if not src.exists():
            pytest.skip(f"{src} is not present (../shared/data is only beside CI and developer checkouts)")
        dst = tmp_path_factory.mktemp(name.replace("/", "_")) / Path(name).name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    return copy
