"""The pre-NMS bound of TOOD models: NMS sees at most `nms_bound` candidates per image, the best-scored ones.

Why TOOD needs one: the aligned score sqrt(sigmoid(cls) * sigmoid(M)) lifts every small probability (sqrt(1e-4 * 0.5)
= 0.007), so at Ultralytics' validation threshold conf=0.001 nearly every (anchor, class) pair is a candidate of
multi-label NMS: 15,345 per image for tood-n's 5 classes on the main job's val (3,069 anchors at 384, the size
Ultralytics' rect validation pads its 256 px images to), ~680k for 80 classes and 8,525 anchors at 640, where
Ultralytics' own cap (`max_nms`, 30,000) is the only limit. Greedy NMS costs up to n^2 box comparisons in them.

Which bound: Ultralytics' `max_nms` of `non_max_suppression`, at k = `nms_bound` instead of 30,000: the k
best-scored candidates of each image after the conf threshold, over (anchor, class) pairs in multi-label validation
and over anchors (their best class) in prediction. Not the reference's per-level top-k (mmdet's
`filter_scores_and_topk`, `nms_pre=1000` on each level), because
- what costs is NMS over the whole image, and one number per image bounds it whatever the levels (P3-P5 or P3-P7:
  per level, `nms_pre` lets up to 3,000 or 5,000 candidates through);
- it is the cap Ultralytics already applies to its own models, with the same meaning of conf, iou and max_det;
- the head's output is the levels concatenated; a per-level top-k would need their sizes from the head.

How: Ultralytics applies `max_nms` after it has built a row for every candidate pair and sorted them all (a 680k-row
matrix and its sort for COCO-sized outputs). `top_anchors` first keeps the k anchors of each image with the highest
best-class score. Those hold the k best candidates: an anchor outside them has k anchors scored above its best class,
each with a pair above any of its own. So NMS with `max_nms=k` gets the same candidates from the (B, 4 + nc, k)
output as from the whole one (up to ties at the k-th score) and builds and sorts k * nc rows at most.

k = `MAX_NMS` (300), or `max_det` if larger: NMS returns at most max_det detections, and k = max_det is the smallest
bound with which it still can. What goes is the tail of the detections (the bounded output is the first detections
of the unbounded one: a candidate's suppressors all score above it, so they are among the k best too). Greedy NMS
costs more than linearly in k: on the main job's synthetic val (tood-n, 15,345 candidates per image at 384) k = 300
took 1.5x yolov8n's post-processing and k = 1000 (the reference's `nms_pre`) 4x, for the same mAP50-95 as no bound
(0.3918 and 0.3920 against 0.3920; benchmarks/postprocess.py, docs/results.md).

Which models: those with a T-head (`needs_bound`). A PyTorch model without one that is validated or predicted through
TOOD's classes (Ultralytics' Detect in the ablation or the alignment study) keeps Ultralytics' cap, so that it is
evaluated exactly as Ultralytics evaluates it. An export shows no modules; TOOD's classes bound it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.head import TOODHead

MAX_NMS = 300
ULTRALYTICS_MAX_NMS = 30_000  # non_max_suppression's default cap


def needs_bound(model: torch.nn.Module) -> bool:
    """Whether NMS's candidates are bounded for `model` (a model, or Ultralytics' AutoBackend around one): it holds a
    T-head, or it is an export (format other than "pt"), whose modules cannot be seen."""
    if getattr(model, "format", "pt") != "pt":
        return True
    module = getattr(model, "model", model)  # AutoBackend's PyTorch model (its backend's), or the model's layers
    return isinstance(module, torch.nn.Module) and any(isinstance(m, TOODHead) for m in module.modules())


def nms_bound(max_nms: int, max_det: int) -> int:
    """Candidates per image given to NMS: `max_nms`, but never fewer than `max_det`, so NMS can still return max_det."""
    return max(max_nms, max_det)


def top_anchors(
    preds: torch.Tensor | Sequence[torch.Tensor], k: int, nc: int, classes: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k anchors of each image with the highest best-class score, in their original order.

    Args:
        preds (torch.Tensor | Sequence[torch.Tensor]): (B, 4 + nc + extra, A) boxes, class scores and extra channels
            (Ultralytics' inference layout), or a tuple whose first element is that tensor (a model in eval mode).
        k (int): Anchors kept per image.
        nc (int): Number of classes (the score channels 4 .. 4 + nc).
        classes (Sequence[int], optional): The `classes=` filter of best-class NMS (prediction): an anchor whose best
            class is not one of them is no candidate there, so it is ranked last.

    Returns:
        (torch.Tensor): (B, 4 + nc + extra, min(k, A)) the kept anchors' channels (`preds` itself when A <= k).
        (torch.Tensor | None): (B, min(k, A)) their indices in the A anchors, None when every anchor is kept.
    """
    if isinstance(preds, (list, tuple)):
        preds = preds[0]
    if preds.shape[-1] <= k:
        return preds, None
    score, best = preds[:, 4 : 4 + nc].max(1)  # (B, A)
    if classes is not None:
        score = score.masked_fill(~torch.isin(best, torch.as_tensor(classes, device=best.device)), -1.0)
    idx = score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # the anchors' order: NMS breaks ties alike
    return preds.gather(2, idx[:, None].expand(-1, preds.shape[1], -1)), idx
