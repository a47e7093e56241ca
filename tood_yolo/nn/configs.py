"""TOOD's model configs by name, as Ultralytics finds its own: `model=tood-r50.yaml` or `yolo11n-tood-bn.yaml` from any
folder.

The YAMLs live in the repository's `cfg/`, which the wheel ships as `tood_yolo/cfg/` (pyproject's force-include), so a
source checkout, an editable install and a wheel install all find them. A path that exists always wins over a name.
"""

from __future__ import annotations

from pathlib import Path

from ultralytics.nn.tasks import yaml_model_load

PACKAGE = Path(__file__).resolve().parents[1]
CONFIG_DIRS = (PACKAGE / "cfg", PACKAGE.parent / "cfg")  # wheel install; source checkout or editable install
YAML_SUFFIXES = (".yaml", ".yml")
# The module names a TOOD YAML may give (`nn/model.py` builds them: its TOOD_MODULES has these keys). Kept here, apart
# from the classes, so that `is_tood_config` answers without importing the network (torch, torchvision): the YOLO
# class asks it for every model YAML, TOOD's or not.
TOOD_MODULE_NAMES = frozenset({"ResNet", "FPN", "TOODHead"})


def is_tood_config(d: dict) -> bool:
    """Whether a model YAML dict is TOOD's: it names a TOOD module or asks for TOOD's loss (`loss: tood`)."""
    rows = [*d.get("backbone", ()), *d.get("head", ())]
    return d.get("loss") == "tood" or any(len(r) == 4 and r[2] in TOOD_MODULE_NAMES for r in rows)


def config_names() -> list[str]:
    """The file names of every TOOD config shipped with the package, sorted."""
    return sorted({p.name for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def find_config(model) -> Path | None:
    """The shipped config a bare YAML name (`tood-n.yaml`) means, or None: for paths that exist, for names that are
    not TOOD's (Ultralytics' own, e.g. `yolo11n.yaml`) and for anything that is not a YAML name."""
    if not isinstance(model, (str, Path)) or Path(model).suffix.lower() not in YAML_SUFFIXES:
        return None
    path = Path(model)
    if path.exists() or path.name != str(model):  # an existing file, or a path with folders: the user's own
        return None
    return next((d / path.name for d in CONFIG_DIRS if (d / path.name).is_file()), None)


def unknown_config_message(model) -> str:
    """One line for a YAML name that is neither a file, nor TOOD's, nor Ultralytics': what was typed, what exists."""
    return (f"model={model}: no such file, and not a config of TOOD or Ultralytics. TOOD configs: "
            f"{', '.join(config_names())}; Ultralytics' own, e.g. yolo11n.yaml, yolov8s.yaml")


def read_config(model: str | Path) -> dict:
    """The model YAML dict of a path or of a shipped config's name (`find_config`), read as Ultralytics reads its own
    (`yaml_model_load`, which also records the file and the scale its name gives)."""
    return yaml_model_load(find_config(model) or model)
