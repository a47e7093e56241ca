"""CUDA figures for TOOD: training images/s with AMP off and on, peak memory, eval latency, R-50 training through
`yolo train` with the reference's pipeline, and a 200-iteration AMP run.

    python benchmarks/gpu.py              # on a CUDA machine: well under 8 min on one H200
    python benchmarks/gpu.py --dry-run    # the same code on the CPU, each model once on a tiny input (no AMP/memory)

Rows (`CONFIGS`): tood-r50 at batch 2 on 800x1344 (mmdet's 1333x800 scale, padded to a multiple of 32 as mmdet pads
its batches; Ultralytics itself would letterbox to a square), tood-r50 at batch 16 on 640x640, tood-n at batch 64 on
640x640, and yolo11n-tood at batch 64 on 640x640 when cfg/yolo11n-tood.yaml exists.

- Train images/s: full training steps (forward, TOOD's loss in its task-alignment phase, backward, SGD step) on random
  images with 8 random boxes each, already on the GPU: the network and loss without data loading. AMP: fp16 autocast
  and a GradScaler, as Ultralytics' trainer runs it. Untrained weights (the ResNet from ImageNet when torchvision's
  checkpoint is in the torch hub cache): speed and memory do not depend on training.
- Peak memory: `torch.cuda.max_memory_allocated` over those steps (model, gradients, momentum and activations), which
  is what mmdetection logs as `memory` and reports in its model zoo. Anchor: mmdetection reports 4.1 GB per GPU for
  TOOD R-50 1x (fp32, batch 2 per GPU, 1333x800).
- Eval latency: batch 1, the network only (no letterbox, no NMS), fused as Ultralytics' predictor runs it, fp32 and
  fp16 (`.half()`, as `half=True`); median of the timed runs.
- R-50 through `yolo train` (`recipe: mmdet`, its input pipeline: keep-ratio resize to fit 1333x800, flips,
  batches padded to multiples of 32 and grouped by aspect ratio, `tood_yolo/data/reference.py`): one epoch of 40
  iterations at batch 2, fp32 (as mmdet's 4.1 GB), Ultralytics' loader with 8 workers, on a synthetic set stretched to
  COCO's usual shapes (3 of 4 images 640x480, 1 of 4 480x640: 1067x800 and 800x1067 inputs); images/s over the
  iterations after the first 8 (data loading included), peak memory over the run (it holds Ultralytics' EMA copy of
  the model too, which mmdet's 1x recipe has not). Random init (`pretrained=False`): speed and memory do not depend on
  the weights.
- AMP run: 200 iterations of Ultralytics' trainer (TOODTrainer, its dataloaders and augmentation, `amp=True` with
  TOOD's AMP check, GradScaler, EMA, the final validation under autocast) training tood-n from scratch on a synthetic
  shapes set (`tood_yolo.data.synthetic`); every iteration's loss must be finite. Also printed: the AMP decision, and
  how often the GradScaler lowered its scale (a step skipped for inf/NaN gradients).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
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
from tood_yolo.data.reference import reference_scale  # noqa: E402
from tood_yolo.data.synthetic import make_synthetic_dataset  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from tood_yolo.nn.model import TOODDetectionModel as DetectionModel  # noqa: E402

CONFIGS = [  # model, batch, (height, width)
    ("tood-r50", 2, (800, 1344)),
    ("tood-r50", 16, (640, 640)),
    ("tood-n", 64, (640, 640)),
    ("yolo11n-tood", 64, (640, 640)),
]
MMDET_MEM_GB = {("tood-r50", 2, (800, 1344)): 4.1}  # mmdetection's TOOD R-50 1x model zoo, fp32
PIPELINE_RUN = {"model": "tood-r50", "batch": 2, "imgsz": 1333, "n_train": 80, "skip": 8}  # one epoch, 40 iterations
DRY_PIPELINE_RUN = {"model": "tood-r50", "batch": 2, "imgsz": 128, "n_train": 4, "skip": 0}
AMP_RUN = {"model": "tood-n", "iters": 200, "batch": 16, "imgsz": 320, "n_train": 320, "n_val": 64}  # 20 it/epoch
DRY = {"batch": 2, "hw": (64, 64), "steps": 1, "warmup": 1, "runs": 1}
DRY_AMP_RUN = {"model": "tood-n", "iters": 2, "batch": 2, "imgsz": 64, "n_train": 4, "n_val": 2}


def build(name: str, device: torch.device) -> DetectionModel:
    """An untrained model from cfg/<name>.yaml on `device`."""
    torch.manual_seed(0)
    return DetectionModel(ROOT / "cfg" / f"{name}.yaml", verbose=False).to(device)


def random_batch(b: int, hw: tuple[int, int], device: torch.device, objects: int = 8) -> dict:
    """An Ultralytics training batch of random images with `objects` random boxes (5-50 % of the side) per image."""
    g = torch.Generator().manual_seed(0)
    n = b * objects
    wh = 0.05 + 0.45 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return {
        "img": torch.rand(b, 3, *hw, generator=g).to(device),
        "batch_idx": torch.arange(b).repeat_interleave(objects).float().to(device),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat((xy, wh), 1).to(device),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(model: DetectionModel, batch: dict, amp: bool, steps: int, warmup: int) -> tuple[float, float | None]:
    """Training images/s over `steps` timed steps after `warmup` ones, and the peak CUDA memory (GB) of all of them."""
    device = batch["img"].device
    model.train()
    model.criterion = model.init_criterion()
    model.criterion.epoch = model.criterion.recipe.warmup.epochs  # task alignment learning: most of a run
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = model.loss(batch)[0].sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = batch["img"].shape[0] * steps / (time.perf_counter() - t)
    return rate, torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def eval_ms(model: DetectionModel, hw: tuple[int, int], half: bool, runs: int) -> float:
    """Median ms of a batch-1 eval forward of the fused model, in fp16 (`.half()`) or fp32."""
    device = next(model.parameters()).device
    m = copy.deepcopy(model).eval().fuse(verbose=False)
    dtype = torch.float16 if half else torch.float32
    m.to(dtype)
    x = torch.rand(1, 3, *hw, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):  # two untimed warm-up runs
            sync(device)
            t = time.perf_counter()
            m(x)
            sync(device)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[2:])


def amp_run(device: torch.device, work: Path, model: str, iters: int, batch: int, imgsz: int, n_train: int,
            n_val: int) -> dict:
    """`iters` training iterations of Ultralytics' trainer with amp=True on a synthetic set; per-iteration losses."""
    data = make_synthetic_dataset(work / "synthetic", n_train=n_train, n_val=n_val, imgsz=imgsz)
    per_epoch = math.ceil(n_train / batch)
    if iters % per_epoch:
        raise ValueError(f"iters={iters} is not a whole number of epochs of {per_epoch} iterations")
    losses, scales, amp = [], [], []

    def record(trainer) -> None:
        losses.append(trainer.loss.detach().item())
        scales.append(trainer.scaler.get_scale())

    yolo = YOLO(str(ROOT / "cfg" / f"{model}.yaml"))
    yolo.add_callback("on_train_start", lambda trainer: amp.append(trainer.amp))
    yolo.add_callback("on_train_batch_end", record)
    cuda = device.type == "cuda"
    yolo.train(data=str(data), epochs=iters // per_epoch, batch=batch, imgsz=imgsz, device=(device.index or 0) if cuda
               else "cpu", amp=True, val=False, plots=False, workers=8 if cuda else 0, project=str(work / "runs"),
               name="amp", exist_ok=True, seed=0, verbose=False)
    drops = sum(b < a for a, b in zip(scales, scales[1:]))
    return {"amp": amp[0], "iters": len(losses), "finite": all(map(math.isfinite, losses)), "first": losses[0],
            "last": losses[-1], "scale_drops": drops if amp[0] else None}


def coco_shaped(data: Path) -> Path:
    """Stretch the training images of a synthetic set to COCO's usual shapes, 3 of 4 to 640x480 and 1 of 4 to
    480x640 (its normalised labels stay right); returns the set's data.yaml."""
    import cv2

    for i, file in enumerate(sorted((data.parent / "images" / "train").glob("*.jpg"))):
        cv2.imwrite(str(file), cv2.resize(cv2.imread(str(file)), (480, 640) if i % 4 == 3 else (640, 480)))
    return data


def pipeline_run(device: torch.device, work: Path, model: str, batch: int, imgsz: int, n_train: int,
                 skip: int) -> dict:
    """One epoch of `yolo train` under `recipe: mmdet` (fp32, random init): images/s after `skip` iterations, peak
    memory (GB, CUDA only) and the iterations run."""
    data = coco_shaped(make_synthetic_dataset(work / "coco_shaped", n_train=n_train, n_val=2, imgsz=640))
    times = []

    def start(trainer) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def end_batch(trainer) -> None:
        sync(device)
        times.append(time.perf_counter())

    yolo = YOLO(str(ROOT / "cfg" / f"{model}.yaml"))
    yolo.add_callback("on_train_start", start)
    yolo.add_callback("on_train_batch_end", end_batch)
    cuda = device.type == "cuda"
    yolo.train(data=str(data), recipe="mmdet", pretrained=False, epochs=1, batch=batch, imgsz=imgsz, amp=False,
               val=False, plots=False, device=(device.index or 0) if cuda else "cpu", workers=8 if cuda else 0,
               project=str(work / "runs"), name="pipeline", exist_ok=True, seed=0, verbose=False)
    rate = batch * (len(times) - 1 - skip) / (times[-1] - times[skip])
    return {"ips": rate, "mem": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            "iters": len(times)}


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU parts on tiny inputs (tests run this)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row and AMP setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before them")
    p.add_argument("--runs", type=int, default=30, help="timed eval runs per row and precision")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; --dry-run runs its CPU parts")
    device = torch.device("cuda" if cuda else "cpu")
    steps, warmup, runs = (DRY["steps"], DRY["warmup"], DRY["runs"]) if args.dry_run else (args.steps, args.warmup,
                                                                                        args.runs)
    t0 = time.perf_counter()
    rows = []
    for name, b, hw in CONFIGS:
        if not (ROOT / "cfg" / f"{name}.yaml").exists():
            print(f"note: cfg/{name}.yaml does not exist: {name} is skipped")
            continue
        if args.dry_run:  # each model once, on the tiny input
            if any(r["name"] == name for r in rows):
                continue
            b, hw = DRY["batch"], DRY["hw"]
        print(f"{name}, batch {b}, {hw[0]}x{hw[1]}...", flush=True)
        model = build(name, device)
        batch = random_batch(b, hw, device)
        r = {"name": name, "batch": b, "hw": hw, "anchor": MMDET_MEM_GB.get((name, b, hw))}
        r["ips32"], r["mem32"] = train_rate(model, batch, False, steps, warmup)
        r["ips16"], r["mem16"] = train_rate(model, batch, True, steps, warmup) if cuda else (None, None)
        r["ms32"] = eval_ms(model, hw, False, runs)
        r["ms16"] = eval_ms(model, hw, True, runs) if cuda else None
        rows.append(r)
        del model, batch
    pcfg = DRY_PIPELINE_RUN if args.dry_run else PIPELINE_RUN
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{pcfg['model']} through yolo train, recipe mmdet...", flush=True)
        pipe = pipeline_run(device, Path(tmp), **pcfg)
    with tempfile.TemporaryDirectory() as tmp:
        print("AMP run on the synthetic set...", flush=True)
        run = amp_run(device, Path(tmp), **(DRY_AMP_RUN if args.dry_run else AMP_RUN))
    elapsed = time.perf_counter() - t0

    gpu = torch.cuda.get_device_name(device) if cuda else "none (--dry-run on the CPU)"
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}; {steps} timed training steps after {warmup}, eval median of {runs}; "
        f"took {elapsed / 60:.1f} min.",
        "",
        "| model | batch | input | train img/s fp32 | train img/s AMP | peak mem GB fp32 | peak mem GB AMP | "
        "mmdet GB (fp32) | eval ms fp32 | eval ms fp16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['batch']} | {r['hw'][0]}x{r['hw'][1]} | {fmt(r['ips32'])} | {fmt(r['ips16'])} | "
            f"{fmt(r['mem32'], '.2f')} | {fmt(r['mem16'], '.2f')} | {fmt(r['anchor'])} | {fmt(r['ms32'])} | "
            f"{fmt(r['ms16'])} |"
        )
    scale = reference_scale(pcfg["imgsz"])
    lines += [
        "",
        f"`yolo train` under recipe mmdet (its pipeline: keep-ratio {scale[0]}x{scale[1]}, padded batches, aspect-ratio "
        f"groups; fp32, {pipe['iters']} iterations, 3 of 4 images 640x480):",
        "",
        "| model | batch | train img/s fp32 | peak mem GB fp32 | mmdet GB (fp32, 1x, per GPU) |",
        "|---|---|---|---|---|",
        f"| {pcfg['model']} | {pcfg['batch']} | {fmt(pipe['ips'])} | {fmt(pipe['mem'], '.2f')} | 4.1 |",
    ]
    cfg = DRY_AMP_RUN if args.dry_run else AMP_RUN
    lines += [
        "",
        f"AMP run: {cfg['model']}, {run['iters']} iterations at batch {cfg['batch']}, {cfg['imgsz']} px, synthetic "
        f"set of {cfg['n_train']} images; AMP {'on' if run['amp'] else 'off'} (TOOD's AMP check); loss "
        f"{run['first']:.3g} -> {run['last']:.3g}; GradScaler lowered its scale {fmt(run['scale_drops'], 'd')} times; "
        f"losses {'all finite: PASS' if run['finite'] else 'NOT all finite: FAIL'}",
    ]
    print("\n" + "\n".join(lines))
    if not run["finite"] or run["iters"] != cfg["iters"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
