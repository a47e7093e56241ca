"""The installed start-up hook costs Ultralytics' users nothing until they use TOOD: what a new interpreter imports with
the hook, against the same interpreter with the hook switched off (`TOOD_YOLO_HOOK=0`, Ultralytics alone).
The time and memory that costs: benchmarks/startup.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What registration imports in a process that never uses TOOD: the package's face, the registration and the two data
# modules whose guards it puts in place. Nothing else of the package, torch's or torchvision's.
REGISTRATION_MODULES = {"tood_yolo", "tood_yolo.register", "tood_yolo.data", "tood_yolo.data.offline",
                        "tood_yolo.data.video"}
# ...and what a YAML's look-up adds when a YOLO(...) is built: the config look-up, not the network
CONFIG_MODULES = {"tood_yolo.nn", "tood_yolo.nn.configs"}


def imported(code: str, env: dict, cwd: Path, hook: bool = True) -> set[str]:
    """The names in sys.modules after `code` runs in a new interpreter, with the start-up hook or without it."""
    env = {**env, "TOOD_YOLO_HOOK": "1" if hook else "0"}
    code += "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return set(json.loads(p.stdout.splitlines()[-1]))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_importing_yolo_imports_only_the_registration(offline, offline_env, tmp_path):
    """`from ultralytics import YOLO` registers TOOD (YOLO's __init__ is wrapped) and imports only the registration's
    stdlib-cheap modules beyond what Ultralytics alone imports, offline guards included."""
    env = {**offline_env, "YOLO_OFFLINE": offline}
    code = "from ultralytics import YOLO\nassert YOLO.__init__.__wrapped__"
    with_hook = imported(code, env, tmp_path)
    alone = imported("from ultralytics import YOLO", env, tmp_path, hook=False)
    assert with_hook - alone == REGISTRATION_MODULES
    assert not alone - with_hook


def test_ultralytics_defers_torchvision_with_the_plugin_installed(offline_env, tmp_path):
    """The code of Ultralytics 8.4.190's tests/test_cli.py::test_cli_imports_defer_torchvision, run with the hook."""
    code = (
        "import sys; "
        "from ultralytics import YOLO; "
        "from ultralytics.models.sam import Predictor; "
        "assert 'torchvision' not in sys.modules; "
        "assert 'ultralytics.models.sam.sam3.geometry_encoders' not in sys.modules"
    )
    assert "tood_yolo.register" in imported(code, offline_env, tmp_path)


def test_an_ultralytics_model_imports_no_tood_network(offline_env, tmp_path):
    """Building Ultralytics' own model from its YAML name goes through the wrapped YOLO class, which reads the YAML
    and finds it is not TOOD's: it imports TOOD's config look-up and nothing of TOOD's network or engine."""
    code = "from ultralytics import YOLO\nm = YOLO('yolo11n.yaml')\nassert type(m).__name__ == 'YOLO'"
    with_hook = imported(code, offline_env, tmp_path)
    assert with_hook - imported(code, offline_env, tmp_path, hook=False) == REGISTRATION_MODULES | CONFIG_MODULES


@pytest.mark.parametrize("model", ["tood-n.yaml", str(ROOT / "cfg/yolo11n-tood-bn.yaml")])
def test_a_tood_model_imports_tood_when_it_is_built(model, offline_env, tmp_path):
    """The other side of the bargain: a TOOD config (by name or path) still builds TOOD's model, whose modules load
    then."""
    code = f"from ultralytics import YOLO\nm = YOLO({model!r})\nassert type(m).__name__ == 'TOOD', type(m)"
    assert {"tood_yolo.nn.head", "tood_yolo.engine.model"} <= imported(code, offline_env, tmp_path)


def test_legacy_module_names_load_on_first_import_only(offline_env, tmp_path):
    """tood-yolo 0.1's module names (what its checkpoints pickle) are the modules of nn/, imported when asked for,
    with their own import specs kept."""
    code = (
        "import sys, tood_yolo\n"
        "assert not {'tood_yolo.head', 'tood_yolo.nn.head', 'tood_yolo.nn.backbone'} & set(sys.modules)\n"
        "import tood_yolo.head, tood_yolo.nn.head\n"
        "assert tood_yolo.head is tood_yolo.nn.head and sys.modules['tood_yolo.head'] is tood_yolo.nn.head\n"
        "assert tood_yolo.nn.head.__spec__.name == 'tood_yolo.nn.head', tood_yolo.nn.head.__spec__\n"
        "from tood_yolo.backbone import ResNet\n"
        "assert ResNet is tood_yolo.ResNet and ResNet.__module__ == 'tood_yolo.nn.backbone'"
    )
    assert "tood_yolo.backbone" in imported(code, offline_env, tmp_path)
