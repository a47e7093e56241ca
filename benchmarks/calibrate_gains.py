"""Calibrate TOOD's loss weights under the `ultralytics` recipe against YOLOv8's loss, by gradient norms at init.

Under `ultralytics`, `lr0` must mean for a TOOD model what it means for YOLOv8. Both models share the backbone and
neck (the same rows, given the same initial weights); on the same batches, the norm of
the gradient that reaches those shared weights is measured for
  (a) Ultralytics' `Detect` + v8 loss (default gains box 7.5, cls 0.5, dfl 1.5; loss x batch), and
  (b) the T-head + TOOD's loss in Ultralytics' convention (weights 1 and 2; loss x batch),
in the ATSS warm-up and in TAL. The ratio (a) / (b), printed for a gain of 1, is the gain (`ULTRALYTICS_GAIN` of that
phase) that makes one step of (b) as large as one of (a).
Only training images are used (never an evaluation split).

    python benchmarks/calibrate_gains.py [--data ../shared/data/bccd/data.yaml] [--pairs tood-n] [--seeds 2] \\
        [--batches 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import torch  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.data import build_dataloader, build_yolo_dataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.nn.tasks import yaml_model_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tood_yolo import TOODDetectionModel  # noqa: E402  (importing the package registers TOOD)
from tood_yolo.utils.recipe import ULTRALYTICS_GAIN  # noqa: E402

# (T-head model, its Detect twin, number of shared leading rows)
PAIRS = {"tood-n": ("cfg/tood-n.yaml", "cfg/ablation-detect-n.yaml", 11)}


def build(cfg: str, nc: int, seed: int, args) -> TOODDetectionModel:
    """A model of `cfg` for `nc` classes from `seed`, with the trainer's arguments attached as Ultralytics does."""
    torch.manual_seed(seed)
    model = TOODDetectionModel(yaml_model_load(ROOT / cfg), nc=nc, verbose=False)
    model.args = args
    return model.train()


def trunk_grad_norm(model: TOODDetectionModel, batch: dict, shared: int, epoch: int = 0) -> float:
    """Norm of the gradient of the model's training loss (as back-propagated) on its first `shared` rows."""
    model.zero_grad()
    model.criterion = model.init_criterion()
    model.criterion.epoch = epoch
    loss, _ = model.loss(batch)
    loss.sum().backward()
    grads = [p.grad.flatten() for m in model.model[:shared] for p in m.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd" / "data.yaml"))
    ap.add_argument("--pairs", default="tood-n", help=f"comma-separated, from {', '.join(PAIRS)}")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=384)
    opt = ap.parse_args()

    data = check_det_dataset(opt.data)
    args = get_cfg(overrides={"imgsz": opt.imgsz, "recipe": "ultralytics"})
    dataset = build_yolo_dataset(args, data["train"], opt.batch, data, mode="train")  # Ultralytics' augmentation
    loader = build_dataloader(dataset, opt.batch, 0, shuffle=True)
    batches = []
    for i, b in enumerate(loader):
        if i == opt.batches:
            break
        batches.append({**b, "img": b["img"].float() / 255})
    print(f"ULTRALYTICS_GAIN in use: {ULTRALYTICS_GAIN} (the ratios below are for a gain of 1)")
    for name in opt.pairs.split(","):
        thead_cfg, detect_cfg, shared = PAIRS[name]
        ratios = {"atss": [], "tal": []}
        for seed in range(opt.seeds):
            detect, thead = build(detect_cfg, data["nc"], seed, args), build(thead_cfg, data["nc"], seed, args)
            thead.model[:shared].load_state_dict(detect.model[:shared].state_dict())  # the same trunk weights
            for batch in batches:
                v8 = trunk_grad_norm(detect, batch, shared)
                for phase, epoch in (("atss", 0), ("tal", 10**6)):
                    ratios[phase].append(v8 / trunk_grad_norm(thead, batch, shared, epoch) * ULTRALYTICS_GAIN[phase])
        for phase, r in ratios.items():
            print(f"{name} {phase.upper()}: v8 / TOOD trunk gradient norm = {statistics.mean(r):.3f} "
                  f"+- {statistics.stdev(r):.3f} (median {statistics.median(r):.3f}, n={len(r)})")


if __name__ == "__main__":
    main()
