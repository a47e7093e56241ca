"""COCO json: reading a results or annotation file, and scoring detections with pycocotools (the official COCO
evaluation). The one owner of both: `TOODDetectionValidator` (`save_json=True`), `tood_yolo.tools.coco`,
`tood_yolo.tools.evaluate` and the alignment study (`tood_yolo.tools.analysis`) import them from here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

from ultralytics.utils import LOGGER

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def read_json(path: str | Path) -> Any:
    """The contents of a JSON file; a missing, truncated or damaged file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or damaged?): {e}") from e


def _quiet(fn, *args, **kwargs):
    """Call a pycocotools function with its progress prints captured; returns (result, captured text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args, **kwargs)
    return out, buf.getvalue()


def load_gt(annotations: str | Path | dict):
    """A pycocotools COCO object from an annotation file or an in-memory COCO dict (copied)."""
    from pycocotools.coco import COCO

    gt = COCO()
    if isinstance(annotations, dict):
        gt.dataset = copy.deepcopy(annotations)
    else:
        gt.dataset = read_json(annotations)
    gt.dataset.setdefault("images", [])
    gt.dataset.setdefault("annotations", [])
    gt.dataset.setdefault("categories", [])
    _quiet(gt.createIndex)
    return gt


def coco_eval(
    predictions: str | Path | list[dict],
    annotations: str | Path | dict | Any,
    img_ids: list | None = None,
    iou_type: str = "bbox",
    print_fn: Any = LOGGER.info,
) -> dict[str, float]:
    """Score COCO-format detections with pycocotools and return COCO's 12 statistics by name (`COCO_STATS`).

    Args:
        predictions (str | Path | list[dict]): Results json or list of {image_id, category_id, bbox (ltwh), score}
            (not modified).
        annotations (str | Path | dict | pycocotools.coco.COCO): Ground truth.
        img_ids (list, optional): Images to evaluate; default every image of the ground truth.
        iou_type (str): "bbox" (or "segm"/"keypoints" with matching inputs).
        print_fn (callable, optional): Where pycocotools' AP/AR table goes (LOGGER.info; None: nowhere).

    Returns:
        (dict[str, float]): AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl (-1 where pycocotools has no
            ground truth for an area range); all 0 without predictions.
    """
    from pycocotools.cocoeval import COCOeval

    gt = annotations if hasattr(annotations, "loadRes") else load_gt(annotations)
    dets = read_json(predictions) if isinstance(predictions, (str, Path)) else predictions
    if not dets:
        if print_fn:
            print_fn("pycocotools: no detections, every COCO statistic is 0")
        return dict.fromkeys(COCO_STATS, 0.0)
    dt, _ = _quiet(gt.loadRes, copy.deepcopy(list(dets)))  # loadRes adds area/id/segmentation to what it gets
    ev = COCOeval(gt, dt, iou_type)
    if img_ids is not None:
        ev.params.imgIds = list(img_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _, table = _quiet(ev.summarize)
    if print_fn:
        print_fn(f"pycocotools COCO {iou_type} evaluation:\n{table.rstrip()}")
    return {k: float(v) for k, v in zip(COCO_STATS, ev.stats)}
