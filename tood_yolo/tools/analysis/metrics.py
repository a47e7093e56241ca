"""The alignment measures of one image and their sums over a dataset, by the rules of the package docstring."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ultralytics.utils.metrics import box_iou

COUNT_KEYS = ("correct", "redundant", "error", "background")
PRE_NMS_MISSING = "post-NMS counts only: pre-NMS metrics are not available from a predictions.json"


def _tensor(x: torch.Tensor | np.ndarray | list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Accept arrays and lists as well as tensors, on the CPU, so the functions below can be fed hand-built data."""
    return torch.as_tensor(x, dtype=dtype).cpu()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Return 1-based ranks of `x` (K,) as float64 (K,), ties sharing the mean of the positions they span."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based position of the last member of each group of equal values
    return (last - (counts - 1) / 2)[inverse]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return the Pearson correlation of the average ranks of `a` (K,) and `b` (K,) (Spearman's rho), NaN if undefined.

    It is undefined for K < 2 or when either input is constant (a rank vector with zero variance).
    """
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    return (ra @ rb / denom).item() if denom > 0 else math.nan


def assign_predictions(
    boxes: torch.Tensor, classes: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each prediction to the same-class GT it overlaps most (IoU > 0; IoU ties go to the lower GT index).

    Args:
        boxes (torch.Tensor): Predicted boxes (N, 4), xyxy.
        classes (torch.Tensor): Predicted classes (N,).
        gt_boxes (torch.Tensor): GT boxes (M, 4), xyxy, same space as `boxes`.
        gt_classes (torch.Tensor): GT classes (M,).

    Returns:
        assigned (torch.Tensor): GT index of each prediction (N,), int64, -1 where unassigned.
        iou (torch.Tensor): IoU with that GT (N,), 0 where unassigned.
    """
    boxes, gt_boxes = _tensor(boxes).reshape(-1, 4), _tensor(gt_boxes).reshape(-1, 4)
    classes, gt_classes = _tensor(classes, torch.long), _tensor(gt_classes, torch.long)
    assigned, best = torch.full((len(boxes),), -1, dtype=torch.long), torch.zeros(len(boxes))
    for c in gt_classes.unique():  # per class: an (N_c, M_c) IoU matrix, not (N, M), for crowded multi-class images
        p, g = (classes == c).nonzero().squeeze(1), (gt_classes == c).nonzero().squeeze(1)
        if len(p):
            iou, j = box_iou(boxes[p], gt_boxes[g]).max(1)  # first maximum: lowest GT index on ties
            keep = iou > 0
            assigned[p[keep]], best[p[keep]] = g[j[keep]], iou[keep]
    return assigned, best


def instance_alignment(
    scores: torch.Tensor, ious: torch.Tensor, assigned: torch.Tensor, num_gt: int, topk: int = 50, topk_iou: int = 10
) -> dict[str, torch.Tensor]:
    """Score-IoU alignment of the predictions assigned to each GT instance.

    Args:
        scores (torch.Tensor): Prediction scores (N,).
        ious (torch.Tensor): IoU of each prediction with its assigned GT (N,).
        assigned (torch.Tensor): GT index of each prediction (N,), -1 for none.
        num_gt (int): Number of GT instances M.
        topk (int): Predictions per instance, best scores first, that enter the rank correlation.
        topk_iou (int): Predictions per instance, best scores first, whose IoUs are averaged.

    Returns:
        (dict[str, torch.Tensor]): Per instance (M,): `corr` rank correlation (float64, NaN where undefined),
            `top_iou` mean IoU of the top-`topk_iou` (float64, NaN without predictions), `n` assigned predictions.
    """
    scores, ious, assigned = _tensor(scores), _tensor(ious), _tensor(assigned, torch.long)
    corr = torch.full((num_gt,), math.nan, dtype=torch.float64)
    top_iou = torch.full((num_gt,), math.nan, dtype=torch.float64)
    order = scores.argsort(descending=True, stable=True)
    order = order[assigned[order] >= 0]
    order = order[assigned[order].argsort(stable=True)]  # grouped by GT, still best score first within each group
    n = torch.bincount(assigned[order], minlength=num_gt)
    for j, idx in enumerate(order.split(n.tolist())):
        if len(idx):
            top = idx[:topk]
            corr[j] = rank_correlation(scores[top], ious[top])
            top_iou[j] = ious[idx[:topk_iou]].double().mean()
    return {"corr": corr, "top_iou": top_iou, "n": n}


def pre_nms_alignment(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    topk: int = 50,
    topk_iou: int = 10,
) -> dict[str, torch.Tensor]:
    """Assign one image's pre-NMS predictions to its GTs and measure each instance's alignment.

    Args:
        boxes (torch.Tensor): Predicted boxes (N, 4), xyxy.
        scores (torch.Tensor): Scores (N,).
        classes (torch.Tensor): Classes (N,).
        gt_boxes (torch.Tensor): GT boxes (M, 4), xyxy.
        gt_classes (torch.Tensor): GT classes (M,).
        topk (int): Predictions per instance in the rank correlation.
        topk_iou (int): Predictions per instance in the mean IoU.

    Returns:
        (dict[str, torch.Tensor]): See `instance_alignment`, one entry per GT (M,).
    """
    assigned, ious = assign_predictions(boxes, classes, gt_boxes, gt_classes)
    return instance_alignment(scores, ious, assigned, len(_tensor(gt_classes)), topk, topk_iou)


def count_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    match_iou: float = 0.5,
    error_iou: float = 0.1,
) -> dict[str, int]:
    """Count one image's post-NMS detections as correct, redundant, error or background (rules in the module doc).

    Args:
        boxes (torch.Tensor): Detected boxes (N, 4), xyxy, already thresholded and NMS-ed.
        scores (torch.Tensor): Scores (N,).
        classes (torch.Tensor): Classes (N,).
        gt_boxes (torch.Tensor): GT boxes (M, 4), xyxy.
        gt_classes (torch.Tensor): GT classes (M,).
        match_iou (float): IoU from which a detection hits a GT (correct or redundant).
        error_iou (float): IoU above which a miss counts as an error rather than background.

    Returns:
        (dict[str, int]): `detections` (N) and the counts under `correct`, `redundant`, `error`, `background`.
    """
    boxes, gt_boxes = _tensor(boxes).reshape(-1, 4), _tensor(gt_boxes).reshape(-1, 4)
    classes, gt_classes = _tensor(classes, torch.long), _tensor(gt_classes, torch.long)
    order = _tensor(scores).argsort(descending=True, stable=True)
    iou = box_iou(boxes[order], gt_boxes) * (classes[order, None] == gt_classes[None])  # (N, M) same-class IoU
    best = iou.amax(1) if len(gt_boxes) else torch.zeros(len(boxes))
    hit = best >= match_iou
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    correct = 0
    for i in hit.nonzero().flatten().tolist():  # in score order: a GT goes to its highest-scoring hit
        free = iou[i].masked_fill(matched, 0)
        j = free.argmax()
        if free[j] >= match_iou:
            matched[j] = True
            correct += 1
    n_hit, error = int(hit.sum()), int(((best > error_iou) & ~hit).sum())
    return {
        "detections": len(boxes),
        "correct": correct,
        "redundant": n_hit - correct,
        "error": error,
        "background": len(boxes) - n_hit - error,
    }


def dense_predictions(
    boxes: torch.Tensor, cls_scores: torch.Tensor, gt_classes: torch.Tensor, multi_label: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn one image's dense head output into a flat list of pre-NMS predictions.

    Args:
        boxes (torch.Tensor): Box of each anchor (A, 4), xyxy.
        cls_scores (torch.Tensor): Per-class scores of each anchor (A, nc).
        gt_classes (torch.Tensor): The image's GT classes (M,); with `multi_label`, only these classes are built.
        multi_label (bool): One prediction per anchor and GT class (True), or per anchor with its best class (False).

    Returns:
        boxes (torch.Tensor): (N, 4) xyxy, N = A * (number of distinct GT classes), or A without `multi_label`.
        scores (torch.Tensor): (N,).
        classes (torch.Tensor): (N,) int64.
    """
    boxes, cls_scores = _tensor(boxes).reshape(-1, 4), _tensor(cls_scores)
    if not multi_label:
        scores, classes = cls_scores.max(1)
        return boxes, scores, classes
    present = _tensor(gt_classes, torch.long).unique()
    return (
        boxes.repeat(len(present), 1),
        cls_scores[:, present].T.flatten(),
        present.repeat_interleave(len(boxes)),
    )


def _mean(x: torch.Tensor) -> float | None:
    """Mean of the finite entries of `x`, None when there are none (JSON- and CSV-friendly)."""
    x = x[x.isfinite()]
    return x.mean().item() if len(x) else None


@dataclass
class AlignmentStats:
    """Accumulate per-image alignment results over a dataset and summarise them.

    Attributes:
        images (int): Images seen.
        instances (int): GT instances seen.
        counts (Counter): Post-NMS detection counts (see `count_detections`).
        corr (list[torch.Tensor]): Per-instance rank correlations, one (M,) tensor per image with pre-NMS results.
        top_iou (list[torch.Tensor]): Per-instance top-k mean IoUs, one (M,) tensor per image with pre-NMS results.
    """

    images: int = 0
    instances: int = 0
    counts: Counter = field(default_factory=Counter)
    corr: list[torch.Tensor] = field(default_factory=list)
    top_iou: list[torch.Tensor] = field(default_factory=list)

    def update(self, num_gt: int, counts: dict[str, int], alignment: dict[str, torch.Tensor] | None = None) -> None:
        """Add one image: its GT count, its post-NMS counts and, when available, its pre-NMS instance alignment."""
        self.images += 1
        self.instances += num_gt
        self.counts.update(counts)
        if alignment is not None:
            self.corr.append(alignment["corr"])
            self.top_iou.append(alignment["top_iou"])

    def summary(self) -> dict[str, Any]:
        """Return dataset totals: instance means and counts (None without pre-NMS data), counts and percentages."""
        corr = torch.cat(self.corr) if self.corr else torch.zeros(0, dtype=torch.float64)
        top_iou = torch.cat(self.top_iou) if self.top_iou else torch.zeros(0, dtype=torch.float64)
        detections = self.counts["detections"]
        return {
            "images": self.images,
            "instances": self.instances,
            "ranked": int(corr.isfinite().sum()) if self.corr else None,
            "rank_corr": _mean(corr),
            "located": int(top_iou.isfinite().sum()) if self.corr else None,
            "top_iou": _mean(top_iou),
            "detections": detections,
            **{k: self.counts[k] for k in COUNT_KEYS},
            **{f"{k}_pct": 100 * self.counts[k] / max(detections, 1) for k in COUNT_KEYS},
        }
