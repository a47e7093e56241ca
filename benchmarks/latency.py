"""Latency of TOOD models against their Ultralytics twins at the same input: PyTorch eager, ONNX Runtime, OpenVINO.

    python benchmarks/latency.py            # every model of PLAN at 320/640 (+800 for R-50); ~15 min on 2 cores
    python benchmarks/latency.py --quick    # smoke run: tood-n and yolov8n at 320, 3 runs (~30 s)
    python benchmarks/latency.py --models yolo11n-tood yolov8n-tood --sizes 640 --runs 15   # these and their twins
    python benchmarks/latency.py --threads 0 --runs 30 --out latency.md
    python benchmarks/latency.py --cfg cfg/yolo11n-tood.yaml runs/x.yaml:yolo11n --sizes 640 --runs 31   # any YAMLs

Batch 1, random weights (untrained builds: latency does not depend on training), ms per image = the median of
`--runs` timed runs after `--warmup` runs. Every model is measured side by side in one process: at each input size
all models and runtimes are timed in interleaved rounds (one call of each per round), so each model's ratio to its
twin (the Ultralytics model of PLAN: yolov8n for tood-n, yolo11n for yolo11n-tood, ...) is taken under the same
machine load even when that load changes. "head %" is the head alone (the T-head, or Ultralytics' Detect; timed on
the neck outputs the model produced) over the whole model, PyTorch eager. Both are the network only: no letterbox,
no NMS.

Input sizes: tensors of exactly 320/640/800 are fed to the networks. Ultralytics' predictor would round imgsz to a
multiple of the largest stride, 128 for TOOD's P3-P7 (320 -> 384, 800 -> 896), but the FPN takes any multiple of 32
and the exported ONNX/OpenVINO models have dynamic height and width. The YOLO twins with the T-head (cfg/yolo*-tood)
have Ultralytics' largest stride, 32.

Threads: one intra-op thread by default (`--threads 1`): on a shared machine it is the reproducible setting (two
threads competing with other jobs on 2 cores ran 10-50x slower here); `--threads 0` uses every core. With a CUDA GPU
the table gains PyTorch CUDA fp32 and fp16 columns.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a source checkout without an installed package

import tood_yolo  # noqa: E402,F401  (registers TOOD with Ultralytics)
from ultralytics import YOLO  # noqa: E402

# (model, its Ultralytics twin, input sizes): the twin is timed at the same sizes, interleaved with the model
PLAN = [("tood-n", "yolov8n", (320, 640)), ("tood-s", "yolov8s", (320, 640)), ("tood-r50", "yolov8s", (320, 640, 800))]
PLAN += [(f"{v}{s}-tood", f"{v}{s}", (320, 640)) for s in "ns" for v in ("yolov8", "yolo11")]


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def interleaved(fns: dict, runs: int, warmup: int) -> dict:
    """Median ms of each callable, timed in rounds (one call of each per round) so that a machine load that changes
    during the benchmark weighs on every model and runtime alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def build(name: str, workdir: Path) -> YOLO:
    """An untrained model from a YAML path, cfg/<name>.yaml or Ultralytics' <name>.yaml."""
    torch.manual_seed(0)
    cfg = Path(name) if name.endswith((".yaml", ".yml")) else ROOT / "cfg" / f"{name}.yaml"
    if cfg.exists():
        shutil.copy(cfg, workdir / cfg.name)  # exports are written beside the YAML
        cfg = workdir / cfg.name
    with contextlib.chdir(workdir):
        return YOLO(str(cfg) if cfg.exists() else f"{name}.yaml")


def export_onnx(model: YOLO, workdir: Path) -> str:
    with contextlib.chdir(workdir):
        f = model.export(format="onnx", imgsz=640, dynamic=True, simplify=True, verbose=False)
    return str(workdir / f)  # f may be relative to workdir


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def openvino_runner(path: str, size: int, threads: int, precision: str):
    """An OpenVINO CPU request for the ONNX model reshaped to 1x3xSxS, or None without openvino."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    m = core.read_model(path)
    m.reshape([1, 3, size, size])
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(m, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def head_inputs(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of the model's last layer (the FPN/neck outputs) for input x."""
    got = {}
    hook = net.model[-1].register_forward_pre_hook(lambda m, inp: got.update(x=inp[0]))
    with torch.no_grad():
        net(x)
    hook.remove()
    return [t.clone() for t in got["x"]]


def callables(model: YOLO, onnx: str | None, size: int, args) -> dict:
    """What is timed for one model at one input size: PyTorch eager, its head alone, ORT, OpenVINO, CUDA."""
    net = model.model
    head = net.model[-1]
    x = torch.rand(1, 3, size, size)
    feats = head_inputs(net, x)

    def pt():
        with torch.inference_mode():
            net(x)

    def head_only():
        with torch.inference_mode():
            head(list(feats))  # Detect edits its input list in place

    fns = {"pt": pt, "head": head_only}
    if onnx:
        sess = ort_session(onnx, args.threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        fns["ort"] = lambda: sess.run(None, feed)
        ov_run = None if args.no_openvino else openvino_runner(onnx, size, args.threads, args.ov_precision)
        if ov_run:
            fns["ov"] = lambda: ov_run(x.numpy())
    if torch.cuda.is_available():
        for key, dtype in (("cuda32", torch.float32), ("cuda16", torch.float16)):
            m = copy.deepcopy(net).to("cuda", dtype)
            xc = x.to("cuda", dtype)

            def cuda(m=m, xc=xc):
                with torch.inference_mode():
                    m(xc)
                torch.cuda.synchronize()

            fns[key] = cuda
    return fns


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tood-n and yolov8n at 320, 3 runs")
    p.add_argument("--models", nargs="+", choices=[m for m, _, _ in PLAN], help="only these models (and their twins)")
    p.add_argument("--sizes", type=int, nargs="+", help="only these of the models' input sizes")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime; 0 = all cores")
    p.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--no-openvino", action="store_true", help="skip OpenVINO even when installed")
    p.add_argument("--ov-precision", default="f32", choices=("f32", "bf16", "f16"),
                   help="OpenVINO CPU inference precision (its default is bf16 on CPUs that have it)")
    p.add_argument("--cfg", nargs="+", default=[], metavar="YAML[:TWIN]",
                   help="also time these model YAMLs, each beside its twin (default yolo11n), at --sizes (or 640)")
    p.add_argument("--out", type=Path, help="also write the Markdown to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.warmup = 3, 1
    args.threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.threads)

    names = args.models or ([] if args.cfg else [m for m, _, _ in PLAN])  # --cfg alone: only those YAMLs
    plan = [("tood-n", "yolov8n", (320,))] if args.quick else [r for r in PLAN if r[0] in names]
    if args.sizes:
        plan = [(m, b, tuple(s for s in sizes if s in args.sizes)) for m, b, sizes in plan]
        plan = [r for r in plan if r[2]]
    for name, _, _ in plan:
        if not (ROOT / "cfg" / f"{name}.yaml").exists():
            print(f"note: cfg/{name}.yaml is absent: {name} is skipped")
    plan = [row for row in plan if (ROOT / "cfg" / f"{row[0]}.yaml").exists()]
    for spec in args.cfg:
        path, _, base = spec.partition(":")
        if not Path(path).is_file():
            raise SystemExit(f"--cfg {path}: no such file")
        plan.append((str(Path(path).resolve()), base or "yolo11n", tuple(args.sizes or (640,))))
    baselines: dict[str, set[int]] = {}
    for _, base, sizes in plan:
        baselines.setdefault(base, set()).update(sizes)

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    sizes_of = {**{b: sorted(s) for b, s in baselines.items()}, **{n: list(s) for n, _, s in plan}}
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in sizes_of}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {}
        for name in sizes_of:
            print(f"{name}: building and exporting to ONNX...", flush=True)
            model = build(name, work)
            try:
                onnx = export_onnx(model, work)
            except Exception as e:  # still time PyTorch
                print(f"  ONNX export failed: {e}")
                onnx = None
            model.model.eval().fuse(verbose=False)  # as the predictor runs it
            models[name] = (model, onnx)
        for size in sorted(set().union(*map(set, sizes_of.values()))):
            names = [n for n in sizes_of if size in sizes_of[n]]
            print(f"input {size}: timing {', '.join(names)} in rounds...", flush=True)
            fns = {(n, k): fn for n in names for k, fn in callables(*models[n], size, args).items()}
            for (n, k), ms in interleaved(fns, args.runs, args.warmup).items():
                results[n].setdefault(size, {})[k] = ms
            for n in names:
                print(f"  {n} {size}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results[n][size].items()), flush=True)
    elapsed = time.perf_counter() - t0

    import onnxruntime
    import ultralytics

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    have_ov = any("ov" in r for res in results.values() for r in res.values())
    have_cuda = torch.cuda.is_available()
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s) per runtime; load average "
        f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, openvino {ov_version or 'not installed'}"
        + (f" ({args.ov_precision})" if have_ov else "") + f", ultralytics {ultralytics.__version__}"
        + (f", GPU {torch.cuda.get_device_name()}" if have_cuda else ", no GPU") + ".",
        f"Batch 1, median of {args.runs} timed runs after {args.warmup} warm-up, all models and runtimes of one input "
        f"size timed in interleaved rounds; exact SxS input tensors, network only (no letterbox/NMS); run took "
        f"{elapsed / 60:.1f} min.",
        "",
    ]
    cols = ["model", "input", "PyTorch ms", "ORT ms"] + (["OpenVINO ms"] if have_ov else [])
    cols += (["CUDA fp32 ms", "CUDA fp16 ms"] if have_cuda else []) + ["head %", "twin", "x twin (pt / ort)"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if key in a and b and key in b else "-"

    twin = {n: b for n, b, _ in plan}
    for name in [*baselines, *(n for n, _, _ in plan)]:
        for s, r in results[name].items():
            label = Path(name).stem if name.endswith((".yaml", ".yml")) else name
            cells = [label, str(s), fmt(r.get("pt")), fmt(r.get("ort"))] + ([fmt(r.get("ov"))] if have_ov else [])
            cells += [fmt(r.get("cuda32")), fmt(r.get("cuda16"))] if have_cuda else []
            cells.append(f"{100 * r['head'] / r['pt']:.0f}")
            base = twin.get(name)
            b = results.get(base, {}).get(s)
            cells += [base or "-", f"{ratio(r, b, 'pt')} / {ratio(r, b, 'ort')}" if b else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
