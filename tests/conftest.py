"""Shared test set-up: an offline Ultralytics, a network guard, and copies of ../shared/data in temporary folders."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

# Ultralytics reads these at import time: never reach for the network, never pip-install at run time.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Where a test that forgot tmp_path leaves files: the working directory (the exporter writes a YAML-built model's file
# there, `predict` its runs/) and the folders beside the configs and tests. Pytest's and Python's own caches aside.
WATCHED = (ROOT, ROOT / "cfg", ROOT / "tests")
NOT_WRITTEN_BY_TESTS = {".pytest_cache", "__pycache__"}
NETGUARD = Path(__file__).resolve().parent / "netguard"  # sitecustomize.py: the network guard for subprocesses


def _repository_entries() -> set[Path]:
    return {p for d in WATCHED if d.is_dir() for p in d.iterdir() if p.name not in NOT_WRITTEN_BY_TESTS}


@pytest.fixture(autouse=True)
def writes_only_under_tmp():
    """Each test writes under a temp dir only: a file or folder it adds to the repository is an error naming it."""
    before = _repository_entries()
    yield
    if added := sorted(str(p.relative_to(ROOT)) for p in _repository_entries() - before):
        pytest.fail(f"the test wrote into the repository (use tmp_path): {', '.join(added)}")


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


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """In this process, DNS lookups and connects to anything but localhost raise; returns the attempts made."""
    spec = importlib.util.spec_from_file_location("tood_netguard", NETGUARD / "sitecustomize.py")
    netguard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(netguard)
    attempts = []
    netguard.install(attempts.append, monkeypatch.setattr)
    return attempts


@pytest.fixture
def ddp_worker_prints() -> callable:
    """Return a function that runs the script Ultralytics' DDP launcher writes for `trainer`, with its final
    `trainer.train()` replaced by a print of `expression` (the rest runs as written), and returns the printed words."""
    import subprocess
    import sys

    from ultralytics.utils.dist import generate_ddp_file

    def run(trainer, expression: str) -> list[str]:
        file = Path(generate_ddp_file(trainer))
        script = file.read_text().replace("trainer.train()", f"print({expression})")
        env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
        try:
            p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        finally:
            file.unlink()
            file.with_suffix(".pt").unlink()
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout.split()

    return run


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict:
    """Environment for subprocesses (`yolo`, train.py, `python -m tood_yolo...`): offline Ultralytics, verbose, with
    its own settings (runs, datasets and weights folders in a temp dir, none of them holding anything yet), and the
    network guard of tests/netguard, which appends every blocked attempt to the file `env["TOOD_NETGUARD_LOG"]`."""
    from ultralytics.utils import SETTINGS

    tmp = tmp_path_factory.mktemp("offline_env")
    config = tmp / "config"
    (config / "Ultralytics").mkdir(parents=True)
    dirs = {k: str(tmp / k.removesuffix("_dir")) for k in ("datasets_dir", "runs_dir", "weights_dir")}
    (config / "Ultralytics" / "settings.json").write_text(json.dumps({**SETTINGS, **dirs}))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "true"}
    env["YOLO_CONFIG_DIR"], env["TOOD_NETGUARD_LOG"] = str(config), str(tmp / "net.log")
    env["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), env.get("PYTHONPATH", "")])
    return env
