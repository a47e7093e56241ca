"""Post-processing of TOOD models with and without the pre-NMS bound, next to their Ultralytics twins.

    python benchmarks/postprocess.py                 # PLAN: synthetic val (after train.py runs), bccd val
    python benchmarks/postprocess.py --model runs/a/weights/best.pt --twin runs/b/weights/best.pt \
        --data path/data.yaml --imgsz 256            # one trained TOOD model and its twin
    python benchmarks/postprocess.py --max-nms 300 1000 --out postprocess.md

Every case validates, on the same images with the same arguments (Ultralytics' `yolo val` defaults: conf 0.001, iou
0.7, max_det 300, rect batches; batch 1, CPU):
- the twin, an Ultralytics model, with Ultralytics' own validator,
- the TOOD model without the bound (`max_nms` = 30,000, Ultralytics' own cap: TOOD's post-processing before it),
- the TOOD model with it (`TOODDetectionValidator`, `max_nms` = each value of `--max-nms`).
Each pass gives mAP50-95, mAP50, Ultralytics' inference and post-processing ms per image, and the candidates NMS
received per image (torchvision's NMS is counted as it runs). TOOD's validator runs NMS without Ultralytics' time
limit, so the unbounded pass loses no detections to the machine's load.

The post-processing times of a validation pass depend on the load of the moment. So each pass also keeps its raw
predictions, and after the passes each validator's `postprocess` is timed again on them image by image, all
validators of the case in interleaved rounds (`--rounds`, median per image, then mean over images): the "x twin"
ratio compares times taken under the same load. Rows are appended to `--out` as each case ends.

PLAN, the cases of issue 19:
- synthetic val (64 images, imgsz 256): tood-n and yolov8n trained by the main job's settings, `python train.py
  model=tood-n.yaml` and `python train.py model=yolov8n.yaml`; skipped with a note if not trained.
- bccd val (87 images, imgsz 256), untrained, for timing only (mAP ~0): yolo11n-tood against yolo11n and tood-r50
  against yolov8s (the twins of benchmarks/latency.py). An untrained TOOD model is post-processing's worst case: every
  score passes conf=0.001. Ultralytics' untrained Detect has few scores above it, so its time is a floor.
YAML models are built (seed 0) with the dataset's classes; trained models keep theirs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import torch  # noqa: E402
import torchvision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a source checkout without an installed package

from ultralytics import YOLO  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.models.yolo.detect import DetectionValidator  # noqa: E402

from tood_yolo.engine.candidates import MAX_NMS  # noqa: E402
from tood_yolo.engine.validator import TOODDetectionValidator  # noqa: E402

ULTRALYTICS_MAX_NMS = 30_000  # non_max_suppression's default cap: TOOD's post-processing before the bound
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "data.yaml"
# (name, TOOD model, Ultralytics twin, data, imgsz)
PLAN = [
    ("synthetic", "runs/tood-n-synthetic/weights/best.pt", "runs/yolov8n-synthetic/weights/best.pt",
     "datasets/synthetic/data.yaml", 256),
    ("bccd (untrained)", "cfg/yolo11n-tood.yaml", "yolo11n.yaml", str(BCCD), 256),
    ("bccd (untrained)", "cfg/tood-r50.yaml", "yolov8s.yaml", str(BCCD), 256),
]


@contextmanager
def nms_counter():
    """Count the boxes each torchvision NMS call receives (Ultralytics' NMS calls it once per image)."""
    counts, nms_fn = [], torchvision.ops.nms

    def counting(boxes, scores, iou_threshold):
        counts.append(len(boxes))
        return nms_fn(boxes, scores, iou_threshold)

    torchvision.ops.nms = counting
    try:
        yield counts
    finally:
        torchvision.ops.nms = nms_fn


def writable(data: str, tmp: Path) -> str:
    """`data`, or a copy of its folder in `tmp` when that folder is read-only (../shared/data): Ultralytics writes label
    caches beside the labels."""
    folder = Path(data).resolve().parent
    if folder.stat().st_mode & stat.S_IWUSR:
        return data
    copy = tmp / folder.name
    if not copy.exists():
        shutil.copytree(folder, copy)
        for d in [copy, *copy.rglob("*")]:  # copytree keeps the read-only modes
            d.chmod(d.stat().st_mode | stat.S_IWUSR)
    return str(copy / Path(data).name)


class Recording:
    """A validator mixin that keeps every batch's raw predictions, to time `postprocess` again on them."""

    def postprocess(self, preds):
        self.raw = getattr(self, "raw", [])
        self.raw.append(preds[0] if isinstance(preds, (list, tuple)) else preds)
        return super().postprocess(preds)


def validator_class(max_nms: int | None) -> type:
    """Ultralytics' validator (None) or TOOD's with NMS bounded at `max_nms` candidates per image, recording."""
    if max_nms is None:
        return type("UltralyticsValidator", (Recording, DetectionValidator), {})
    return type(f"TOODValidator{max_nms}", (Recording, TOODDetectionValidator), {"max_nms": max_nms})


def load(model: str, data: str) -> YOLO:
    """A trained model, or a YAML built (seed 0) with the dataset's classes."""
    path = ROOT / model if (ROOT / model).exists() else Path(model)
    if path.suffix not in {".yaml", ".yml"}:
        return YOLO(str(path))
    torch.manual_seed(0)
    yolo = YOLO(str(path) if path.exists() else model)  # Ultralytics' own YAMLs by name
    names = check_det_dataset(data)["names"]
    yolo.model = type(yolo.model)(yolo.model.yaml, nc=len(names), verbose=False)
    yolo.model.names = names
    return yolo


def validate(yolo: YOLO, max_nms: int | None, data: str, imgsz: int) -> dict:
    """One `yolo val` pass (batch 1): mAPs, Ultralytics' ms/img, NMS's candidates per image, and the validator."""
    seen = {}

    def keep(validator) -> None:
        seen["validator"] = validator

    yolo.add_callback("on_val_end", keep)
    try:
        with nms_counter() as counts:
            m = yolo.val(validator=validator_class(max_nms), data=data, imgsz=imgsz, batch=1, device="cpu",
                         workers=0, plots=False, verbose=False, save_json=False)
    finally:
        yolo.callbacks["on_val_end"].remove(keep)
    return {
        "map": m.box.map, "map50": m.box.map50, "inference": m.speed["inference"],
        "postprocess": m.speed["postprocess"], "nms_mean": statistics.fmean(counts) if counts else 0.0,
        "nms_max": max(counts, default=0), "validator": seen["validator"],
    }


def retime(results: dict[str, dict], rounds: int) -> None:
    """Time each validator's `postprocess` again on its own recorded predictions, image by image, all validators in
    interleaved rounds; adds "ms" (mean over images of the median over rounds) to each result."""
    n = min(len(r["validator"].raw) for r in results.values())
    times = {k: [[] for _ in range(n)] for k in results}
    for _ in range(rounds):
        for i in range(n):
            for k, r in results.items():
                v, preds = r["validator"], r["validator"].raw[i]
                t = time.perf_counter()
                v.postprocess(preds)
                times[k][i].append(time.perf_counter() - t)
    for k, r in results.items():
        r["ms"] = 1000 * statistics.fmean(statistics.median(t) for t in times[k])


HEADER = ("| data | model | NMS candidates cap | mAP50-95 | mAP50 | inference ms/img | post-process ms/img (val "
          "pass) | post-process ms/img (interleaved) | x twin | NMS input / img (mean, max) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def row(data: str, model: str, cap: str, r: dict, twin: dict) -> str:
    ratio = f"{r['ms'] / twin['ms']:.2f}" if r is not twin else "1"
    return (f"| {data} | {model} | {cap} | {r['map']:.4f} | {r['map50']:.4f} | {r['inference']:.1f} | "
            f"{r['postprocess']:.2f} | {r['ms']:.2f} | {ratio} | {r['nms_mean']:.0f}, {r['nms_max']} |")


def run_case(name, model, twin, data, imgsz, args, tmp: Path) -> list[str]:
    """Validate the twin, the TOOD model unbounded and bounded, retime their post-processing; the table rows."""
    missing = [p for p in (model, twin, data) if p.endswith((".pt", "data.yaml")) and not (ROOT / p).exists()
               and not Path(p).exists()]
    if missing:
        print(f"note: {name}: {', '.join(missing)} not found, skipped (train the models first; see the docstring)")
        return []
    data = writable(str(ROOT / data) if (ROOT / data).exists() else data, tmp)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    caps = {"twin": None, **({} if args.no_unbounded else {"unbounded": ULTRALYTICS_MAX_NMS})}
    caps.update({f"k{k}": k for k in args.max_nms})
    tood = load(model, data)
    results = {key: validate(load(twin, data) if key == "twin" else tood, k, data, imgsz) for key, k in caps.items()}
    retime(results, args.rounds)
    label = {m: Path(m).stem if m.endswith("yaml") else m for m in (model, twin)}
    rows = []
    for key, k in caps.items():
        cap = {"twin": "Ultralytics (30000)", "unbounded": f"{ULTRALYTICS_MAX_NMS} (no bound)"}.get(key, f"{k}")
        cap += " (default)" if k == MAX_NMS else ""
        rows.append(row(name, label[twin if key == "twin" else model], cap, results[key], results["twin"]))
    print(f"  {name}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a TOOD checkpoint or YAML (instead of PLAN)")
    p.add_argument("--twin", help="its Ultralytics twin, checkpoint or YAML (with --model)")
    p.add_argument("--data", help="dataset YAML (with --model)")
    p.add_argument("--imgsz", type=int, default=256, help="validation image size (with --model)")
    p.add_argument("--name", default="custom", help="the data column of the rows (with --model)")
    p.add_argument("--max-nms", type=int, nargs="+", default=[MAX_NMS], help="bounds to measure (candidates/image)")
    p.add_argument("--no-unbounded", action="store_true", help="skip the unbounded pass (slow for untrained models)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of the recorded post-processing")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (NMS itself is single-threaded)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "postprocess.md", help="Markdown file the rows go to")
    args = p.parse_args(argv)
    if args.model and not (args.twin and args.data):
        p.error("--model needs --twin and --data")
    plan = [(args.name, args.model, args.twin, args.data, args.imgsz)] if args.model else PLAN
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch "
                f"{torch.__version__}, {args.threads} thread(s), batch 1, conf 0.001, iou 0.7, max_det 300, "
                f"{args.rounds} interleaved rounds\n\n{HEADER}\n")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for case in plan:
            rows = run_case(*case, args, Path(tmp))
            with args.out.open("a") as f:
                f.write("".join(r + "\n" for r in rows))
            print("\n".join(rows), flush=True)
    print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
