"""Drawing the alignment maps: heatmaps with a colour bar, offset arrows, the layer-attention chart, the montage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .compute import MAP_KEYS, MAP_TITLES, AlignmentMaps, LevelMaps

SIDE_NAMES = ("x1", "y1", "x2", "y2")
SIDE_COLOURS = ((0, 0, 255), (0, 200, 0), (255, 0, 0), (0, 215, 255))  # BGR: x1 red, y1 green, x2 blue, y2 yellow
COLORMAP = cv2.COLORMAP_JET
ALPHA = 0.55  # weight of the heatmap over the image


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
