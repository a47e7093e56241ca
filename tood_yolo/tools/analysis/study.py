"""The alignment study of a model over a dataset split, or of a saved predictions.json against its annotations."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from ultralytics.utils import LOGGER
from ultralytics.utils.ops import ltwh2xyxy

from ...utils.coco import read_json
from .metrics import PRE_NMS_MISSING, AlignmentStats, count_detections
from .validator import AlignmentValidator


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
