"""COCO box AP of a TOOD model under the reference's test protocol (how the paper's numbers were measured).

Usage:
    python -m tood_yolo.tools.evaluate model=tood-r50.pt images=path/to/val2017 \\
        annotations=path/to/instances_val2017.json [max_images=N] [out=detections.json] [device=cpu] [half=False]

prints pycocotools' 12-number AP/AR table and writes the detections in COCO's results format. `model` is an Ultralytics
checkpoint (e.g. from `python -m tood_yolo.tools.convert`, or a trained `best.pt`); in Python, `evaluate(model, ...)`
also takes a loaded model or any module with the same output.

The protocol is mmdetection 3.3.0's for tood_r50_fpn_1x_coco (test pipeline + test_cfg), one image per batch:

- Resize keeping the aspect ratio so the shorter side is 800 and the longer at most 1333 (mmcv `rescale_size`:
  factor = min(1333 / long, 800 / short), new size int(side * factor + 0.5)), bilinear (cv2 INTER_LINEAR) on the
  uint8 image; RGB.
- Pad bottom/right to a multiple of 32. The reference pads *after* its mean/std normalisation with 0, i.e. with the
  mean colour: for a ResNet model (which normalises inside) the pad is the ImageNet mean, so the normalised padding is 0
  exactly as in the reference; other backbones get Ultralytics' grey 114.
- Per FPN level: keep the (anchor, class) pairs with score > 0.05, then the 1000 best of them (`nms_pre`, mmdet's
  `filter_scores_and_topk`, per level and not per image). The levels are read from the TOODHead's inputs; a model
  without one (e.g. an ablation twin with Ultralytics' Detect) is treated as a single level.
- Rescale the boxes to the original image (divide by the separate w and h factors of the resize), drop boxes of zero
  width or height (`min_bbox_size=0`), class-aware NMS at IoU 0.6 (`torchvision.ops.batched_nms`, as mmcv's), keep the
  100 best per image. Boxes are not clipped to the image (TOODHead's post-processing does not clip).
- Score with pycocotools against the annotation file. The model's class i is the i-th category id of the annotation
  file's categories in sorted order (COCO's 80 ids 1..90 for Ultralytics' 0..79).

What Ultralytics' own `yolo val model=tood-r50.pt imgsz=...` does differently (costs not measured here: that needs the
released weights and COCO val2017):

- Square letterbox instead of keep-ratio 800x1333: the image is scaled so its *longer* side is `imgsz`. At imgsz=640 a
  640x480 COCO image is seen at 640x480 instead of 1067x800, so objects are 1.67x smaller than the model was trained on
  and small objects lose most (AP_small drops the most; the total AP is several points lower). The converted checkpoint
  stores imgsz=1024 (a 640x480 image -> 1024x768; Ultralytics wants a multiple of the largest stride, 128), which
  brings the scale close to the reference.
- Centred padding (half on each side, grey 114) instead of bottom/right padding with the mean colour: the image is
  shifted by the half-pad against the anchor grid and the padding is not 0 after normalisation, so border regions differ
  slightly; with `rect=True` (its validation default) the padding is minimal.
- conf 0.001 instead of score_thr 0.05: many more low-score boxes (usually a slightly higher COCO AP, never a lower
  recall).
- NMS IoU 0.7 instead of 0.6: more overlapping boxes survive (helps crowded scenes, adds duplicates elsewhere).
- max_det 300 instead of 100: COCO's AP uses at most 100 per image; Ultralytics' own mAP counts all 300.
- No per-level top-1000: its NMS takes up to 30000 candidates over all levels.
- Ultralytics computes its own mAP (101-point, its own matching); only with save_json=True on COCO does it also run
  pycocotools, and its boxes are clipped to the image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from ..data.reference import SCALE, padded_shape, resize_keep_ratio
from ..nn.backbone import IMAGENET_MEAN, input_pad_value
from ..nn.head import TOODHead
from ..utils.coco import coco_eval, load_gt

SCORE_THR = 0.05
NMS_PRE = 1000  # per level
IOU_THR = 0.6
MAX_PER_IMG = 100
MIN_BBOX_SIZE = 0


# ----------------------------------------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------------------------------------
def preprocess(
    img: np.ndarray, pad_value: tuple[float, ...] = tuple(IMAGENET_MEAN), scale: tuple[int, int] = SCALE
) -> tuple[torch.Tensor, tuple[float, float]]:
    """BGR uint8 image (H, W, 3) -> ((1, 3, Hp, Wp) RGB float tensor in [0, 1], (w_scale, h_scale)).

    The image sits at the top left; the bottom/right padding has colour `pad_value`.
    """
    h, w = img.shape[:2]
    resized = resize_keep_ratio(img, scale)
    nh, nw = resized.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(resized[..., ::-1].transpose(2, 0, 1))).float() / 255
    ph, pw = padded_shape(nh, nw)
    out = torch.tensor(pad_value, dtype=torch.float32).view(3, 1, 1).repeat(1, ph, pw)
    out[:, :nh, :nw] = x
    return out[None], (nw / w, nh / h)


# ----------------------------------------------------------------------------------------------------------------------
# Inference and post-processing
# ----------------------------------------------------------------------------------------------------------------------
class LevelSizes:
    """Records the anchors per FPN level of the last forward of a TOOD model (a pre-hook on its TOODHead)."""

    def __init__(self, model: nn.Module):
        heads = [m for m in model.modules() if isinstance(m, TOODHead)]
        self.counts: list[int] | None = None
        self.handle = heads[0].register_forward_pre_hook(self._hook) if heads else None

    def _hook(self, module, args):
        self.counts = [x.shape[2] * x.shape[3] for x in args[0]]

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def postprocess(
    pred: torch.Tensor,
    level_counts: list[int],
    scale_factor: tuple[float, float] = (1.0, 1.0),
    score_thr: float = SCORE_THR,
    nms_pre: int = NMS_PRE,
    iou_thr: float = IOU_THR,
    max_det: int = MAX_PER_IMG,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's (4 + nc, A) output (xywh pixel boxes, scores) -> xyxy boxes in the original image, scores, labels.

    Follows mmdet's TOODHead `_predict_by_feat_single` + `_bbox_post_process` (see the module docstring).
    """
    pred = pred.float()
    xy, wh = pred[:2].T, pred[2:4].T
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    scores = pred[4:].T  # (A, nc)
    out_boxes, out_scores, out_labels = [], [], []
    for b, s in zip(boxes.split(level_counts), scores.split(level_counts)):
        valid = s > score_thr
        kept = s[valid]
        idx = valid.nonzero()  # (n, 2): anchor, class
        kept, order = kept.sort(descending=True)
        kept, idx = kept[:nms_pre], idx[order[:nms_pre]]
        out_boxes.append(b[idx[:, 0]])
        out_scores.append(kept)
        out_labels.append(idx[:, 1])
    boxes, scores, labels = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    boxes = boxes / boxes.new_tensor(scale_factor).repeat(2)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w > MIN_BBOX_SIZE) & (h > MIN_BBOX_SIZE)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if boxes.numel():
        keep = batched_nms(boxes, scores, labels, iou_thr)[:max_det]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return boxes, scores, labels


@torch.inference_mode()
def predict(model: nn.Module, img: np.ndarray, device: str | torch.device = "cpu", half: bool = False, **kwargs):
    """Detections (xyxy boxes in image pixels, scores, 0-based labels) for one BGR image, the reference's way."""
    x, scale_factor = preprocess(img, input_pad_value(model))
    x = x.to(device)
    sizes = LevelSizes(model)
    try:
        y = model(x.half() if half else x)
    finally:
        sizes.close()
    y = y[0] if isinstance(y, (list, tuple)) else y
    counts = sizes.counts or [y.shape[-1]]
    return postprocess(y[0].cpu(), counts, scale_factor, **kwargs)


def load_model(model: str | Path | nn.Module, device: str | torch.device = "cpu", half: bool = False) -> nn.Module:
    """An eval-mode model from a module, an Ultralytics `.pt` checkpoint, or a model YAML (random weights).

    A `.pt` is loaded by Ultralytics' `load_checkpoint`, as `yolo val` loads it: fully unpickled (it pickles the model's
    classes), so a `.pt` of your own or from a source you trust. An mmdet `.pth` is converted first by
    `python -m tood_yolo.tools.convert`, which reads it without running code from it.
    """
    if isinstance(model, (str, Path)):
        path = str(model)
        if path.endswith(".pt"):
            from ultralytics.nn.tasks import load_checkpoint

            model = load_checkpoint(path)[0]
        elif path.endswith((".yaml", ".yml")):
            from ..nn.model import TOODDetectionModel

            model = TOODDetectionModel(path, verbose=False)
        else:
            hint = " (convert an mmdet .pth first: python -m tood_yolo.tools.convert)" if path.endswith(".pth") else ""
            raise ValueError(f"model must be an Ultralytics .pt checkpoint or a model .yaml, got '{path}'{hint}")
    model = model.to(device).eval()
    return model.half() if half else model.float()


# ----------------------------------------------------------------------------------------------------------------------
# COCO evaluation
# ----------------------------------------------------------------------------------------------------------------------
def evaluate(
    model: str | Path | nn.Module,
    images: str | Path,
    annotations: str | Path,
    max_images: int | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    half: bool = False,
    verbose: bool = True,
) -> dict[str, float]:
    """Detect on the annotated images of `annotations` (found under `images`), write COCO results json, score with
    pycocotools. Returns COCO's 12 statistics by name (`tood_yolo.utils.coco.COCO_STATS`), and `n_images`,
    `n_detections`."""
    coco = load_gt(annotations)  # before the model: a bad annotation file fails at once
    model = load_model(model, device, half)
    cat_ids = sorted(coco.getCatIds())
    head = next((m for m in model.modules() if hasattr(m, "nc")), None)
    nc = getattr(head, "nc", None)
    if nc is not None and nc != len(cat_ids):
        raise ValueError(f"the model has {nc} classes but {annotations} has {len(cat_ids)} categories")
    img_ids = sorted(coco.getImgIds())[:max_images]
    results = []
    for n, img_id in enumerate(img_ids):
        info = coco.loadImgs(img_id)[0]
        file = Path(images) / info["file_name"]
        img = cv2.imread(str(file))
        if img is None:
            raise FileNotFoundError(f"cannot read image '{file}' (image id {img_id})")
        boxes, scores, labels = predict(model, img, device, half)
        for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append(
                {"image_id": img_id, "category_id": cat_ids[c], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            )
        if verbose and (n + 1) % 100 == 0:
            print(f"{n + 1}/{len(img_ids)} images")
    out = Path(out) if out else Path("runs") / "tood_eval" / "detections.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results))
    stats = coco_eval(results, coco, img_ids=img_ids, print_fn=print if verbose else None)
    if verbose:
        print(f"Detections of {len(img_ids)} images written to {out}")
    return {**stats, "n_images": len(img_ids), "n_detections": len(results)}


def _usage() -> str:
    return __doc__.split("\n\n")[1]


def _parse(argv: list[str]) -> dict:
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value, got '{a}'\n{_usage()}")
        args[key.lstrip("-")] = value
    unknown = set(args) - {"model", "images", "annotations", "max_images", "out", "device", "half"}
    missing = {"model", "images", "annotations"} - set(args)
    if unknown or missing:
        raise SystemExit(f"unknown {sorted(unknown)} / missing {sorted(missing)} arguments\n{_usage()}")
    if "max_images" in args:
        args["max_images"] = int(args["max_images"])
    if "half" in args:
        args["half"] = args["half"].lower() in {"1", "true", "yes"}
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    return evaluate(**_parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
