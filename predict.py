"""Run a TOOD model on images, folders, globs, videos, webcams or streams: `python predict.py key=value ...`.

Takes the same arguments as `yolo predict` (https://docs.ultralytics.com/modes/predict/). Defaults: the newest
weights that `python train.py` produced (else the untrained product model, with a warning) and the sample images
that ship with Ultralytics. Results are consumed as a stream, so long videos do not accumulate in memory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ultralytics import YOLO
from ultralytics.utils import ASSETS, LOGGER

import tood_yolo  # noqa: F401  (registers TOOD when the package runs from a source checkout)
from tood_yolo.tools.cli import parse_args
from tood_yolo.tools.deploy import run

ROOT = Path(__file__).resolve().parent


def default_model() -> str:
    """The most recent best.pt under runs/ (from `python train.py`), else the untrained product model's config."""
    weights = sorted(ROOT.glob("runs/*/weights/best.pt"), key=lambda p: p.stat().st_mtime)
    if weights:
        return str(weights[-1])
    LOGGER.warning("No trained weights under runs/ (run `python train.py` first): predicting with an untrained "
                   "yolo11n-tood-bn")
    return str(ROOT / "cfg" / "yolo11n-tood-bn.yaml")


def main(argv: list[str]) -> None:
    args = parse_args(argv, {"source": str(ASSETS), "save": True})
    weights = args.pop("model", None) or default_model()
    LOGGER.info(f"predict.py: model {weights}")
    model = YOLO(weights)
    mode = "track" if args.pop("mode", None) == "track" or "tracker" in args else "predict"
    # fails fast on a webcam/stream that does not open; skips (and logs) corrupt video frames; always streams
    for _ in run(model, args.pop("source"), mode=mode, **args):
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
