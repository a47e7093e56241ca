"""TOOD (Task-aligned One-stage Object Detection, Feng et al., ICCV 2021) inside the Ultralytics YOLO engine.

Importing the package registers TOOD with Ultralytics (`tood_yolo.register`); an installed package does so on its own
when Ultralytics is imported. The architecture, in words: docs/architecture.md.
"""

import importlib
import sys

import tood_yolo_hook

from .engine.model import TOOD
from .nn.backbone import ResNet
from .nn.head import TOODHead
from .nn.model import TOODDetectionModel
from .nn.neck import FPN
from .register import register

# Checkpoints saved by tood-yolo 0.1 pickle the model's modules under its flat layout's module names
LEGACY_MODULES = {"tood_yolo.head": "tood_yolo.nn.head", "tood_yolo.neck": "tood_yolo.nn.neck",
                  "tood_yolo.backbone": "tood_yolo.nn.backbone"}
for _old, _new in LEGACY_MODULES.items():
    sys.modules.setdefault(_old, importlib.import_module(_new))

register()
tood_yolo_hook.install()  # wraps the YOLO class once Ultralytics loads it, if it has not yet

__version__ = "0.1.0"
__all__ = ("FPN", "ResNet", "TOOD", "TOODDetectionModel", "TOODHead", "__version__", "register")
