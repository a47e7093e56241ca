"""`TOOD`: the Ultralytics model class of TOOD models, as `RTDETR` is RT-DETR's (`ultralytics/models/rtdetr/model.py`).

`TOOD("cfg/tood-n.yaml")` or `TOOD("best.pt")` trains, validates, predicts and exports with every Ultralytics mode,
through TOOD's own task map: `TOODDetectionModel`, `TOODTrainer`, `TOODDetectionValidator` and
`TOODDetectionPredictor` (the last two bound NMS's candidates, `engine/candidates.py`). `YOLO(...)` (and so the `yolo`
command) turns into a `TOOD` for a TOOD YAML or checkpoint, as it turns into a `YOLOWorld` or an `RTDETR` for theirs
(`tood_yolo.register`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ultralytics.engine.model import Model

from ..nn.configs import find_config
from ..nn.model import TOODDetectionModel
from ..utils.recipe import recipe_arguments
from .predictor import TOODDetectionPredictor
from .trainer import TOODTrainer
from .validator import TOODDetectionValidator


class TOOD(Model):
    """A TOOD detection model (a YAML that names TOOD's modules or loss, or a checkpoint of one).

    Args:
        model (str | Path | Model): Model YAML (a path, or a shipped config's name such as `tood-n.yaml`) or `.pt`
            checkpoint, or an initialised `Model` to adopt.
        verbose (bool): Print model information on load.
    """

    def __init__(self, model: str | Path | Model = "tood-n.yaml", verbose: bool = False):
        super().__init__(model=find_config(model) or model, task="detect", verbose=verbose)

    def train(self, trainer=None, **kwargs):
        """Ultralytics' `Model.train`, told the run's `recipe=` and `initial_epoch=` as the model this object holds says
        them (`recipe_arguments`), so that the trainer neither reads its YAML again nor loads its checkpoint. A resume
        takes them from its checkpoint, and a `cfg=` file is read by the trainer, as Ultralytics reads it there."""
        if not kwargs.get("resume") and not kwargs.get("cfg") and isinstance(self.model, torch.nn.Module):
            kwargs.update(recipe_arguments(kwargs, self.model.yaml))
        return super().train(trainer, **kwargs)

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        """TOOD's model, trainer, validator and predictor, for the one task TOOD does."""
        return {
            "detect": {
                "model": TOODDetectionModel,
                "trainer": TOODTrainer,
                "validator": TOODDetectionValidator,
                "predictor": TOODDetectionPredictor,
            }
        }
