"""`python -m tood_yolo.tools.analysis`: the alignment study of models or predictions.json files, as a table."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from ultralytics.utils.files import increment_path

from ..cli import parse_tool_args
from .metrics import PRE_NMS_MISSING
from .study import alignment_study, json_alignment

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
