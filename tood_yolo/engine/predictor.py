"""`TOODDetectionPredictor`: Ultralytics' detection predictor with TOOD's pre-NMS bound (`engine/candidates.py`)."""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor

from .candidates import MAX_NMS, ULTRALYTICS_MAX_NMS, needs_bound, nms_bound, top_anchors


class TOODDetectionPredictor(DetectionPredictor):
    """Ultralytics' DetectionPredictor whose NMS gets at most `max_nms` (or `max_det`) candidates per image for models
    with a T-head: the anchors with the best scores (best class, after `classes=`), exactly those Ultralytics' own
    `max_nms` cap would keep.

    Everything else (conf, iou, max_det, classes, agnostic NMS, tracking and its ReID features) is Ultralytics'.

    Attributes:
        max_nms (int): Candidates per image given to NMS, at least max_det (Ultralytics' own cap is 30,000).
        bounded (bool): Whether the bound applies to the model (`needs_bound`; set by setup_model).
    """

    max_nms: int = MAX_NMS
    bounded: bool = True

    def setup_model(self, model: Any, verbose: bool = True) -> None:
        """Ultralytics' model set-up, and whether NMS's candidates are bounded for this model (`needs_bound`)."""
        super().setup_model(model, verbose)
        self.bounded = needs_bound(self.model)

    def postprocess(self, preds: torch.Tensor, img: torch.Tensor, orig_imgs: Any, **kwargs: Any) -> list[Results]:
        """`DetectionPredictor.postprocess` on the `nms_bound` best anchors of each image of preds (B, 4 + nc, A)."""
        k = nms_bound(self.max_nms, self.args.max_det) if self.bounded else ULTRALYTICS_MAX_NMS
        preds, self._kept = top_anchors(preds, k, len(self.model.names), self.args.classes)
        return super().postprocess(preds, img, orig_imgs, **kwargs)

    def get_obj_feats(self, feat_maps: list[torch.Tensor], idxs: list[torch.Tensor]) -> list[torch.Tensor | list]:
        """Ultralytics' object features (tracking's ReID) for NMS's kept indices, which count the kept anchors: mapped
        back to the model's A anchors first."""
        if self._kept is not None:
            idxs = [kept[i.long()] for kept, i in zip(self._kept, idxs)]
        return super().get_obj_feats(feat_maps, idxs)
