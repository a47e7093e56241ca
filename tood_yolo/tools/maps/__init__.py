"""See the alignment: TOOD's score maps, offsets and layer attention for one image, as PNGs and an HTML page.

For a TOOD model and an image this letterboxes the image as Ultralytics' predictor does, runs the model and its
T-head level by level (`TOODHead.forward_levels`), and draws:

- per FPN level, three heatmaps on the same 0..1 scale (jet colour map, colour bar inset): the classification score
  P = sigmoid(cls), the alignment map M = sigmoid(m) and the aligned score sqrt(P * M) that ranks TOOD's
  detections. P (and so the aligned score) is the maximum over classes, or one class's map (`cls=`);
- the learned per-side offsets O at the top-k scored locations of all levels: one arrow per box side (x1 red, y1
  green, x2 blue, y2 yellow) from the anchor point to the place that side's coordinate is sampled from (offsets in
  grid cells, times the stride), and the location's aligned box in white;
- the layer-attention weights of the cls and reg task decompositions, per level (bar chart);
- `montage.png` (every heatmap in one figure with a colour bar) and `index.html`, a page with relative links.

Images are drawn on the letterboxed network input, so every overlay has its size. The raw maps are saved in
`maps.npz` too. Plain Ultralytics heads have no M, O or layer attention: `python -m tood_yolo.tools.analysis` measures
the alignment of any detection model instead.

Usage:
    $ python -m tood_yolo.tools.maps model=runs/detect/train/weights/best.pt source=image.jpg
    $ python -m tood_yolo.tools.maps model=cfg/tood-n.yaml source=bus.jpg imgsz=640 topk=20 cls=top \\
          project=runs/maps name=bus

    >>> from tood_yolo.tools.maps import save_alignment_maps, add_alignment_map_callback
    >>> html = save_alignment_maps("best.pt", "image.jpg", "runs/maps/x", topk=20)
    >>> model = YOLO("cfg/tood-n.yaml")
    >>> add_alignment_map_callback(model, "image.jpg", every=5)  # runs/detect/train/alignment_maps/epoch_5/...
    >>> model.train(data="data.yaml", epochs=20)
"""

from __future__ import annotations

from .callback import add_alignment_map_callback, alignment_map_callback
from .cli import main
from .compute import (
    MAP_KEYS,
    AlignmentMaps,
    LevelMaps,
    NotTOODError,
    compute_alignment_maps,
    letterbox,
    top_locations,
)
from .draw import draw_offsets, heatmap_overlay
from .report import save_alignment_maps

__all__ = (
    "MAP_KEYS",
    "AlignmentMaps",
    "LevelMaps",
    "NotTOODError",
    "add_alignment_map_callback",
    "alignment_map_callback",
    "compute_alignment_maps",
    "draw_offsets",
    "heatmap_overlay",
    "letterbox",
    "main",
    "save_alignment_maps",
    "top_locations",
)
