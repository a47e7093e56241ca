"""TOOD (Task-aligned One-stage Object Detection, Feng et al., ICCV 2021) inside the Ultralytics YOLO engine.

Importing the package registers TOOD's model modules, loss and trainer with Ultralytics (see `tood_yolo.register`);
an installed package does so on its own when Ultralytics is imported.
"""

import tood_yolo_hook

from .register import register

register()
tood_yolo_hook.install()  # patches the YOLO class once Ultralytics loads it, if it has not yet

from .backbone import ResNet  # noqa: E402
from .head import TOODHead  # noqa: E402
from .neck import FPN  # noqa: E402

__version__ = "0.1.0"
__all__ = ("FPN", "ResNet", "TOODHead", "__version__", "register")
