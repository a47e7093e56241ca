"""`AlignmentValidator`: Ultralytics' validation run that also feeds every image to the alignment measures."""

from __future__ import annotations

from typing import Any

import torch
from ultralytics.utils.ops import scale_boxes, xywh2xyxy

from ...engine.validator import TOODDetectionValidator
from .metrics import AlignmentStats, count_detections, dense_predictions, pre_nms_alignment


class AlignmentValidator(TOODDetectionValidator):
    """DetectionValidator that also measures score-IoU alignment, before NMS from the raw head output and after NMS.

    Ultralytics' own dataloader, letterbox, NMS and metrics run unchanged; `postprocess` keeps the raw (B, 4 + nc, A)
    output of the batch and `update_metrics` feeds it, with the NMS output and the GTs, all in original image pixels,
    to `AlignmentStats`.

    Attributes:
        alignment (AlignmentStats): Results so far.
        topk (int): Predictions per instance in the rank correlation.
        topk_iou (int): Predictions per instance in the mean IoU.
        multi_label (bool): Pre-NMS predictions per anchor and class (True) or per anchor (False).
    """

    def __init__(self, *args, topk: int = 50, topk_iou: int = 10, multi_label: bool = True, **kwargs) -> None:
        """Initialise like DetectionValidator, plus the alignment settings."""
        super().__init__(*args, **kwargs)
        self.topk, self.topk_iou, self.multi_label = topk, topk_iou, multi_label
        self.alignment = AlignmentStats()
        self.raw = None

    def init_metrics(self, model: torch.nn.Module) -> None:
        """Start a fresh `AlignmentStats` with the usual metrics."""
        super().init_metrics(model)
        self.alignment = AlignmentStats()

    def postprocess(self, preds: torch.Tensor | tuple) -> list[dict[str, torch.Tensor]]:
        """Keep the raw pre-NMS output (B, 4 + nc, A), then apply NMS as `TOODDetectionValidator`."""
        raw = preds[0] if isinstance(preds, (list, tuple)) else preds
        if not isinstance(raw, torch.Tensor) or raw.ndim != 3 or raw.shape[1] < 4 + self.nc:
            raise TypeError(
                f"alignment study needs a dense (B, 4+nc={4 + self.nc}, anchors) head output before NMS, got "
                f"{getattr(raw, 'shape', type(raw))}; end-to-end (NMS-free) outputs cannot be studied"
            )
        self.raw = raw[:, : 4 + self.nc]
        return super().postprocess(preds)  # NMS without its time limit: counts must not depend on the CPU's load

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        """Measure each image's alignment, then update the usual metrics."""
        for si, pred in enumerate(preds):
            pbatch = self._prepare_batch(si, batch)
            gt_cls, gt_boxes = pbatch["cls"].cpu(), self._to_image(pbatch["bboxes"], pbatch)
            raw = self.raw[si].detach().float()
            boxes, scores, classes = dense_predictions(
                self._to_image(xywh2xyxy(raw[:4].T), pbatch), raw[4:].T, gt_cls, self.multi_label
            )
            self.alignment.update(
                len(gt_cls),
                count_detections(self._to_image(pred["bboxes"], pbatch), pred["conf"], pred["cls"], gt_boxes, gt_cls),
                pre_nms_alignment(boxes, scores, classes, gt_boxes, gt_cls, self.topk, self.topk_iou),
            )
        super().update_metrics(preds, batch)

    @staticmethod
    def _to_image(boxes: torch.Tensor, pbatch: dict[str, Any]) -> torch.Tensor:
        """Map xyxy boxes (K, 4) from letterboxed input pixels to clipped original image pixels, as `scale_preds`."""
        return scale_boxes(pbatch["imgsz"], boxes.float().clone(), pbatch["ori_shape"], pbatch["ratio_pad"]).cpu()
