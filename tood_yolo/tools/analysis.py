"""TOOD's alignment study (Feng et al., ICCV 2021) as a tool for any Ultralytics detection model.

TOOD claims that its highest-scoring prediction for an object is also its best-localised one. The paper measures it
in two ways, both reproduced here for one image at a time and summed over a dataset:

- Before NMS: every prediction is assigned to a ground-truth (GT) instance; for each instance the top-50 predictions by
  score are taken, and the Pearson correlation between their classification ranking and their localisation (IoU)
  ranking is computed (Pearson on ranks, i.e. Spearman's rho), together with the mean IoU of the top-10 by score.
- After NMS: detections are counted as correct (IoU >= 0.5, first by score for its GT), redundant (IoU >= 0.5 with a GT
  that a higher-scoring detection already took: a duplicate) or error (0.1 < IoU < 0.5).

Rules where the paper is silent (fixed here so that numbers are comparable between models):

- Pre-NMS predictions are multi-label, like Ultralytics' val NMS (multi_label=True): each anchor gives one prediction
  per class (box, that class's score). Only classes present in the image's GT are built, as no other class can be
  assigned. No score threshold is applied before NMS: the top-50 selection is the filter (and untrained models stay
  measurable).
- Assignment: a prediction goes to the GT of its own class with which it has the highest IoU, provided that IoU > 0;
  IoU ties go to the lower GT index. Predictions overlapping no same-class GT are left out.
- Score ties in the top-k selection go to the lower prediction index (stable sort). Rank ties take average ranks
  (scipy.stats.rankdata's "average"), so the correlation is exactly Spearman's rho with ties.
- An instance's correlation is undefined, and the instance left out of the mean correlation, when it has fewer than 2
  assigned predictions or when all its top-k scores or all its top-k IoUs are equal. Its top-10 mean IoU is the mean
  over the (up to 10) predictions it has; instances with no prediction are left out of that mean. Both means are plain
  averages over instances; `ranked` and `located` count the instances in each.
- After NMS, detections are those with score > conf (Ultralytics' NMS keeps score > conf; default conf=0.001, the
  value `yolo val` uses). Matching is class-aware and greedy in descending score order, COCO-style: a detection takes
  the not-yet-matched same-class GT with the highest IoU >= 0.5 (correct); failing that, IoU >= 0.5 with an already
  matched same-class GT makes it redundant; failing that, a best same-class IoU in (0.1, 0.5) makes it an error; any
  other detection is background. Percentages are of all post-NMS detections, background included (0 when none).
- The runner maps boxes (pre- and post-NMS) and GTs back to original image pixels and clips boxes to the image, as
  Ultralytics' results and predictions.json do, so its post-NMS counts equal those `json_alignment` finds in the
  predictions.json of the same val run.

Usage:
    $ python -m tood_yolo.tools.analysis model=yolov8n.pt,tood-s.pt data=coco8.yaml split=val imgsz=640
    $ python -m tood_yolo.tools.analysis predictions=runs/detect/val/predictions.json annotations=instances_val2017.json
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultralytics.utils import LOGGER
from ultralytics.utils.files import increment_path
from ultralytics.utils.metrics import box_iou
from ultralytics.utils.ops import ltwh2xyxy, scale_boxes, xywh2xyxy

from .cli import parse_tool_args
from ..engine.validator import TOODDetectionValidator, read_json

__all__ = (
    "AlignmentStats",
    "AlignmentValidator",
    "alignment_study",
    "assign_predictions",
    "average_ranks",
    "count_detections",
    "dense_predictions",
    "instance_alignment",
    "json_alignment",
    "main",
    "pre_nms_alignment",
    "rank_correlation",
)

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


def alignment_study(
    model: str | Path | Any,
    data: str | Path,
    split: str = "val",
    imgsz: int = 640,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    device: str = "cpu",
    topk: int = 50,
    topk_iou: int = 10,
    multi_label: bool = True,
) -> dict[str, Any]:
    """Run TOOD's alignment study of an Ultralytics detection model on a dataset split.

    Args:
        model (str | Path | ultralytics.engine.model.Model): Weights or model YAML path, or a YOLO object.
        data (str | Path): Dataset YAML.
        split (str): Dataset split to use.
        imgsz (int): Inference size, letterboxed as in `yolo val` (rect batches).
        batch (int): Batch size.
        conf (float): Score threshold of the NMS, hence of the post-NMS counts (pre-NMS data is not thresholded).
        iou (float): NMS IoU threshold.
        max_det (int): Maximum detections per image after NMS.
        device (str): Device, as in Ultralytics.
        topk (int): Predictions per instance in the rank correlation (50 in the paper).
        topk_iou (int): Predictions per instance in the mean IoU (10 in the paper).
        multi_label (bool): Pre-NMS predictions per anchor and class (True) or per anchor with its best class (False).

    Returns:
        (dict[str, Any]): `model`, the `AlignmentStats.summary` keys, `map50_95` and `map50` of the same val run, and
            settings.
    """
    from ultralytics import YOLO
    from ultralytics.engine.model import Model

    yolo = model if isinstance(model, Model) else YOLO(model)
    name = str(model) if isinstance(model, (str, Path)) else str(yolo.ckpt_path or yolo.model_name or "model")
    args = {
        **yolo.overrides,
        "rect": True,  # what YOLO.val uses
        "data": str(data),
        "split": split,
        "imgsz": imgsz,
        "batch": batch,
        "conf": conf,
        "iou": iou,
        "max_det": max_det,
        "device": device,
        "plots": False,
        "save_json": False,
        "save_txt": False,
        "nms": True,  # NMS-free heads must give their dense one-to-many output: the study is about pre-NMS predictions
        "task": "detect",
        "mode": "val",
    }
    with tempfile.TemporaryDirectory() as tmp:  # the validator insists on a save_dir; nothing is saved with plots off
        validator = AlignmentValidator(
            save_dir=Path(tmp),
            args=args,
            _callbacks=yolo.callbacks,
            topk=topk,
            topk_iou=topk_iou,
            multi_label=multi_label,
        )
        stats = validator(model=yolo.model)
    return {
        "model": name,
        **validator.alignment.summary(),
        "map50_95": stats.get("metrics/mAP50-95(B)"),
        "map50": stats.get("metrics/mAP50(B)"),
        "split": split,
        "imgsz": imgsz,
        "conf": conf,
        "iou": iou,
    }


def json_alignment(
    predictions: str | Path, annotations: str | Path, conf: float | None = None, match_iou: float = 0.5
) -> dict[str, Any]:
    """Post-NMS counts from a `yolo val save_json=True` predictions.json and a COCO GT json (pre-NMS data is absent).

    Boxes are compared in original image pixels, as both files hold them. Predictions are matched to GT images by
    `image_id`, else by `file_name` (Ultralytics writes the image stem as id, which custom GT files may not use);
    crowd GTs (iscrowd=1) are left out, as COCO ignores them. Classes are compared as `category_id`: Ultralytics writes
    COCO's 91-class ids for COCO val2017 and class index + 1 for other sets, so the GT file must use the same ids.

    Args:
        predictions (str | Path): COCO-format detections, a list of {image_id, category_id, bbox (ltwh), score}.
        annotations (str | Path): COCO GT json with `images` and `annotations`.
        conf (float, optional): Extra score threshold (score > conf); None keeps what the file holds, already
            thresholded by the val run that wrote it.
        match_iou (float): IoU from which a detection hits a GT.

    Returns:
        (dict[str, Any]): `model` (the predictions path), the `AlignmentStats.summary` keys with None for the pre-NMS
            means, `conf` and a `note`.
    """
    gt, dets = read_json(annotations), read_json(predictions)
    ids = {img["id"] for img in gt["images"]}
    by_file = {Path(img["file_name"]).name: img["id"] for img in gt["images"] if "file_name" in img}
    gts, preds = {i: [] for i in ids}, {i: [] for i in ids}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            gts[a["image_id"]].append((*a["bbox"], a["category_id"]))
    unknown = 0
    for d in dets:
        image_id = d["image_id"] if d["image_id"] in ids else by_file.get(Path(str(d.get("file_name", ""))).name)
        if image_id is None:
            unknown += 1
        elif conf is None or d["score"] > conf:
            preds[image_id].append((*d["bbox"], d["score"], d["category_id"]))
    if unknown:
        LOGGER.warning(f"{unknown} detections in {predictions} match no image of {annotations} and are left out")

    stats = AlignmentStats()
    for i in ids:
        g = torch.tensor(gts[i], dtype=torch.float64).reshape(-1, 5)
        p = torch.tensor(preds[i], dtype=torch.float64).reshape(-1, 6)
        counts = count_detections(ltwh2xyxy(p[:, :4]), p[:, 4], p[:, 5], ltwh2xyxy(g[:, :4]), g[:, 4], match_iou)
        stats.update(len(g), counts)
    return {"model": str(predictions), **stats.summary(), "conf": conf, "note": PRE_NMS_MISSING}


CLI_DEFAULTS = {
    "model": None,
    "data": None,
    "split": "val",
    "imgsz": 640,
    "batch": 16,
    "conf": None,
    "iou": 0.7,
    "max_det": 300,
    "device": "cpu",
    "predictions": None,
    "annotations": None,
    "project": "runs/analysis",
    "name": "alignment",
    "exist_ok": False,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Parse Ultralytics-style `key=value` arguments over `CLI_DEFAULTS`; `model` and `predictions` take lists."""
    args = parse_tool_args(argv, CLI_DEFAULTS)
    for k in "model", "predictions":  # comma-separated lists, so several models go side by side
        args[k] = [s.strip() for s in str(args[k]).split(",") if s.strip()] if args[k] is not None else []
    if not args["model"] and not args["predictions"]:
        raise SyntaxError("give model=a.pt[,b.pt,...] with data=..., or predictions=...json with annotations=...json")
    if args["model"] and not args["data"]:
        raise SyntaxError("model=... needs data=path/to/data.yaml")
    if args["predictions"] and not args["annotations"]:
        raise SyntaxError("predictions=... needs annotations=path/to/instances.json (COCO GT)")
    return args


def _cell(value: Any, fmt: str) -> str:
    """Format a table cell, '-' for a missing value."""
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Lay the study's rows out side by side as a fixed-width text table."""
    header = ("Model", "Images", "Instances", "Rank corr", "Top IoU", "Dets", "Correct", "Redundant", "Error")
    lines = [
        (
            r["model"],
            str(r["images"]),
            str(r["instances"]),
            _cell(r["rank_corr"], ".4f"),
            _cell(r["top_iou"], ".4f"),
            str(r["detections"]),
            *(f"{r[k]} ({r[f'{k}_pct']:.1f}%)" for k in ("correct", "redundant", "error")),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*line) for line in (header, *lines))


def save_results(rows: list[dict[str, Any]], settings: dict[str, Any], save_dir: Path) -> tuple[Path, Path]:
    """Write the rows to `alignment.json` (with the settings) and `alignment.csv` in `save_dir`."""
    json_file, csv_file = save_dir / "alignment.json", save_dir / "alignment.csv"
    json_file.write_text(json.dumps({"settings": settings, "results": rows}, indent=2))
    fields = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    with open(csv_file, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_file, csv_file


def main(argv: list[str] | None = None) -> Path:
    """Command line: run the study for each model and/or predictions file, print a table, save json and csv.

    Args:
        argv (list[str], optional): `key=value` arguments (see `CLI_DEFAULTS`); sys.argv[1:] when None.

    Returns:
        (Path): The run folder holding alignment.json and alignment.csv.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    val_args = {k: args[k] for k in ("split", "imgsz", "batch", "iou", "max_det", "device")}
    conf = 0.001 if args["conf"] is None else args["conf"]  # `yolo val`'s default
    rows = [alignment_study(m, args["data"], conf=conf, **val_args) for m in args["model"]]
    rows += [json_alignment(p, args["annotations"], args["conf"]) for p in args["predictions"]]

    save_dir = increment_path(Path(args["project"]) / args["name"], exist_ok=args["exist_ok"], mkdir=True)
    json_file, csv_file = save_results(rows, {k: v for k, v in args.items() if k not in ("project", "name")}, save_dir)
    print(format_table(rows))
    if args["predictions"]:
        print(f"Note: {PRE_NMS_MISSING} (rows from predictions=...)")
    print(f"Results saved to {json_file} and {csv_file}")
    return save_dir


if __name__ == "__main__":
    main()
