"""TOOD's configs found by name from any folder, as Ultralytics finds its own, in a source checkout and in a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from ultralytics import YOLO
from ultralytics.utils import ASSETS

from tood_yolo.nn.configs import config_names

ROOT = Path(__file__).resolve().parents[1]
CFGS = sorted(p.name for p in (ROOT / "cfg").glob("*.yaml"))


@pytest.mark.parametrize("name", ["tood-n.yaml", "yolo11n-tood.yaml", "yolo11n-tood-bn.yaml"])
def test_tood_config_by_name_from_an_empty_folder(name, tmp_path, monkeypatch):
    """The config of that name, not Ultralytics' scale-stripped look-up ('yolo11-tood.yaml')."""
    monkeypatch.chdir(tmp_path)
    model = YOLO(name)
    assert type(model).__name__ == "TOOD"
    assert Path(model.model.yaml["yaml_file"]).name == name
    assert model.model.yaml["head"] == YOLO(str(ROOT / "cfg" / name)).model.yaml["head"]


def test_ultralytics_names_stay_ultralytics_and_a_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = YOLO("yolo11n.yaml")
    assert type(model).__name__ == "YOLO" and type(model.model).__name__ == "DetectionModel"
    own = tmp_path / "tood-n.yaml"  # the user's own file of the same name, in the working folder
    own.write_text((ROOT / "cfg" / "tood-n.yaml").read_text().replace("nc: 80", "nc: 7"))
    assert YOLO("tood-n.yaml").model.yaml["nc"] == 7


def test_a_wrong_name_says_what_was_typed_and_what_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        YOLO("tood-r51.yaml")
    message = str(e.value)
    assert "\n" not in message and message.startswith("model=tood-r51.yaml: no such file")
    assert all(name in message for name in CFGS) and "yolo11n.yaml" in message
    assert config_names() == CFGS


def test_yolo_predict_with_a_config_name_from_an_empty_folder(tmp_path, offline_env):
    image = tmp_path / "bus.jpg"
    image.write_bytes((ASSETS / "bus.jpg").read_bytes())
    work = tmp_path / "empty"
    work.mkdir()
    cmd = [str(Path(sys.executable).parent / "yolo"), "predict", "model=tood-n.yaml", f"source={image}", "imgsz=128",
           f"project={tmp_path}", "name=pred"]
    p = subprocess.run(cmd, env=offline_env, cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "pred" / "bus.jpg").exists() and not list(work.iterdir())


def test_the_wheel_ships_every_config_and_finds_them_by_name(tmp_path, offline_env):
    """`pip wheel .` holds cfg/ as tood_yolo/cfg/; installed alone (no source checkout on the path), `YOLO(name)` builds
    from the packaged file."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tood_yolo/cfg/{name}" for name in CFGS} <= files and "tood_yolo_hook.pth" in files
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    work = tmp_path / "empty"
    work.mkdir()
    code = ("import tood_yolo; from ultralytics import YOLO; m = YOLO('yolo11n-tood-bn.yaml'); "
            "print(tood_yolo.__file__); print(m.model.yaml['yaml_file'])")
    env = {**offline_env, "PYTHONPATH": os.pathsep.join([str(site), offline_env["PYTHONPATH"]])}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    package, cfg = run.stdout.strip().splitlines()[-2:]
    assert Path(package).is_relative_to(site) and Path(cfg) == site / "tood_yolo" / "cfg" / "yolo11n-tood-bn.yaml"


def test_the_light_list_of_tood_module_names_is_the_builders():
    """`is_tood_config` decides with a list of names that imports no network (the start-up hook asks it for every model
    YAML): it must name exactly the modules `TOODDetectionModel` builds, or a new TOOD module would go to Ultralytics'
    parser, which cannot build it."""
    from tood_yolo.nn.configs import TOOD_MODULE_NAMES
    from tood_yolo.nn.model import TOOD_MODULES

    assert TOOD_MODULE_NAMES == set(TOOD_MODULES)
