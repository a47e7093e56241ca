"""The paper's 2x2 ablation in the YOLO regime: {Ultralytics Detect, T-head} x {v8 loss, TOOD loss}, several seeds.

Usage:
    python benchmarks/ablation.py [preset=cpu|quick|gpu] [epochs=] [imgsz=] [batch=] [seeds=0,1,2]
                                  [datasets=bccd,synthetic,large,coco128] [models=detect-v8,...] [split=] [device=]
                                  [curve=1] [report]

Every model shares tood-n's backbone (C2f, width 0.25, depth 0.33) and FPN (P3-P7, 64 channels); only the head and the
loss change. All cells train under the `ultralytics` recipe (Ultralytics' defaults: optimizer=auto, lr0, nbs=64
accumulation, warm-up, lrf, mosaic/HSV/scale/translate/fliplr, close_mosaic) with the same epochs, imgsz, batch and
seeds, from scratch, `val=False` (no checkpoint is picked on evaluation data: best.pt is the final EMA weights):

- `detect-v8`:   cfg/ablation-detect-n.yaml, Ultralytics' YOLOv8 `Detect` + v8 loss (`v8DetectionLoss` itself),
                 TOODTrainer (its FPN needs TOOD's model class) under the `ultralytics` recipe;
- `detect-tood`: the same with `loss: tood` (TOOD's ATSS warm-up, then TAL + QFL + GIoU), TOODTrainer;
- `thead-v8`:    cfg/tood-n.yaml with `loss: v8` (the T-head's boxes and scores through v8's loss, `THeadV8Loss`);
- `thead-tood`:  cfg/tood-n.yaml, the T-head + TOOD's loss (TOOD itself).
Optional rows: `thead-tood-w0` / `thead-tood-w8` (0 / 8 ATSS warm-up epochs instead of 4, for the warm-up choice:
evaluate with split=val), `thead-tood-g8` (GroupNorm with 8 groups of 8 channels, the paper's group size, instead of
32 groups of 2 at tood-n's 64 channels; `yolo11n-tood-g8` the same for the twin), `yolo11n-tood-c2` (2 inter
convs instead of 6: the latency goal's head), and the Ultralytics twins `yolov8n`, `yolov8n-tood`, `yolo11n`,
`yolo11n-tood` where those configs exist (cfg/ or Ultralytics).

Presets: `cpu` (default) bccd train -> test, 3 seeds, 20 epochs, imgsz 256, batch 16: about 75 min on an idle 2-core
CPU; `quick` 1 epoch, seed 0, imgsz 128 (a smoke run, written to runs/ablation-quick); `gpu` bccd and coco128 (train2017
-> val2017), 3 seeds, 100 epochs, imgsz 640, batch 16, device 0. Evaluation: one Ultralytics val pass per run on the
evaluation split (`tood_yolo.tools.analysis.alignment_study`: conf 0.001, iou 0.7, max_det 300, rect batches, no NMS
time limit) gives mAP50-95, mAP50 and TOOD's alignment study (rank correlation of score and IoU over each GT's top-50
pre-NMS predictions, mean IoU of the top-10, and correct / redundant / error detections after NMS).

`datasets=large` is the synthetic generator's large-object layout (1-3 objects of 35-100 % of the image, one class;
train 256 / val 64 / test 64 at imgsz 256, `tood_yolo.data.synthetic`), the regime where the T-head was found weak (issue 28).
`curve=1` validates on the val split after every epoch (Ultralytics' validation in training) and records each epoch's mAP50-95 (the row's `curve`,
and its steadiness in the table: the mean drop between consecutive epochs, and the spread of the last 5).

`split=val` evaluates on the validation split instead (for choices such as the warm-up, written to runs/ablation-val).
Each run's result is saved as it finishes (runs/ablation/runs/<dataset>-<model>-s<seed>.json) and reused by a rerun with
the same settings, so an interrupted benchmark resumes; `report` writes the table of the runs already saved and trains
nothing (runs in several processes side by side, then one table). Runs go seed by seed, so partial results stay
balanced.
Outputs: runs/ablation/ablation.md (mean +- std per model) and ablation.json (every run).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

import torch  # noqa: E402
import ultralytics  # noqa: E402
from ultralytics import YOLO  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

import tood_yolo  # noqa: E402, F401  (registers TOOD with Ultralytics)
from tood_yolo.tools.analysis import alignment_study  # noqa: E402
from tood_yolo.data.synthetic import make_synthetic_dataset  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATA_DIR = ROOT / "datasets" / "ablation"
ULTRALYTICS_CFG = Path(ultralytics.__file__).parent / "cfg" / "models"
# name: (model YAML, YAML lines appended to it or an (old, new) edit of it, head + loss, the trainer it must get[,
# training arguments of this row])
MODELS = {
    "detect-v8": (ROOT / "cfg/ablation-detect-n.yaml", "", "Detect + v8 loss", "TOODTrainer"),
    "detect-tood": (ROOT / "cfg/ablation-detect-n.yaml", "loss: tood", "Detect + TOOD loss", "TOODTrainer"),
    "thead-v8": (ROOT / "cfg/tood-n.yaml", "loss: v8", "T-head + v8 loss", "TOODTrainer"),
    "thead-tood": (ROOT / "cfg/tood-n.yaml", "", "T-head + TOOD loss", "TOODTrainer"),
    "thead-tood-w0": (ROOT / "cfg/tood-n.yaml", "initial_epoch: 0", "T-head + TOOD loss, no warm-up", "TOODTrainer"),
    "thead-tood-w8": (
        ROOT / "cfg/tood-n.yaml",
        "initial_epoch: 8",
        "T-head + TOOD loss, 8 warm-up epochs",
        "TOODTrainer",
    ),
    "thead-tood-g8": (ROOT / "cfg/tood-n.yaml", ("anchor_free, 0.0]]", "anchor_free, 0.0, 8]]"),
                      "T-head (GroupNorm 8 groups) + TOOD loss", "TOODTrainer"),
    "yolov8n": (ULTRALYTICS_CFG / "v8/yolov8.yaml", "scale: n", "YOLOv8n (Detect + v8 loss)", "DetectionTrainer"),
    "yolov8n-tood": (ROOT / "cfg/yolov8n-tood.yaml", "", "YOLOv8n neck + T-head + TOOD loss", "TOODTrainer"),
    "yolo11n": (ULTRALYTICS_CFG / "11/yolo11.yaml", "scale: n", "YOLO11n (Detect + v8 loss)", "DetectionTrainer"),
    "yolo11n-tood": (ROOT / "cfg/yolo11n-tood.yaml", "", "YOLO11n neck + T-head + TOOD loss", "TOODTrainer"),
    "yolo11n-tood-g8": (ROOT / "cfg/yolo11n-tood.yaml", ("anchor_free, 0.0, 32]]", "anchor_free, 0.0, 8]]"),
                        "YOLO11n neck + T-head (GroupNorm 8 groups) + TOOD loss", "TOODTrainer"),
    # 2 inter convs instead of the paper's 6: the head that met the 1.15x latency goal (docs/results.md)
    "yolo11n-tood-c2": (ROOT / "cfg/yolo11n-tood.yaml", ("[nc, 64, 6, 0, anchor_free", "[nc, 64, 2, 0, anchor_free"),
                        "YOLO11n neck + T-head (2 inter convs) + TOOD loss", "TOODTrainer"),
}
# The T-head family on YOLO11n's neck (TOODHead's norm, trunk, inter convs and reg): yolo11n-tood-{sepbn,bn}-c{2,6}
# [-dfl] and yolo11n-tood-c2-dfl. sepbn: BatchNorm per level on the paper's shared trunk; bn: a trunk per level.
TWIN_ROW = "[nc, 64, 6, 0, anchor_free, 0.0, 32]"
for _key, _norm, _trunk in (("", "gn", "shared"), ("-sepbn", "bn", "shared"), ("-bn", "bn", "level")):
    for _convs in (2, 6):
        for _reg in ("ltrb", "dfl"):
            _name = f"yolo11n-tood{_key}-c{_convs}" + ("-dfl" if _reg == "dfl" else "")
            if _name == "yolo11n-tood-c6":  # the paper's head: yolo11n-tood
                continue
            _row = f"[nc, 64, {_convs}, 0, anchor_free, 0.0, 32, {_norm}, {_trunk}, {_reg}]"
            MODELS.setdefault(_name, (ROOT / "cfg/yolo11n-tood.yaml", (TWIN_ROW, _row),
                                      f"YOLO11n neck + T-head ({_norm}, {_trunk} trunk, {_convs} inter convs, {_reg}) "
                                      "+ TOOD loss", "TOODTrainer"))
# Training choices for the per-level BatchNorm head, made on val: no ATSS warm-up, or twice the box loss gain
_BN = MODELS["yolo11n-tood-bn-c2"]
MODELS["yolo11n-tood-bn-c2-w0"] = (_BN[0], _BN[1], _BN[2] + ", no ATSS warm-up", _BN[3], {"initial_epoch": 0})
MODELS["yolo11n-tood-bn-c2-box2"] = (_BN[0], _BN[1], _BN[2] + ", box=15 (2x)", _BN[3], {"box": 15.0})
# The DFL predictor's forms (TOODHead): a full 3x3 conv up to commit bd2e0ab (-dfl runs), then a 1x1 conv (c2bef45,
# -dfl1 runs), now a depthwise 3x3 + 1x1 (-dfldw runs); one YAML, the code decides
MODELS["yolo11n-tood-bn-c2-dfl1"] = (*MODELS["yolo11n-tood-bn-c2-dfl"][:2],
                                    MODELS["yolo11n-tood-bn-c2-dfl"][2] + ", 1x1 DFL predictor", "TOODTrainer")
MODELS["yolo11n-tood-bn-c2-dfldw"] = (*MODELS["yolo11n-tood-bn-c2-dfl"][:2],
                                     MODELS["yolo11n-tood-bn-c2-dfl"][2] + ", depthwise 3x3 + 1x1 DFL predictor",
                                     "TOODTrainer")
# The class predictor: YOLO11's depthwise 3x3 + 1x1 (cls_pred "dw") instead of the paper's 3x3 conv (the -dfl row)
MODELS["yolo11n-tood-bn-c2-dfl-dw"] = (ROOT / "cfg/yolo11n-tood.yaml",
                                      (TWIN_ROW, "[nc, 64, 2, 0, anchor_free, 0.0, 32, bn, level, dfl, dw]"),
                                      MODELS["yolo11n-tood-bn-c2-dfl"][2] + ", depthwise class predictor",
                                      "TOODTrainer")
# The product's config as shipped (cfg/yolo11n-tood-bn.yaml), and training choices on it for the large-object study
MODELS["yolo11n-tood-bn"] = (ROOT / "cfg/yolo11n-tood-bn.yaml", "", "YOLO11n neck + T-head as shipped (bn, level trunk, "
                             "2 inter convs, dfl, dw class predictor) + TOOD loss", "TOODTrainer")
_SHIPPED, _ROW = MODELS["yolo11n-tood-bn"], "anchor_free, 0.0, 32, bn, level, dfl, dw]"
for _name, _extra, _what, *_args in (
    ("-v8", "loss: v8", "under Ultralytics' v8 loss"),
    ("-w0", "", "no ATSS warm-up", {"initial_epoch": 0}),
    ("-w1", "", "1 ATSS warm-up epoch", {"initial_epoch": 1}),
    ("-tal10", "tal: {topk: 10, alpha: 0.5}", "TAL topk 10, alpha 0.5 (Ultralytics' values)"),
    ("-w0-tal10", "tal: {topk: 10, alpha: 0.5}", "no ATSS warm-up, TAL topk 10, alpha 0.5", {"initial_epoch": 0}),
    ("-o5", (_ROW, _ROW.replace("0.0", "0.5")), "anchor points at cell centres (offset 0.5, as Detect)"),
    ("-c3", (_ROW, _ROW.replace("dw]", "conv]")), "the paper's 3x3 class predictor"),
):
    MODELS["yolo11n-tood-bn" + _name] = (_SHIPPED[0], _extra, f"{_SHIPPED[2]}, {_what}", "TOODTrainer", *_args)
TWO_BY_TWO = ("detect-v8", "detect-tood", "thead-v8", "thead-tood")
DATASETS = {"bccd": ("train", "test"), "synthetic": ("train", "val"), "large": ("train", "test"),
            "coco128": ("train2017", "val2017")}
PRESETS = {
    "cpu": {"epochs": 20, "imgsz": 256, "batch": 16, "seeds": "0,1,2", "datasets": "bccd", "device": "cpu"},
    "quick": {"epochs": 1, "imgsz": 128, "batch": 8, "seeds": "0", "datasets": "bccd", "device": "cpu"},
    "gpu": {"epochs": 100, "imgsz": 640, "batch": 16, "seeds": "0,1,2", "datasets": "bccd,coco128", "device": "0"},
}
USAGE = (
    "python benchmarks/ablation.py [preset=cpu|quick|gpu] [epochs=N] [imgsz=N] [batch=N] [seeds=0,1,2] "
    "[datasets=bccd,synthetic,large,coco128] [models=detect-v8,detect-tood,thead-v8,thead-tood] [split=test] "
    "[device=cpu] [curve=1]"
)
# Only what makes runs comparable and reproducible; the rest is the `ultralytics` recipe (Ultralytics' defaults)
FIXED = {"recipe": "ultralytics", "deterministic": True, "val": False, "plots": False, "amp": False, "exist_ok": True}
VAL = {"conf": 0.001, "iou": 0.7, "max_det": 300}  # `yolo val`'s defaults


def parse_args(argv: list[str]) -> dict:
    """`key=value` arguments over the preset's values (a bare `quick` or `gpu` picks that preset)."""
    given = {}
    for a in argv:
        k, sep, v = a.removeprefix("--").partition("=")
        if not sep and k in PRESETS:
            k, v = "preset", k
        if not sep and k == "report":
            k, v = "report", True
        if k not in {"preset", "models", "split", "report", "curve", *PRESETS["cpu"]}:
            raise SystemExit(f"unknown argument {a!r}; usage: {USAGE}")
        given[k] = v
    preset = given.pop("preset", "cpu")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    args = {"preset": preset, "models": ",".join(TWO_BY_TWO), "split": None, "report": False, "curve": False,
            **PRESETS[preset], **given}
    args["curve"] = str(args["curve"]).lower() in {"1", "true", "yes"}
    for k in ("epochs", "imgsz", "batch"):
        if not str(args[k]).isdigit():
            raise SystemExit(f"{k} needs a positive integer, e.g. {k}={PRESETS['cpu'][k]}; usage: {USAGE}")
        args[k] = int(args[k])
    args["seeds"] = [int(s) for s in str(args["seeds"]).split(",")]
    for k, known in (("datasets", DATASETS), ("models", MODELS)):
        args[k] = [x.strip() for x in str(args[k]).split(",") if x.strip()]
        if unknown := sorted(set(args[k]) - set(known)):
            raise SystemExit(f"unknown {k} {unknown}; choose from {', '.join(known)}")
    if missing := [m for m in args["models"] if not MODELS[m][0].exists()]:
        raise SystemExit(f"no config for {missing}: {[str(MODELS[m][0]) for m in missing]}")
    return args


def prepare_data(name: str) -> Path:
    """The data.yaml of a writable copy of the dataset (Ultralytics writes *.cache files beside the labels)."""
    if name == "synthetic":  # the same set as `python train.py` makes (reused if it is already there)
        return make_synthetic_dataset(ROOT / "datasets" / "synthetic", n_train=256, n_val=64, imgsz=256)
    if name == "large":  # a test split beside val: choices on val, the report on test
        return make_synthetic_dataset(ROOT / "datasets" / "synthetic-large", n_train=256, n_val=64, n_test=64, imgsz=256,
                                      layout="large")
    dst = DATA_DIR / name
    if not (dst / "data.yaml").exists():
        src = SHARED / name
        if not (src / "data.yaml").is_file():
            raise SystemExit(f"dataset {name}: no {src / 'data.yaml'} (the benchmark reads ../shared/data)")
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.cache"))  # data.yaml paths are relative to it
        tmp.rename(dst)
    return dst / "data.yaml"


def model_yaml(name: str, project: Path) -> Path:
    """The model's YAML, with the row's extra lines (`loss: tood`, ...) appended or its (old, new) edit made, in a copy
    under `project`."""
    cfg, extra = MODELS[name][:2]
    if not extra:
        return cfg
    text = cfg.read_text()
    if isinstance(extra, tuple):
        if extra[0] not in text:
            raise RuntimeError(f"{name}: {extra[0]!r} not in {cfg}")
        text = text.replace(extra[0], extra[1], 1)
    else:
        text += f"\n{extra}\n"
    path = project / "cfg" / f"{name}.yaml"  # the file name gives the run's model its name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def count_params(model: torch.nn.Module) -> int:
    """All weights, BatchNorm running statistics excluded."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in model.state_dict().items() if not k.endswith(stats))


def run_one(dataset: str, data: Path, name: str, seed: int, args: dict, project: Path) -> dict:
    """Train one model with one seed, then evaluate its final weights (mAP and alignment) on the evaluation split."""
    trainer = MODELS[name][3]
    run = f"{dataset}-{name}-s{seed}"
    model = YOLO(str(model_yaml(name, project)))
    split = args["split"] or DATASETS[dataset][1]
    curve = []  # mAP50-95 on the data's val split after each epoch (curve=1), as Ultralytics validates in training
    if args["curve"]:
        def record(tr) -> None:  # not the final validation of best.pt, which Ultralytics reports the same way
            if len(curve) < tr.epochs:
                curve.append(round(tr.metrics["metrics/mAP50-95(B)"], 4))

        model.add_callback("on_fit_epoch_end", record)
    t0 = time.perf_counter()
    model.train(data=str(data), epochs=args["epochs"], imgsz=args["imgsz"], batch=args["batch"], seed=seed,
                device=args["device"], workers=0 if args["device"] == "cpu" else 8, project=str(project), name=run,
                **{**FIXED, **({"val": True} if args["curve"] else {})},
                **(MODELS[name][4] if len(MODELS[name]) > 4 else {}))
    train_s = time.perf_counter() - t0
    tr = model.trainer
    if type(tr).__name__ != trainer:
        raise RuntimeError(f"{run} trained with {type(tr).__name__}, expected {trainer}")
    recipe = {"optimizer": tr.args.optimizer, "lr0": tr.args.lr0, "nbs": tr.args.nbs,
              "accumulate": tr.accumulate, "mosaic": tr.args.mosaic, "close_mosaic": tr.args.close_mosaic}
    criterion = tr.model.criterion
    t0 = time.perf_counter()
    trained = YOLO(str(tr.last))
    result = evaluate(trained, data, split, args)
    warmup = criterion.recipe.warmup if hasattr(criterion, "recipe") else None  # TOOD's loss only
    return {
        "dataset": dataset, "model": name, "head_loss": MODELS[name][2], "seed": seed, "trainer": trainer,
        "loss": type(criterion).__name__, "initial_epoch": warmup.epochs if warmup else None,
        "params": count_params(trained.model), "head_params": count_params(trained.model.model[-1]),
        "eval_split": split, **result, **steadiness(curve), "curve": curve, "recipe": recipe,
        "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
    }


def evaluate(model: YOLO, data: Path, split: str, args: dict) -> dict:
    """One Ultralytics val pass of `model` on `split` that gives both its mAPs and TOOD's alignment study."""
    metrics = {}
    model.add_callback("on_val_end", lambda validator: metrics.update(validator.metrics.results_dict))
    # the study's validator runs NMS without its time limit, whatever the model (TOODDetectionValidator.postprocess)
    align = alignment_study(model, data, split=split, imgsz=args["imgsz"], batch=args["batch"], device=args["device"],
                            **VAL)
    return {
        "map50_95": metrics["metrics/mAP50-95(B)"], "map50": metrics["metrics/mAP50(B)"],
        "rank_corr": align["rank_corr"], "top10_iou": align["top_iou"], "correct_pct": align["correct_pct"],
        "redundant_pct": align["redundant_pct"], "error_pct": align["error_pct"],
    }


def steadiness(curve: list[float]) -> dict:
    """How steadily mAP50-95 climbs over the epochs: the mean drop between consecutive epochs (0 for a curve that
    never falls) and the sample spread of the last 5 epochs."""
    if len(curve) < 5:
        return {"mean_drop": None, "last5_std": None}
    drops = [max(a - b, 0.0) for a, b in zip(curve, curve[1:])]
    return {"mean_drop": statistics.mean(drops), "last5_std": statistics.stdev(curve[-5:])}


STATS = (
    ("map50_95", "mAP50-95", ".3f"),
    ("map50", "mAP50", ".3f"),
    ("rank_corr", "rank corr", ".3f"),
    ("top10_iou", "top-10 IoU", ".3f"),
    ("correct_pct", "correct %", ".1f"),
    ("redundant_pct", "redundant %", ".1f"),
    ("error_pct", "error %", ".1f"),
    ("mean_drop", "curve mean drop", ".3f"),
    ("last5_std", "last-5 std", ".3f"),
)


def mean_std(values: list, spec: str) -> str:
    """'mean +- std' (sample std over seeds) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{spec}} ± {std:{spec}}"


def markdown_table(rows: list[dict]) -> str:
    """Mean +- std over seeds per (dataset, model), in the order the models were asked for."""
    head = "| dataset (eval split) | model | head + loss | seeds | params (head) | " + " | ".join(
        s[1] for s in STATS) + " | train min |\n|" + "---|" * (len(STATS) + 6) + "\n"
    lines = []
    for key in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        g = [r for r in rows if (r["dataset"], r["model"]) == key]
        r = g[0]
        lines.append(
            f"| {r['dataset']} ({r['eval_split']}) | {r['model']} | {r['head_loss']} | {len(g)} | "
            f"{r['params'] / 1e6:.2f}M ({r['head_params'] / 1e6:.2f}M) | "
            + " | ".join(mean_std([x.get(key) for x in g], spec) for key, _, spec in STATS)
            + f" | {statistics.mean(x['train_s'] for x in g) / 60:.1f} |\n"
        )
    return head + "".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} CPU cores{gpu}, torch {torch.__version__}, ultralytics {ultralytics.__version__}, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv)
    project = ROOT / "runs" / ("ablation-quick" if args["preset"] == "quick" else "ablation")
    if args["split"]:  # choices made on another split (e.g. the warm-up on val) never overwrite the test runs
        project = project.with_name(f"{project.name}-{args['split']}")
    if args["epochs"] != PRESETS[args["preset"]]["epochs"]:  # a longer budget keeps its own runs
        project = project.with_name(f"{project.name}-e{args['epochs']}")
    saved = project / "runs"
    saved.mkdir(parents=True, exist_ok=True)
    settings = {k: args[k] for k in ("epochs", "imgsz", "batch", "split", "device")}
    if args["curve"]:  # runs without a curve stay valid for the settings they ran with
        settings["curve"] = True
    rows, t_start = [], time.perf_counter()
    for dataset in args["datasets"]:
        data = prepare_data(dataset)
        for seed in args["seeds"]:
            for name in args["models"]:
                file = saved / f"{dataset}-{name}-s{seed}.json"
                old = json.loads(file.read_text()) if file.exists() else None
                if old and old["settings"] == settings:
                    rows.append(old["row"])  # the same run, finished before
                    continue
                if args["report"]:
                    print(f"report: {file.name} has not run with these settings; left out")
                    continue
                rows.append(run_one(dataset, data, name, seed, args, project))
                file.write_text(json.dumps({"settings": settings, "row": rows[-1]}, indent=2))
    total_s = time.perf_counter() - t_start
    command = "python benchmarks/ablation.py " + " ".join(argv)
    rows.sort(key=lambda r: (args["datasets"].index(r["dataset"]), args["models"].index(r["model"]), r["seed"]))
    md = (f"# Ablation: {{Detect, T-head}} x {{v8 loss, TOOD loss}}, recipe `ultralytics`\n\n`{command.strip()}`: "
          f"{args['epochs']} epochs, imgsz {args['imgsz']}, batch {args['batch']}, seeds {args['seeds']}, "
          f"{args['device']}; {machine()}; {total_s / 60:.1f} min in this call.\n\n{markdown_table(rows)}\n"
          "Mean ± sample std over seeds. rank corr: mean Spearman correlation of score and IoU over each GT's top-50 "
          "pre-NMS predictions; top-10 IoU: mean IoU of each GT's 10 best-scored pre-NMS predictions; correct / "
          "redundant / error: % of all detections after NMS (conf 0.001, background included) that take a not yet "
          "matched GT at IoU >= 0.5 / overlap an already matched GT at IoU >= 0.5 / reach at best IoU 0.1-0.5.\n")
    (project / "ablation.md").write_text(md)
    (project / "ablation.json").write_text(json.dumps({"args": args, "command": command, "machine": machine(),
                                                       "total_s": round(total_s, 1), "rows": rows}, indent=2))
    print(f"\n{md}\nResults saved to {project / 'ablation.md'} and {project / 'ablation.json'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
