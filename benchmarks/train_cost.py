"""Training cost of the T-head against YOLO11n's Detect: one optimiser step split into forward, loss and backward.

    python benchmarks/train_cost.py                            # yolo11n vs cfg/yolo11n-tood-bn.yaml, bccd train
    python benchmarks/train_cost.py --rounds 7 --threads 1 --profile 2 --phase tal
    python benchmarks/train_cost.py --models yolo11n.yaml cfg/yolo11n-tood.yaml --data path/data.yaml

Both models are built untrained (the cost of a step does not depend on the weights), in training mode, each with the
loss its trainer uses: Ultralytics' `v8DetectionLoss` (its task-aligned assigner) for yolo11n, TOOD's `TOODLoss`
(TAL after the ATSS warm-up, or the warm-up's ATSS with `--phase atss`) for the T-head. The batches are Ultralytics'
training batches (mosaic and the default augmentation, `--imgsz`, `--batch`), drawn once from the train split of a
copy of `--data` and fed to every model alike. A step is: forward (the model in training mode), loss (with its
assigner), backward + SGD step; each part is timed alone. Every round runs each batch through every model in turn
(interleaved), so a machine load that changes weighs on every model alike; the medians over all steps of all rounds
are printed, with the ratio to the first model. `--profile N` then prints torch.profiler's table of the top ops of N
loss calls of each TOOD loss.
"""

from __future__ import annotations

import argparse
import os
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # a source checkout without an installed package; latency.py's helpers

from latency import cpu_name  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.data import build_dataloader, build_yolo_dataset  # noqa: E402
from ultralytics.data.utils import check_det_dataset  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.torch_utils import init_seeds  # noqa: E402

from tood_yolo.nn.configs import read_config  # noqa: E402
from tood_yolo.nn.model import TOODDetectionModel, is_tood  # noqa: E402
from tood_yolo.utils.loss import TOODLoss  # noqa: E402

BCCD = ROOT.parent / "shared" / "data" / "bccd" / "data.yaml"
PARTS = ("forward", "loss", "backward")


def batches(data: Path, imgsz: int, batch: int, n: int, work: Path) -> tuple[list[dict], int]:
    """`n` Ultralytics training batches (images scaled to 0-1, as the trainer's `preprocess_batch`) from the train split
    of a copy of `data` (Ultralytics writes label caches beside the labels), and the number of classes."""
    copy = work / data.resolve().parent.name
    shutil.copytree(data.resolve().parent, copy)
    for p in [copy, *copy.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    info = check_det_dataset(str(copy / data.name))
    init_seeds(0)  # the same batches every run (mosaic and augmentation draw from random, numpy and torch)
    cfg = get_cfg(overrides={"imgsz": imgsz, "batch": batch, "workers": 0})
    dataset = build_yolo_dataset(cfg, info["train"], batch, info, mode="train", stride=32)
    loader = iter(build_dataloader(dataset, batch, 0, shuffle=True, rank=-1))
    out = []
    for _ in range(n):
        b = next(loader)
        out.append({**b, "img": b["img"].float() / 255})
    return out, info["nc"]


def build(cfg: str, nc: int, phase: str, seed: int = 0) -> torch.nn.Module:
    """An untrained model in training mode with its trainer's loss and Ultralytics' default hyper-parameters; a TOOD
    loss is put in `phase` ("tal": after the ATSS warm-up, "atss": inside it)."""
    torch.manual_seed(seed)
    tood = Path(cfg).is_file() and is_tood(read_config(cfg))
    model = TOODDetectionModel(cfg, nc=nc, verbose=False) if tood else DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg()
    model.criterion = model.init_criterion()
    if isinstance(model.criterion, TOODLoss):
        model.criterion.epoch = 0 if phase == "atss" else model.criterion.recipe.warmup.epochs
        if model.criterion.warmup != (phase == "atss"):
            raise ValueError(f"{cfg}: its recipe has no ATSS warm-up to put the loss in ({phase=})")
    return model.train()


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> dict[str, float]:
    """One optimiser step; seconds of its forward, loss and backward (+ optimiser step)."""
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    preds = model(batch["img"])
    t1 = time.perf_counter()
    loss, _ = model.criterion(preds, batch)
    t2 = time.perf_counter()
    loss.sum().backward()
    opt.step()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2}


def profile_loss(name: str, model: torch.nn.Module, data: list[dict], n: int, top: int) -> None:
    """torch.profiler's table of the top ops (by self CPU time) of `n` loss calls of `model`."""
    from torch.profiler import ProfilerActivity, profile

    preds = [model(b["img"]) for b in data[:n]]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for p, b in zip(preds, data[:n]):
            model.criterion(p, b)
    print(f"\n{name}: top ops of {n} loss calls (forward of the loss and its assigner)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["yolo11n.yaml", str(ROOT / "cfg" / "yolo11n-tood-bn.yaml")],
                   help="model YAMLs; the first is the baseline of the ratios")
    p.add_argument("--data", type=Path, default=BCCD, help="dataset YAML (its train split gives the batches)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="distinct batches per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the first one is a warm-up, not timed)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--phase", default="tal", choices=("tal", "atss"), help="TOOD loss phase")
    p.add_argument("--profile", type=int, default=0, help="profile this many loss calls of each TOOD model")
    p.add_argument("--top", type=int, default=25, help="profiler rows")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"not found: {args.data}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data, nc = batches(args.data, args.imgsz, args.batch, args.batches, Path(tmp))
    models = {Path(m).stem: build(m, nc, args.phase) for m in args.models}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()}
    times = {k: {part: [] for part in PARTS} for k in models}
    for r in range(args.rounds):
        for b in data:
            for k, m in models.items():
                t = step(m, opts[k], b)
                if r:  # round 0 warms up allocators and caches
                    for part in PARTS:
                        times[k][part].append(t[part])
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}: {cpu_name()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {args.threads} thread(s); {args.data} train, "
          f"imgsz {args.imgsz}, batch {args.batch}, TOOD loss phase {args.phase}; median of "
          f"{(args.rounds - 1) * args.batches} steps ({args.rounds - 1} interleaved rounds of {args.batches} "
          "batches)\n")
    print("| model | forward ms | loss ms | backward + step ms | step ms | x first (fwd / loss / bwd / step) |")
    print("|---|---|---|---|---|---|")
    med = {k: {part: 1000 * statistics.median(v) for part, v in t.items()} for k, t in times.items()}
    for k, t in times.items():
        med[k]["step"] = 1000 * statistics.median(map(sum, zip(*t.values())))
    base = med[next(iter(med))]
    for k, m in med.items():
        ratios = " / ".join(f"{m[part] / base[part]:.2f}" for part in (*PARTS, "step"))
        print(f"| {k} | {m['forward']:.0f} | {m['loss']:.0f} | {m['backward']:.0f} | {m['step']:.0f} | {ratios} |")
    if args.profile:
        for k, m in models.items():
            if isinstance(m.criterion, TOODLoss):
                profile_loss(k, m, data, args.profile, args.top)


if __name__ == "__main__":
    main()
