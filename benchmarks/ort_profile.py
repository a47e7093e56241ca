"""Where a head's ONNX Runtime time goes: per-op-type and per-node times of a model and its twin, side by side.

    python benchmarks/ort_profile.py cfg/yolo11n-tood-bn.yaml yolo11n.yaml --imgsz 640 --runs 12

Each model (a YAML or a checkpoint, TOOD's or Ultralytics') is exported to ONNX as `yolo export format=onnx
simplify=True` does, then run by ONNX Runtime's CPU provider on one thread with its profiler on. Printed per model:
the total kernel time per run, the op types that take it, and the head's (the last layer's) nodes by time. ONNX
Runtime names a fused node after its last op (a Conv fused with the Sigmoid after it shows as `Sigmoid_output_0_nchwc`).
Kernel times only: the latency ratio of a model and its twin comes from `benchmarks/latency.py`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a source checkout without an installed package

from ultralytics import YOLO  # noqa: E402

import tood_yolo  # noqa: E402, F401  (registers TOOD)


def profile(model: str, imgsz: int, runs: int, out: Path) -> tuple[collections.Counter, collections.Counter, str]:
    """Kernel ms per run by op type and by node of `model`'s ONNX export, and the head's node-name prefix."""
    yolo = YOLO(model)
    head = f"/model.{len(yolo.model.model) - 1}/"
    onnx = Path(yolo.export(format="onnx", imgsz=imgsz, simplify=True, verbose=False))
    onnx = onnx.rename(out / f"{Path(model).stem}.onnx")  # the exporter writes beside a checkpoint, or into cwd
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling = 1, True
    so.profile_file_prefix = str(out / Path(model).stem)
    session = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    x = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
    for _ in range(runs):
        session.run(None, x)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_type, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_type[e["args"]["op_name"]] += e["dur"] / runs / 1000
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"] / runs / 1000
    return by_type, by_node, head


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="YAMLs or checkpoints, e.g. cfg/yolo11n-tood-bn.yaml yolo11n.yaml")
    p.add_argument("--imgsz", type=int, default=640, help="square input size")
    p.add_argument("--runs", type=int, default=12, help="profiled runs (times are per run)")
    p.add_argument("--top", type=int, default=12, help="op types and head nodes listed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            by_type, by_node, head = profile(model, args.imgsz, args.runs, Path(tmp))
            head_nodes = collections.Counter({k: v for k, v in by_node.items() if k.startswith(head)})
            total, head_ms = sum(by_type.values()), sum(head_nodes.values())
            print(f"\n{model} at {args.imgsz}: {total:.1f} ms per run, head {head_ms:.1f}")
            for name, ms in by_type.most_common(args.top):
                print(f"  {name:28s} {ms:7.2f}")
            print(f"  head ({head}) nodes:")
            for name, ms in head_nodes.most_common(args.top):
                print(f"    {name:72s} {ms:6.2f}")


if __name__ == "__main__":
    main()
