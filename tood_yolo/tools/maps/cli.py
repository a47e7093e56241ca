"""`python -m tood_yolo.tools.maps model=... source=...`: the alignment maps of one image, saved to project/name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .compute import tood_model
from .report import save_alignment_maps

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
    from ..cli import parse_tool_args

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

