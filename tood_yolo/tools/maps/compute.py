"""The alignment maps of one image: the model's P, M, sqrt(P * M), offsets O and layer attention, level by level."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from ...nn.head import TOODHead

MAP_KEYS = ("p_map", "m_map", "aligned")
MAP_TITLES = {"p_map": "P = sigmoid(cls)", "m_map": "M = sigmoid(m)", "aligned": "sqrt(P*M)"}


class NotTOODError(TypeError):
    """The model has no TOODHead, so it has no M, O or layer attention to draw."""


@dataclass
class LevelMaps:
    """One FPN level's maps, as numpy arrays on the level's grid.

    Attributes:
        name (str): Level name, "P3" for stride 8.
        stride (int): Stride in input pixels.
        p_map (np.ndarray): (H, W) P = sigmoid(class logits) of the shown class (or the max over classes), float32 in
            [0, 1].
        m_map (np.ndarray): (H, W) the alignment map M = sigmoid(M logits), float32 in [0, 1].
        aligned (np.ndarray): (H, W) aligned score sqrt(P * M), float32 in [0, 1].
        cls_index (np.ndarray): (H, W) class each location of `p_map` shows (int64).
        offset (np.ndarray): (8, H, W) O in grid cells, [dy_x1, dx_x1, dy_y1, dx_y1, dy_x2, dx_x2, dy_y2, dx_y2].
        box (np.ndarray): (4, H, W) aligned xyxy boxes in input pixels.
        cls_attn (np.ndarray): (stacked_convs,) layer attention of the classification decomposition.
        reg_attn (np.ndarray): (stacked_convs,) layer attention of the regression decomposition.
    """

    name: str
    stride: int
    p_map: np.ndarray
    m_map: np.ndarray
    aligned: np.ndarray
    cls_index: np.ndarray
    offset: np.ndarray
    box: np.ndarray
    cls_attn: np.ndarray
    reg_attn: np.ndarray


@dataclass
class AlignmentMaps:
    """Everything `compute_alignment_maps` measured for one image.

    Attributes:
        image (np.ndarray): The letterboxed network input, BGR uint8 (h, w, 3).
        orig_shape (tuple[int, int]): Original image (height, width).
        levels (list[LevelMaps]): One entry per FPN level.
        names (dict[int, str]): Class names.
        cls (int | None): Class whose P is shown, None for the maximum over classes.
        anchor_offset (float): Anchor centre offset of the head (0 for TOOD: anchors at (j, i) * stride).
        top (list[dict]): Top-k locations by aligned score over all levels, best first: `level`, `i`, `j`, `score`,
            `cls`, `anchor` (x, y) and `tips` (4 sides' sampling points, x, y) in input pixels, `offset` (8,) in grid
            cells, `box` xyxy in input pixels.
    """

    image: np.ndarray
    orig_shape: tuple[int, int]
    levels: list[LevelMaps]
    names: dict[int, str]
    cls: int | None
    anchor_offset: float
    top: list[dict[str, Any]] = field(default_factory=list)


def _not_tood_message(what: str, head: nn.Module) -> str:
    return (
        f"alignment maps need a TOODHead (TOOD's M, O and layer attention), but {what} ends in "
        f"{type(head).__name__}. For any Ultralytics detection model, measure the alignment with TOOD's study "
        f"instead: python -m tood_yolo.tools.analysis model=<weights> data=<data.yaml>"
    )


def tood_model(model: Any) -> nn.Module:
    """Return the TOOD `DetectionModel` of a YOLO object, a weights/YAML path or a model; NotTOODError otherwise."""
    from ultralytics.engine.model import Model
    from ultralytics.utils.torch_utils import unwrap_model

    what = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        from ultralytics import YOLO

        model = YOLO(str(model))
    if isinstance(model, Model):
        what = str(model.ckpt_path or model.model_name or what)
        model = model.model
    model = unwrap_model(model) if isinstance(model, nn.Module) else model
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise NotTOODError(
            f"alignment maps need a PyTorch TOOD model (a TOODHead); got {what} ({type(model).__name__}). "
            f"For exported or other models use: python -m tood_yolo.tools.analysis model=<weights> data=<data.yaml>"
        )
    if not isinstance(layers[-1], TOODHead):
        raise NotTOODError(_not_tood_message(what, layers[-1]))
    return model


def _read_image(image: Any) -> np.ndarray:
    """A path, PIL image or array (BGR HWC, as Ultralytics takes arrays; 2-D is grayscale) -> BGR uint8 (H, W, 3)."""
    if isinstance(image, (str, Path)):
        im = cv2.imread(str(image))
        if im is None:
            raise FileNotFoundError(f"cannot read image {image}")
        return im
    if not isinstance(image, np.ndarray):  # PIL
        image = np.asarray(image.convert("RGB"))[..., ::-1]
    im = np.ascontiguousarray(image)
    if im.ndim == 2:
        im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    if im.ndim != 3 or im.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {im.shape}")
    if im.dtype != np.uint8:
        im = np.clip(im * 255 if im.max() <= 1 else im, 0, 255).astype(np.uint8)
    return im[..., :3].copy()


def letterbox(im: np.ndarray, imgsz: int | list[int], stride: int, rect: bool = True) -> np.ndarray:
    """Letterbox as Ultralytics' predictor (`LetterBox`, auto=rect with the model's largest stride, pad 114)."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.checks import check_imgsz

    imgsz = check_imgsz(imgsz, stride=stride, min_dim=2)
    return LetterBox(imgsz, auto=rect, stride=stride)(image=im)


def _resolve_class(cls: Any, names: dict[int, str]) -> int | str | None:
    """None/'max' -> None, 'top' -> 'top', a class index or name -> its index."""
    if cls is None or cls == "max":
        return None
    if cls == "top":
        return "top"
    if isinstance(cls, str) and not cls.lstrip("-").isdigit():
        ids = [i for i, n in names.items() if n == cls]
        if not ids:
            raise ValueError(f"cls={cls!r} is not a class name of this model; use max, top, an index or one of "
                             f"{list(names.values())[:10]}...")
        return ids[0]
    c = int(cls)
    if not 0 <= c < len(names):
        raise ValueError(f"cls={c} out of range for a model with {len(names)} classes")
    return c


@torch.no_grad()
def compute_alignment_maps(
    model: Any,
    image: Any,
    imgsz: int | list[int] = 640,
    conf: float = 0.0,
    topk: int = 20,
    cls: int | str | None = None,
    rect: bool = True,
) -> AlignmentMaps:
    """Run a TOOD model on one image and collect its per-level maps, offsets and layer attention.

    Args:
        model: A TOOD YOLO object, weights or YAML path, or DetectionModel (its training mode is restored).
        image: Image path, PIL image or BGR array.
        imgsz (int | list[int]): Inference size, rounded up to the largest stride (as `yolo predict`).
        conf (float): Only locations with aligned score > conf enter the top-k.
        topk (int): Number of top locations (by aligned score, over all levels) whose offsets are kept.
        cls (int | str | None): Class shown in P and the aligned score: None or "max" for the maximum over classes,
            "top" for the class of the top-scoring location, or a class index or name.
        rect (bool): Minimal-padding letterbox as `yolo predict` (True) or the square imgsz (False).

    Returns:
        (AlignmentMaps): The letterboxed image and the maps.
    """
    dm = tood_model(model)
    head: TOODHead = dm.model[-1]
    names = dict(getattr(dm, "names", None) or {i: str(i) for i in range(head.nc)})
    cls = _resolve_class(cls, names)
    strides = [int(s) for s in head.stride.tolist()]
    if not all(strides):
        raise ValueError("the TOOD head has no strides yet (build the model with TOODDetectionModel)")
    im0 = _read_image(image)
    im = letterbox(im0, imgsz, max(strides), rect)
    p = next(dm.parameters())
    x = torch.from_numpy(im[..., ::-1].transpose(2, 0, 1).copy()).to(p.device, p.dtype).div(255).unsqueeze(0)

    was_training, feats = dm.training, []
    hook = head.register_forward_pre_hook(lambda m, inp: feats.extend(inp[0]))  # the maps the model routes to the head
    dm.eval()
    try:
        dm(x)
        outs = head.forward_levels(feats)  # the head's own per-level pass, kept level by level
    finally:
        hook.remove()
        dm.train(was_training)

    if cls == "top":  # the class of the best aligned score anywhere
        best = max(((o["score"][0].float().amax(), k) for k, o in enumerate(outs)), key=lambda t: t[0])[1]
        s = outs[best]["score"][0].float()
        cls = int(s.flatten(1).amax(1).argmax())
    levels = []
    for i, o in enumerate(outs):
        p_all = o["cls_logits"][0].float().sigmoid()  # (nc, H, W)
        m_map = o["m_logits"][0, 0].float().sigmoid()
        if cls is None:
            p_map, idx = p_all.max(0)
        else:
            p_map, idx = p_all[cls], torch.full(p_all.shape[1:], cls, dtype=torch.long)
        stride = strides[i]
        levels.append(
            LevelMaps(
                name=f"P{round(math.log2(stride))}",
                stride=stride,
                p_map=p_map.cpu().numpy().astype(np.float32),
                m_map=m_map.cpu().numpy().astype(np.float32),
                aligned=(p_map * m_map).sqrt().cpu().numpy().astype(np.float32),
                cls_index=idx.cpu().numpy(),
                offset=o["offset"][0].float().cpu().numpy(),
                box=(o["box"][0].float() * stride).cpu().numpy(),
                cls_attn=o["cls_attn"][0].float().cpu().numpy(),
                reg_attn=o["reg_attn"][0].float().cpu().numpy(),
            )
        )
    maps = AlignmentMaps(im, tuple(im0.shape[:2]), levels, names, cls, float(head.anchor_offset))
    maps.top = top_locations(maps, topk, conf)
    return maps


def top_locations(maps: AlignmentMaps, topk: int, conf: float = 0.0) -> list[dict[str, Any]]:
    """The `topk` locations with the highest aligned score (> conf) over all levels, best first (ties: lower level,
    then row-major position)."""
    if topk <= 0:
        return []
    scores = np.concatenate([lv.aligned.ravel() for lv in maps.levels])
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] > conf][:topk]
    sizes = np.cumsum([0] + [lv.aligned.size for lv in maps.levels])
    ao, top = maps.anchor_offset, []
    for k in order.tolist():
        li = int(np.searchsorted(sizes, k, side="right") - 1)
        lv = maps.levels[li]
        i, j = divmod(k - int(sizes[li]), lv.aligned.shape[1])
        off = lv.offset[:, i, j]
        s = lv.stride
        top.append(
            {
                "level": lv.name,
                "stride": s,
                "i": i,
                "j": j,
                "score": float(lv.aligned[i, j]),
                "cls": int(lv.cls_index[i, j]),
                "anchor": ((j + ao) * s, (i + ao) * s),
                "tips": [((j + off[2 * k_ + 1] + ao) * s, (i + off[2 * k_] + ao) * s) for k_ in range(4)],
                "offset": off.tolist(),
                "box": lv.box[:, i, j].tolist(),
            }
        )
    return top
