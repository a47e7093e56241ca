"""See the alignment: TOOD's score maps, offsets and layer attention for one image, as PNGs and an HTML page.

For a TOOD model and an image this letterboxes the image as Ultralytics' predictor does, runs the model up to the
T-head and the head level by level (`TOODHead.forward_level`), and draws:

- per FPN level, three heatmaps on the same 0..1 scale (jet colour map, colour bar inset): the classification score
  P = sigmoid(cls), the alignment map M = sigmoid(prob) and the aligned score sqrt(P * M) that ranks TOOD's
  detections. P (and so the aligned score) is the maximum over classes, or one class's map (`cls=`);
- the learned per-side offsets O at the top-k scored locations of all levels: one arrow per box side (x1 red, y1
  green, x2 blue, y2 yellow) from the anchor point to the place that side's coordinate is sampled from (offsets in
  grid cells, times the stride), and the location's aligned box in white;
- the layer-attention weights of the cls and reg task decompositions, per level (bar chart);
- `montage.png` (every heatmap in one figure with a colour bar) and `index.html`, a page with relative links.

Images are drawn on the letterboxed network input, so every overlay has its size. The raw maps are saved in
`maps.npz` too. Plain Ultralytics heads have no M, O or layer attention: `python -m tood_yolo.tools.analysis` measures the
alignment of any detection model instead.

Usage:
    $ python -m tood_yolo.tools.maps model=runs/detect/train/weights/best.pt source=image.jpg
    $ python -m tood_yolo.tools.maps model=cfg/tood-n.yaml source=bus.jpg imgsz=640 topk=20 cls=top project=runs/maps name=bus

    >>> from tood_yolo.tools.maps import save_alignment_maps, add_alignment_map_callback
    >>> html = save_alignment_maps("best.pt", "image.jpg", "runs/maps/x", topk=20)
    >>> model = YOLO("cfg/tood-n.yaml")
    >>> add_alignment_map_callback(model, "image.jpg", every=5)  # runs/detect/train/alignment_maps/epoch_5/...
    >>> model.train(data="data.yaml", epochs=20)
"""

from __future__ import annotations

import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch import nn

from ..nn.head import TOODHead

__all__ = (
    "AlignmentMaps",
    "LevelMaps",
    "NotTOODError",
    "add_alignment_map_callback",
    "alignment_map_callback",
    "compute_alignment_maps",
    "draw_offsets",
    "heatmap_overlay",
    "main",
    "save_alignment_maps",
)

SIDE_NAMES = ("x1", "y1", "x2", "y2")
SIDE_COLOURS = ((0, 0, 255), (0, 200, 0), (255, 0, 0), (0, 215, 255))  # BGR: x1 red, y1 green, x2 blue, y2 yellow
MAP_KEYS = ("p_map", "m_map", "aligned")
MAP_TITLES = {"p_map": "P = sigmoid(cls)", "m_map": "M = sigmoid(m)", "aligned": "sqrt(P*M)"}
COLORMAP = cv2.COLORMAP_JET
ALPHA = 0.55  # weight of the heatmap over the image


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


# ---------------------------------------------------------------------------------------------------------- drawing
def _font_scale(w: int) -> float:
    return max(0.35, min(0.8, w / 900))


def _put_label(img: np.ndarray, text: str) -> None:
    """White text on a dark strip at the top left, in place."""
    fs = _font_scale(img.shape[1])
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
    cv2.rectangle(img, (0, 0), (min(tw + 6, img.shape[1] - 1), th + base + 4), (0, 0, 0), -1)
    cv2.putText(img, text, (3, th + 2), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)


def colour_bar(height: int, width: int = 12) -> np.ndarray:
    """A vertical BGR colour bar of the heatmap colour map, 1.0 at the top and 0.0 at the bottom."""
    ramp = np.linspace(255, 0, height).round().astype(np.uint8)[:, None].repeat(width, 1)
    return cv2.applyColorMap(ramp, COLORMAP)


def _inset_colour_bar(img: np.ndarray) -> None:
    """A colour bar with its 0..1 range in the bottom-right corner of `img`, in place."""
    h, w = img.shape[:2]
    bh, bw, fs = max(24, h // 4), max(6, w // 60), _font_scale(w) * 0.8
    (tw, th), _ = cv2.getTextSize("1.0", cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
    x0, y0 = w - bw - tw - 8, h - bh - th - 4
    if x0 < 0 or y0 < 0:
        return
    cv2.rectangle(img, (x0 - 2, y0 - th - 2), (w - 1, h - 1), (0, 0, 0), -1)
    img[y0 : y0 + bh, x0 : x0 + bw] = colour_bar(bh, bw)
    cv2.putText(img, "1.0", (x0 + bw + 3, y0 + th), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(img, "0.0", (x0 + bw + 3, y0 + bh), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)


def heatmap_overlay(image: np.ndarray, values: np.ndarray, title: str | None = None, bar: bool = True) -> np.ndarray:
    """Colour a (H, W) map of values in [0, 1] (fixed range, not normalised) and blend it over `image`.

    Each grid cell becomes a block of the image (nearest-neighbour resize to the image size, which for a letterboxed
    input is exactly H*stride x W*stride). Returns a new BGR image of `image`'s size.
    """
    v = np.asarray(values, dtype=np.float32)
    if v.size and (np.nanmin(v) < 0 or np.nanmax(v) > 1):
        raise ValueError(f"heatmap values must lie in [0, 1], got {np.nanmin(v)}..{np.nanmax(v)}")
    h, w = image.shape[:2]
    u8 = cv2.resize(np.round(np.nan_to_num(v) * 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    out = cv2.addWeighted(image, 1 - ALPHA, cv2.applyColorMap(u8, COLORMAP), ALPHA, 0)
    if bar:
        _inset_colour_bar(out)
    if title:
        _put_label(out, title)
    return out


def draw_offsets(
    image: np.ndarray, top: list[dict[str, Any]], boxes: bool = True, arrow_scale: float = 1.0
) -> np.ndarray:
    """Draw the offsets O of the given locations on a copy of `image` (pixels elsewhere are left untouched).

    Per location: its aligned box (white, if `boxes`), one arrow per side from the anchor point to that side's
    sampling point (x1 red, y1 green, x2 blue, y2 yellow; none where an offset is under a pixel) and a white anchor
    dot. `arrow_scale` > 1 lengthens the arrows (anchor + scale * offset) to make sub-cell offsets visible.
    """
    out = image.copy()

    def pt(p):
        return int(round(p[0])), int(round(p[1]))

    for t in top:
        if boxes:
            x1, y1, x2, y2 = t["box"]
            cv2.rectangle(out, pt((x1, y1)), pt((x2, y2)), (255, 255, 255), 1, cv2.LINE_AA)
    for t in top:
        a = pt(t["anchor"])
        for tip, colour in zip(t["tips"], SIDE_COLOURS):
            b = pt([t["anchor"][k] + arrow_scale * (tip[k] - t["anchor"][k]) for k in (0, 1)])
            if a == b:
                continue
            length = math.hypot(b[0] - a[0], b[1] - a[1])
            cv2.arrowedLine(out, a, b, colour, 1, cv2.LINE_AA, tipLength=min(0.4, 6 / max(length, 1)))
        cv2.circle(out, a, 2, (255, 255, 255), -1, cv2.LINE_AA)
    return out


def attention_chart(levels: list[LevelMaps], path: Path) -> Path:
    """Bar chart of the cls and reg layer-attention weights per level (matplotlib, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(levels)
    fig = Figure(figsize=(1.7 * n + 0.4, 2.3), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, lv in zip(axes, levels):
        k = np.arange(1, len(lv.cls_attn) + 1)
        ax.bar(k - 0.2, lv.cls_attn, 0.4, label="cls", color="tab:orange")
        ax.bar(k + 0.2, lv.reg_attn, 0.4, label="reg", color="tab:blue")
        ax.set_title(f"{lv.name} (/{lv.stride})", fontsize=9)
        ax.set_xticks(k)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("inter layer", fontsize=7)
    axes[0].set_ylabel("attention", fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return path


def montage(maps: AlignmentMaps, overlays: dict[tuple[str, str], np.ndarray], path: Path, width: float = 1.8) -> Path:
    """All heatmaps in one figure: a row per map (P, M, aligned), a column per level, one 0..1 colour bar."""
    from matplotlib import cm, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(maps.levels)
    h, w = maps.image.shape[:2]
    fig = Figure(figsize=(width * n + 0.9, 3 * width * h / w + 0.4), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n, squeeze=False)
    for r, key in enumerate(MAP_KEYS):
        for c, lv in enumerate(maps.levels):
            ax = axes[r, c]
            ax.imshow(overlays[(lv.name, key)][..., ::-1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{lv.name} (/{lv.stride})", fontsize=9)
            if c == 0:
                ax.set_ylabel(MAP_TITLES[key], fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.88, top=0.94, bottom=0.02, wspace=0.04, hspace=0.04)
    cax = fig.add_axes((0.9, 0.1, 0.02, 0.8))
    cmap = "jet" if COLORMAP == cv2.COLORMAP_JET else "viridis"
    fig.colorbar(cm.ScalarMappable(colors.Normalize(0, 1), cmap), cax=cax).ax.tick_params(labelsize=7)
    fig.savefig(path)
    return path


def _write_png(path: Path, img: np.ndarray) -> Path:
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")
    return path


def _html_page(maps: AlignmentMaps, files: dict[str, str], meta: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, relative <img> links) with every picture and the top-k table."""
    e = html.escape
    cls_text = "max over classes" if maps.cls is None else f"class {maps.cls} ({maps.names.get(maps.cls, '?')})"
    rows = []
    for lv in maps.levels:
        cells = "".join(
            f'<td><img src="{e(files[f"{lv.name}_{k}"])}" alt="{e(lv.name)} {e(MAP_TITLES[k])}"></td>' for k in MAP_KEYS
        )
        stats = "<br>".join(f"{MAP_TITLES[k].split(' ')[0]} max {getattr(lv, k).max():.3f}" for k in MAP_KEYS)
        rows.append(f"<tr><th>{e(lv.name)}<br>stride {lv.stride}<br>{lv.aligned.shape[0]}x{lv.aligned.shape[1]}"
                    f"<br><small>{stats}</small></th>{cells}</tr>")
    top_rows = "".join(
        f"<tr><td>{n + 1}</td><td>{e(t['level'])}</td><td>{t['i']}</td><td>{t['j']}</td><td>{t['score']:.4f}</td>"
        f"<td>{e(maps.names.get(t['cls'], str(t['cls'])))}</td>"
        f"<td>{' '.join(f'{v:+.2f}' for v in t['offset'])}</td>"
        f"<td>{' '.join(f'{v:.1f}' for v in t['box'])}</td></tr>"
        for n, t in enumerate(maps.top)
    )
    meta_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TOOD alignment maps: {e(str(meta.get('image', '')))}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 6px; vertical-align: top; }}
table.maps img {{ max-width: 300px; }} table.top td, table.top th, table.meta td, table.meta th {{ border: 1px solid #ccc; font-size: 12px; }}
.side {{ display: inline-block; width: 1em; height: 0.6em; }}
</style></head><body>
<h1>TOOD alignment maps</h1>
<table class="meta">{meta_rows}<tr><th>P shows</th><td>{e(cls_text)}</td></tr></table>
<h2>Score maps</h2>
<p>Same colour scale for every map: 0 <img src="{e(files['colorbar'])}" alt="colour bar 0 to 1" style="vertical-align: middle; height: 14px; width: 160px"> 1
(jet). P = sigmoid(cls) is the classification score, M = sigmoid(prob) TOOD's alignment map, and sqrt(P*M) the aligned score
that ranks the detections. Each grid cell is one block of the letterboxed input.</p>
<table class="maps"><tr><th>level</th>{''.join(f'<th>{e(MAP_TITLES[k])}</th>' for k in MAP_KEYS)}</tr>{''.join(rows)}</table>
<h2>Offsets O at the top-{len(maps.top)} locations</h2>
<p>Arrows from each anchor point to where each box side's coordinate is sampled from (offset in grid cells x stride):
<span class="side" style="background:#f00"></span> x1 <span class="side" style="background:#0c0"></span> y1
<span class="side" style="background:#00f"></span> x2 <span class="side" style="background:#fd0"></span> y2; the aligned box in white.</p>
<p><img src="{e(files['offsets'])}" alt="offsets" style="max-width: 100%"></p>
<table class="top"><tr><th>#</th><th>level</th><th>i</th><th>j</th><th>sqrt(P*M)</th><th>class</th>
<th>O (dy,dx per side x1 y1 x2 y2, cells)</th><th>box xyxy (px)</th></tr>{top_rows}</table>
<h2>Layer attention</h2>
<p>Task-decomposition weights of the {len(maps.levels[0].cls_attn)} inter layers, per level: cls (orange) and reg (blue).</p>
<p><img src="{e(files['attention'])}" alt="layer attention"></p>
<h2>All maps</h2><p><img src="{e(files['montage'])}" alt="montage" style="max-width: 100%"></p>
</body></html>
"""


def save_alignment_maps(
    model: Any,
    image: Any,
    save_dir: str | Path,
    conf: float = 0.0,
    topk: int = 20,
    imgsz: int | list[int] = 640,
    cls: int | str | None = None,
    rect: bool = True,
    maps: AlignmentMaps | None = None,
    arrow_scale: float = 1.0,
) -> Path:
    """Compute (or take) the alignment maps of one image and save PNGs, `maps.npz`, `maps.json` and `index.html`.

    Args:
        model: A TOOD YOLO object, weights or YAML path, or DetectionModel.
        image: Image path, PIL image or BGR array.
        save_dir (str | Path): Output folder (created).
        conf (float): Only locations with aligned score > conf get offset arrows.
        topk (int): Number of top locations with offset arrows.
        imgsz (int | list[int]): Inference size.
        cls (int | str | None): None/"max", "top", or a class index or name (see `compute_alignment_maps`).
        rect (bool): Minimal-padding letterbox as `yolo predict`.
        maps (AlignmentMaps, optional): Already computed maps (then model/image/conf/topk/imgsz are not used).
        arrow_scale (float): Lengthen the offset arrows this many times (sub-cell offsets are a pixel or two).

    Returns:
        (Path): The HTML page.
    """
    if maps is None:
        maps = compute_alignment_maps(model, image, imgsz=imgsz, conf=conf, topk=topk, cls=cls, rect=rect)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    files, overlays = {}, {}
    _write_png(save_dir / "input.png", maps.image)
    files["input"] = "input.png"
    for lv in maps.levels:
        for key in MAP_KEYS:
            values = getattr(lv, key)
            title = f"{lv.name} {MAP_TITLES[key]} max {values.max():.3f}"
            overlays[(lv.name, key)] = heatmap_overlay(maps.image, values, title)
            name = f"{lv.name.lower()}_{key}.png"
            _write_png(save_dir / name, overlays[(lv.name, key)])
            files[f"{lv.name}_{key}"] = name
    _write_png(save_dir / "offsets.png", draw_offsets(maps.image, maps.top, arrow_scale=arrow_scale))
    files["offsets"] = "offsets.png"
    _write_png(save_dir / "colorbar.png", np.rot90(colour_bar(160, 14)))
    files["colorbar"] = "colorbar.png"
    attention_chart(maps.levels, save_dir / "attention.png")
    files["attention"] = "attention.png"
    montage(maps, {k: heatmap_overlay(maps.image, getattr_level(maps, k), bar=False) for k in overlays},
            save_dir / "montage.png")
    files["montage"] = "montage.png"
    np.savez_compressed(
        save_dir / "maps.npz",
        **{f"{lv.name}_{k}": getattr(lv, k) for lv in maps.levels
           for k in (*MAP_KEYS, "offset", "cls_attn", "reg_attn")},
    )
    h, w = maps.image.shape[:2]
    meta = {
        "model": _model_name(model),
        "image": image if isinstance(image, (str, Path)) else f"array {maps.orig_shape[1]}x{maps.orig_shape[0]}",
        "original size (w x h)": f"{maps.orig_shape[1]} x {maps.orig_shape[0]}",
        "letterboxed input (w x h)": f"{w} x {h}",
        "top-k": f"{len(maps.top)} (asked {topk}, aligned score > {conf})",
        "arrows": "true length" if arrow_scale == 1 else f"offsets drawn {arrow_scale:g}x their length",
    }
    (save_dir / "maps.json").write_text(json.dumps({
        "meta": {k: str(v) for k, v in meta.items()},
        "cls": maps.cls,
        "levels": [{"name": lv.name, "stride": lv.stride, "shape": list(lv.aligned.shape),
                    "max": {k: float(getattr(lv, k).max()) for k in MAP_KEYS},
                    "cls_attn": lv.cls_attn.tolist(), "reg_attn": lv.reg_attn.tolist()} for lv in maps.levels],
        "top": maps.top,
    }, indent=1, default=float))
    page = save_dir / "index.html"
    page.write_text(_html_page(maps, files, meta), encoding="utf-8")
    return page


def getattr_level(maps: AlignmentMaps, key: tuple[str, str]) -> np.ndarray:
    """The map `key` = (level name, map key) of `maps`."""
    name, k = key
    return getattr(next(lv for lv in maps.levels if lv.name == name), k)


def _model_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return str(getattr(model, "ckpt_path", None) or getattr(model, "model_name", None) or
               (getattr(model, "yaml", None) or {}).get("yaml_file") or type(model).__name__)


# --------------------------------------------------------------------------------------------------------- training
def _tensorboard_enabled() -> bool:
    """Whether Ultralytics' settings enable TensorBoard logging."""
    from ultralytics.utils import SETTINGS

    return bool(SETTINGS.get("tensorboard", False))


def _tensorboard_writer(trainer: Any) -> Any:
    """Ultralytics' TensorBoard writer of this run (module global `WRITER` of its callback), else a SummaryWriter of
    our own on `trainer.save_dir` (Ultralytics' callback logs nothing under pytest), else None."""
    if not _tensorboard_enabled():
        return None
    try:
        from ultralytics.utils.callbacks import tensorboard as tb

        writer = getattr(tb, "WRITER", None)
    except Exception:
        writer = None
    if writer is not None:
        return writer
    writer = getattr(trainer, "_alignment_tb_writer", None)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        writer = trainer._alignment_tb_writer = SummaryWriter(str(trainer.save_dir))

        def close(trainer):
            w = getattr(trainer, "_alignment_tb_writer", None)
            if w is not None:
                w.close()
                trainer._alignment_tb_writer = None

        trainer.add_callback("teardown", close)
    return writer


def alignment_map_callback(
    image: Any,
    every: int = 1,
    imgsz: int | None = None,
    conf: float = 0.0,
    topk: int = 20,
    cls: Any = None,
    arrow_scale: float = 1.0,
) -> Callable:
    """An `on_fit_epoch_end` callback saving the maps of `image` to `save_dir/alignment_maps/epoch_N/` every `every`
    epochs and at the last one (EMA weights, as validation uses), and adding them to TensorBoard when enabled.

    Usage: `model.add_callback("on_fit_epoch_end", alignment_map_callback("image.jpg", every=5))`.
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    image = str(image) if isinstance(image, Path) else image
    if isinstance(image, str) and not Path(image).is_file():
        raise FileNotFoundError(f"alignment map image {image} not found")
    done = {}

    def on_fit_epoch_end(trainer) -> None:
        from ultralytics.utils import LOGGER, RANK

        if RANK not in {-1, 0} or done.get("trainer") is trainer:
            return  # other DDP ranks; or the final validation of best.pt, which calls this once more
        epoch = trainer.epoch + 1
        last = trainer.stop or epoch >= trainer.epochs
        if last:
            done["trainer"] = trainer
        if epoch % every and not last:
            return
        model = trainer.ema.ema if getattr(trainer, "ema", None) else trainer.model
        try:
            tood_model(model)
        except NotTOODError as e:
            LOGGER.warning(f"alignment maps skipped: {e}")
            return
        save_dir = Path(trainer.save_dir) / "alignment_maps" / f"epoch_{epoch}"
        page = save_alignment_maps(model, image, save_dir, conf=conf, topk=topk, cls=cls,
                                   imgsz=imgsz or trainer.args.imgsz, arrow_scale=arrow_scale)
        LOGGER.info(f"Alignment maps saved to {page}")
        writer = _tensorboard_writer(trainer)
        if writer is not None:
            for name in ("montage", "offsets", "attention"):
                img = cv2.imread(str(save_dir / f"{name}.png"), cv2.IMREAD_COLOR)
                if img is not None:
                    writer.add_image(f"alignment/{name}", img[..., ::-1].copy(), epoch, dataformats="HWC")
            writer.flush()

    return on_fit_epoch_end


def add_alignment_map_callback(model_or_trainer: Any, image: Any, every: int = 1, **kwargs) -> Callable:
    """Register `alignment_map_callback(image, every, **kwargs)` on a YOLO object or trainer ("on_fit_epoch_end").

    A YOLO object whose model is not TOOD raises NotTOODError at once.
    """
    from ultralytics.engine.model import Model

    if isinstance(model_or_trainer, Model) and isinstance(getattr(model_or_trainer, "model", None), nn.Module):
        tood_model(model_or_trainer)
    cb = alignment_map_callback(image, every, **kwargs)
    model_or_trainer.add_callback("on_fit_epoch_end", cb)
    return cb


# -------------------------------------------------------------------------------------------------------------- CLI
CLI_DEFAULTS = {
    "model": None,
    "source": None,
    "imgsz": 640,
    "conf": 0.0,
    "topk": 20,
    "cls": "max",
    "rect": True,
    "arrow_scale": 1.0,
    "project": "runs/maps",
    "name": "maps",
    "exist_ok": False,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Ultralytics-style `key=value` arguments over `CLI_DEFAULTS`."""
    from .cli import parse_tool_args

    args = parse_tool_args(argv, CLI_DEFAULTS)
    if not args["model"] or not args["source"]:
        raise SyntaxError("usage: python -m tood_yolo.tools.maps model=<tood .pt or .yaml> source=<image> [imgsz=640 "
                          "topk=20 conf=0.0 cls=max|top|<class> arrow_scale=1 project=runs/maps name=maps]")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Command line: save the maps of one image into project/name (incremented) and return the HTML page."""
    from ultralytics.utils.files import increment_path

    args = parse_args(sys.argv[1:] if argv is None else argv)
    source = Path(str(args["source"]))
    if not source.exists():
        raise FileNotFoundError(f"source={source} not found")
    if not source.is_file():
        raise FileNotFoundError(f"source={source} is not an image file (one image per run)")
    from ultralytics import YOLO

    model = YOLO(str(args["model"]))
    tood_model(model)  # fails early and clearly for non-TOOD models
    save_dir = increment_path(Path(str(args["project"])) / str(args["name"]), exist_ok=args["exist_ok"], mkdir=True)
    page = save_alignment_maps(model, source, save_dir, conf=float(args["conf"]), topk=int(args["topk"]),
                               imgsz=args["imgsz"], cls=args["cls"], rect=bool(args["rect"]),
                               arrow_scale=float(args["arrow_scale"]))
    print(f"Alignment maps saved to {page}")
    return page


if __name__ == "__main__":
    try:
        main()
    except (NotTOODError, SyntaxError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
