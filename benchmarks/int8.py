"""int8 for the edge: fp32 vs int8 OpenVINO mAP50-95 and latency of trained models, measured side by side.

    python benchmarks/int8.py runs/tood-n/weights/best.pt runs/yolo11n-tood/weights/best.pt runs/yolo11n/weights/best.pt
    python benchmarks/int8.py a.pt b.pt --data path/data.yaml --split test --imgsz 320 --out int8.md

For each checkpoint (TOOD or Ultralytics): `yolo export format=openvino` (fp32) and `format=openvino int8=True
data=...` (nncf post-training quantisation, calibrated on the dataset's `val` split, as Ultralytics does), both static
at `--imgsz`, batch 1; then `yolo val` of both exports on `--split` (default test: images used neither for training nor
for calibration), and the latency of both, all models and precisions timed in interleaved rounds so that a changing
machine load weighs on every row alike. TOOD models are validated with TOOD's validator (bounded NMS), Ultralytics'
with theirs. Rows are written to `--out` as each model's validation ends; the latency table at the end.

Precision: OpenVINO's CPU plugin runs float ops in bf16 where the CPU has it, as this one does, unless told otherwise;
every OpenVINO model here is compiled with INFERENCE_PRECISION_HINT=`--ov-precision` (default f32), so that "fp32"
is fp32 and int8 differs from it by the quantisation only. Both exports are letterboxed to the same square, so the
fp32 column may differ slightly from `yolo val` of the .pt (rect batches).

What nncf quantises: Ultralytics' exporter keeps a `Detect` head's own operations in float (nncf's ignored scope:
every Sigmoid and every op named in the head module's own scope, not its sub-modules' convs). `TOODHead` is a `Detect`,
so its final score and box operations (sqrt(P * M), DFL, O's sampling, the box decoding) stay float too, and so do
its task decomposition's matmul and the first 1x1 conv of M and O, which it computes in its own scope (`read_feat`):
int8 speeds it up less than Detect (tests/test_postprocess.py checks the quantised IR).

No ONNX Runtime row: its static quantisation (`quantize_static`, QDQ, per-channel, calibrated on the same images,
nothing excluded) took tood-n from 0.398 to 0.084 mAP50-95 and yolov8n from 0.581 to 0.000 on the synthetic val,
since the output that holds pixel boxes and 0-1 scores gets one int8 scale; it needs per-model exclusions.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # a source checkout without an installed package; latency.py's helpers

from latency import cpu_name, interleaved, openvino_runner  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from tood_yolo.engine.model import TOOD  # noqa: E402
from tood_yolo.engine.validator import TOODDetectionValidator  # noqa: E402

BCCD = ROOT.parent / "shared" / "data" / "bccd" / "data.yaml"


@contextlib.contextmanager
def ov_precision(precision: str):
    """Every OpenVINO CPU model compiled meanwhile (Ultralytics' backend included) runs float ops in `precision`."""
    import openvino as ov

    compile_model = ov.Core.compile_model

    @functools.wraps(compile_model)
    def compile_with_hint(self, model, device_name="CPU", config=None):
        return compile_model(self, model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": precision})

    ov.Core.compile_model = compile_with_hint
    try:
        yield
    finally:
        ov.Core.compile_model = compile_model


def writable_data(data: Path, tmp: Path) -> Path:
    """`data`, or a copy of its folder in `tmp` when that folder is read-only (../shared/data): Ultralytics writes
    label caches beside the labels."""
    folder = data.resolve().parent
    if os.stat(folder).st_mode & 0o200:
        return data
    copy = tmp / "data" / folder.name
    if not copy.exists():
        shutil.copytree(folder, copy)
        for p in [copy, *copy.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    return copy / data.name


def export_pair(ckpt: Path, data: Path, imgsz: int, work: Path) -> dict[str, Path]:
    """fp32 and int8 OpenVINO exports of a copy of `ckpt` in `work` (exports are written beside the weights)."""
    local = work / ckpt.parent.parent.name / ckpt.name if ckpt.parent.name == "weights" else work / ckpt.name
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt, local)
    out = {}
    for key, kwargs in (("fp32", {}), ("int8", {"int8": True, "data": str(data)})):
        t = time.perf_counter()
        out[key] = Path(YOLO(str(local)).export(format="openvino", imgsz=imgsz, batch=1, **kwargs))
        print(f"  {key} export: {time.perf_counter() - t:.0f} s", flush=True)
    return out


def validate(path: Path, tood: bool, data: Path, split: str, imgsz: int) -> dict:
    """`yolo val` of an export: mAPs and Ultralytics' ms/img."""
    m = YOLO(str(path), task="detect").val(
        validator=TOODDetectionValidator if tood else None, data=str(data), split=split, imgsz=imgsz, batch=1,
        device="cpu", workers=0, plots=False, verbose=False,
    )
    return {"map": m.box.map, "map50": m.box.map50, "inference": m.speed["inference"],
            "postprocess": m.speed["postprocess"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="trained checkpoints (.pt), TOOD's or Ultralytics'")
    p.add_argument("--data", type=Path, default=BCCD, help="dataset YAML (calibration on its val split)")
    p.add_argument("--split", default="test", help="split the mAPs are measured on")
    p.add_argument("--imgsz", type=int, default=256, help="export and validation size (the models' training size)")
    p.add_argument("--threads", type=int, default=1, help="OpenVINO inference threads for the latency; 0 = all")
    p.add_argument("--runs", type=int, default=30, help="timed runs per latency (median)")
    p.add_argument("--ov-precision", default="f32", choices=("f32", "bf16", "f16"),
                   help="OpenVINO CPU precision of float ops, for mAP and latency")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "int8.md", help="Markdown file the rows go to")
    args = p.parse_args(argv)
    missing = [str(m) for m in args.models if not m.is_file()] + ([] if args.data.is_file() else [str(args.data)])
    if missing:
        p.error(f"not found: {', '.join(missing)}")
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        p.error(f"{e.name} is not installed: pip install -e '.[export]' (openvino, nncf)")
    torch.set_num_threads(args.threads or os.cpu_count())
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(line: str) -> None:
        print(line, flush=True)
        with args.out.open("a") as f:
            f.write(line + "\n")

    emit(f"\n{time.strftime('%Y-%m-%d %H:%M')}: {cpu_name()}, {os.cpu_count()} cores, load "
         f"{os.getloadavg()[0]:.1f}; {args.data} split {args.split}, imgsz {args.imgsz}, batch 1, OpenVINO "
         f"{openvino.__version__} ({args.ov_precision} float ops), nncf {nncf.__version__}\n")
    emit("| model | fp32 mAP50-95 | int8 mAP50-95 | change | fp32 mAP50 | int8 mAP50 | post-process ms/img |\n"
         "|---|---|---|---|---|---|---|")
    runners = {}
    with tempfile.TemporaryDirectory() as tmp, ov_precision(args.ov_precision):
        work = Path(tmp)
        data = writable_data(args.data, work)
        for i, ckpt in enumerate(args.models):
            name = ckpt.parent.parent.name if ckpt.parent.name == "weights" else ckpt.stem
            name = f"{name} ({i + 1})" if any(n == name for n, _ in runners) else name
            tood = isinstance(YOLO(str(ckpt)), TOOD)
            print(f"{name} ({'TOOD' if tood else 'Ultralytics'}): exporting...", flush=True)
            exports = export_pair(ckpt, data, args.imgsz, work)
            r = {k: validate(f, tood, data, args.split, args.imgsz) for k, f in exports.items()}
            emit(f"| {name} | {r['fp32']['map']:.3f} | {r['int8']['map']:.3f} | "
                 f"{r['int8']['map'] - r['fp32']['map']:+.3f} | {r['fp32']['map50']:.3f} | "
                 f"{r['int8']['map50']:.3f} | {r['int8']['postprocess']:.1f} |")
            for k, f in exports.items():
                xml = next(f.glob("*.xml"))
                runners[(name, k)] = openvino_runner(str(xml), args.imgsz, args.threads, args.ov_precision)
        x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
        print("timing every model and precision in interleaved rounds...", flush=True)
        ms = interleaved({k: functools.partial(run, x) for k, run in runners.items()}, args.runs, warmup=3)
    emit(f"\nOpenVINO latency, batch 1, {args.threads or os.cpu_count()} thread(s), median of {args.runs} interleaved "
         f"rounds, network only (no letterbox/NMS):\n")
    emit("| model | fp32 ms | int8 ms | speed-up |\n|---|---|---|---|")
    for name in dict.fromkeys(n for n, _ in runners):
        emit(f"| {name} | {ms[(name, 'fp32')]:.1f} | {ms[(name, 'int8')]:.1f} | "
             f"{ms[(name, 'fp32')] / ms[(name, 'int8')]:.2f}x |")


if __name__ == "__main__":
    main()
