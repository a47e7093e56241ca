"""TOOD (Task-aligned One-stage Object Detection, Feng et al., ICCV 2021) inside the Ultralytics YOLO engine.

Importing the package registers TOOD with Ultralytics (`tood_yolo.register`); an installed package does so on its own
when Ultralytics is imported. The architecture, in words: docs/architecture.md.

Importing the package costs no torch or torchvision import of its own: the start-up hook imports it in every process
that imports Ultralytics' models, whatever model that process runs. The classes below load on first use (PEP 562
`__getattr__`), and so do the module names that tood-yolo 0.1's checkpoints pickle (`LEGACY_MODULES`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import tood_yolo_hook

from .register import register

# Each public class and the module that defines it, imported when first asked for (`tood_yolo.TOOD`)
_CLASSES = {"TOOD": ".engine.model", "ResNet": ".nn.backbone", "TOODHead": ".nn.head",
            "TOODDetectionModel": ".nn.model", "FPN": ".nn.neck"}
# Checkpoints saved by tood-yolo 0.1 pickle the model's modules under its flat layout's module names
LEGACY_MODULES = {"tood_yolo.head": "tood_yolo.nn.head", "tood_yolo.neck": "tood_yolo.nn.neck",
                  "tood_yolo.backbone": "tood_yolo.nn.backbone"}


def __getattr__(name: str):
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_CLASSES[name], __name__), name)
    globals()[name] = value
    return value


class _LegacyModuleAlias:
    """Meta-path finder and loader (duck-typed, as `tood_yolo_hook`'s) that makes `import tood_yolo.head` (what
    unpickling a 0.1 checkpoint does) give the module of nn/ that replaced it (`LEGACY_MODULES`), on that first import.
    """

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, _LegacyModuleAlias) if fullname in LEGACY_MODULES else None

    @staticmethod
    def create_module(spec):
        module = importlib.import_module(LEGACY_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import system now sets the alias's spec on it: exec_module undoes it
        return module

    @staticmethod
    def exec_module(module) -> None:
        module.__spec__ = module.__spec__.loader_state


if not any(f is _LegacyModuleAlias for f in sys.meta_path):
    sys.meta_path.append(_LegacyModuleAlias)
register()
tood_yolo_hook.install()  # wraps the YOLO class once Ultralytics loads it, if it has not yet

__version__ = "0.1.0"
__all__ = ("FPN", "ResNet", "TOOD", "TOODDetectionModel", "TOODHead", "__version__", "register")
