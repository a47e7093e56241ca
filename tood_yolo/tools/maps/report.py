"""Saving the alignment maps of one image: PNGs, `maps.npz`, `maps.json` and an HTML page with relative links."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from .compute import MAP_KEYS, MAP_TITLES, AlignmentMaps, compute_alignment_maps
from .draw import _write_png, attention_chart, colour_bar, draw_offsets, heatmap_overlay, montage


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
table.maps img {{ max-width: 300px; }}
table.top td, table.top th, table.meta td, table.meta th {{ border: 1px solid #ccc; font-size: 12px; }}
.side {{ display: inline-block; width: 1em; height: 0.6em; }}
</style></head><body>
<h1>TOOD alignment maps</h1>
<table class="meta">{meta_rows}<tr><th>P shows</th><td>{e(cls_text)}</td></tr></table>
<h2>Score maps</h2>
<p>Same colour scale for every map: 0
<img src="{e(files['colorbar'])}" alt="colour bar 0 to 1" style="vertical-align: middle; height: 14px; width: 160px">
1 (jet). P = sigmoid(cls) is the classification score, M = sigmoid(m) TOOD's alignment map, and sqrt(P*M) the aligned
score that ranks the detections. Each grid cell is one block of the letterboxed input.</p>
<table class="maps"><tr><th>level</th>{''.join(f'<th>{e(MAP_TITLES[k])}</th>' for k in MAP_KEYS)}</tr>
{''.join(rows)}</table>
<h2>Offsets O at the top-{len(maps.top)} locations</h2>
<p>Arrows from each anchor point to where each box side's coordinate is sampled from (offset in grid cells x stride):
<span class="side" style="background:#f00"></span> x1 <span class="side" style="background:#0c0"></span> y1
<span class="side" style="background:#00f"></span> x2 <span class="side" style="background:#fd0"></span> y2;
the aligned box in white.</p>
<p><img src="{e(files['offsets'])}" alt="offsets" style="max-width: 100%"></p>
<table class="top"><tr><th>#</th><th>level</th><th>i</th><th>j</th><th>sqrt(P*M)</th><th>class</th>
<th>O (dy,dx per side x1 y1 x2 y2, cells)</th><th>box xyxy (px)</th></tr>{top_rows}</table>
<h2>Layer attention</h2>
<p>Task-decomposition weights of the {len(maps.levels[0].cls_attn)} inter layers, per level: cls (orange) and reg
(blue).</p>
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
