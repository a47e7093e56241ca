"""Print a Markdown table of every model config in cfg/: parameters, GFLOPs and the T-head's share of parameters.

Usage:
    python benchmarks/model_table.py [--imgsz 640] [--cfg cfg/tood-r50.yaml ...]

How it counts (measured by running the model, not from formulas):
- Parameters: every weight of the model, including the frozen stem and stage 1 of the ResNet backbones (kept as
  buffers so that Ultralytics' trainer cannot unfreeze them, so `model.info()` leaves them out); BatchNorm running
  statistics are not parameters. This is the count the paper and mmdet report.
- GFLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward of a (1, 3, imgsz, imgsz) input, 2 FLOPs per
  multiply-add as Ultralytics reports them (mmdet's and the paper's "FLOPs" are multiply-adds: half these numbers).
  It counts convolutions and matrix products, including the T-head's layer-attention-weighted 1x1 reduction (a
  batched matmul) and the modulated deformable convolutions (added here: 2 * outputs * C_in/groups * k * k).
  Ultralytics' `get_flops` (thop) misses both and returns 0 for the ResNet models, whose first parameter is not the
  stem conv once it is frozen. Normalisation, activations and bilinear sampling are not counted.
- Head share: the detection head's parameters (the TOODHead; Detect in an ablation config) over the model's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from copy import deepcopy
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATS = ("running_mean", "running_var", "num_batches_tracked")
REFERENCE = {  # COCO val2017 box AP of the reference configs (mmdet model zoo; paper minival / test-dev)
    "tood-r50": "42.4 (R-50 1x)",
    "tood-r50-anchor": "42.4 (R-50 1x, anchor-based)",
    "tood-r101": "46.1 (ms-2x)",
    "tood-r101-dcn": "49.3 (ms-2x)",
    "tood-x101": "47.6 (ms-2x)",
    "tood-x101-dcn": "50.5 / 51.1 test-dev (paper, ms-2x)",
}


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torchvision::deform_conv2d as the convolution it computes (2 per multiply-add)."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def count_params(module: torch.nn.Module) -> int:
    """Weights including frozen ones held as buffers; BatchNorm running statistics excluded."""
    return sum(v.numel() for k, v in module.state_dict().items() if not k.endswith(STATS))


def count_gflops(model: torch.nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    model = deepcopy(model).eval()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops})
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, h, w))
    return counter.get_total_flops() / 1e9


def build(cfg: str | Path):
    """TOODDetectionModel of a config, the ResNet `weights` argument cleared (random init is enough to count)."""
    import tood_yolo  # noqa: F401  (registers TOOD's modules)
    from ultralytics.nn.tasks import yaml_model_load

    from tood_yolo import TOODDetectionModel

    d = yaml_model_load(cfg)
    for row in d["backbone"] + d["head"]:
        if row[2] == "ResNet" and len(row[3]) > 5:
            row[3] = [*row[3][:5], None, *row[3][6:]]
    return TOODDetectionModel(d, verbose=False)


def measure(cfg: str | Path, imgsz: int | tuple[int, int] = 640) -> dict:
    model = build(cfg)
    head = model.model[-1]  # the TOODHead (or Ultralytics' Detect in an ablation twin)
    params, head_params = count_params(model), count_params(head)
    name = Path(cfg).stem
    return {
        "name": name,
        "params": params,
        "head_params": head_params,
        "head_share": head_params / params,
        "gflops": count_gflops(model, imgsz),
        "imgsz": imgsz,
        "reference": REFERENCE.get(name, "-"),
    }


def markdown(rows: list[dict]) -> str:
    size = rows[0]["imgsz"] if rows else 640
    size = f"{size}x{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
    lines = [
        f"| model | params (M) | head params (M) | head share | GFLOPs ({size}) | reference COCO val AP |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['head_params'] / 1e6:.2f} | {100 * r['head_share']:.1f}% "
            f"| {r['gflops']:.1f} | {r['reference']} |"
        )
    return "\n".join(lines)


def _order(path: Path) -> tuple:
    ladder = ["tood-n", "ablation-detect-n", "tood-s", "tood-m", "tood-r50", "tood-r50-anchor", "tood-r101"]
    ladder += ["tood-r101-dcn", "tood-x101", "tood-x101-dcn", "yolov8n-tood", "yolo11n-tood", "yolov8s-tood"]
    ladder += ["yolo11s-tood"]
    return (ladder.index(path.stem) if path.stem in ladder else len(ladder), path.stem)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[640], help="square size, or H W")
    parser.add_argument("--cfg", nargs="*", help="configs (default: every cfg/*.yaml)")
    args = parser.parse_args(argv)
    cfgs = [Path(c) for c in args.cfg] if args.cfg else sorted((ROOT / "cfg").glob("*.yaml"), key=_order)
    imgsz = args.imgsz[0] if len(args.imgsz) == 1 else tuple(args.imgsz[:2])
    rows = []
    for c in cfgs:
        rows.append(measure(c, imgsz))
        print(f"measured {c.name}", file=sys.stderr)
    table = markdown(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
