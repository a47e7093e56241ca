"""TOOD's two training recipes, and the one owner of the loss-scale contract (`LossScale`) and of the ATSS warm-up
(`ATSSWarmup`).

`mmdet` is the reference's COCO 1x recipe for an ImageNet-initialised ResNet (`tood_r50_fpn_1x_coco`), kept exactly: the
default of the paper's models. `ultralytics` is Ultralytics' own defaults for everything (optimizer=auto, lr0, `nbs`
gradient accumulation and weight-decay scaling, warm-up, lrf schedule, mosaic/HSV/scale/translate/flips, close_mosaic):
the default of YOLO-scale models trained from scratch. A model YAML names its recipe (`recipe: mmdet`), the `recipe=`
argument overrides it, and every Ultralytics argument overrides either.

The loss-scale contract (what one optimiser step is worth) lives in `LossScale` and nowhere else:
- `mmdet`: the loss is the reference's per-positive-normalised loss divided by the world size (Ultralytics multiplies
  it back before DDP averages gradients), and the nominal batch `nbs` is the batch actually trained, so there is never
  gradient accumulation or weight-decay rescaling, whatever the batch: given, AutoBatch (`batch=-1` or a fraction) or
  halved by Ultralytics' CUDA out-of-memory retry. One step = the reference's step on that batch.
- `ultralytics`: the loss is multiplied by the batch size, as Ultralytics' own losses are, and Ultralytics accumulates
  gradients up to `nbs` (64): one step is worth ~nbs images whatever the batch, exactly as for YOLOv8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

RECIPES: dict[str, dict] = {
    # mmdet tood_r50_fpn_1x_coco in Ultralytics' terms
    "mmdet": {
        "epochs": 12,
        "batch": 16,
        "optimizer": "SGD",  # without Nesterov momentum, as the reference (TOODTrainer.build_optimizer)
        "lr0": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "warmup_momentum": 0.9,  # mmdet warms up the learning rate only
        "warmup_bias_lr": 0.0,  # biases warm up from ~0 like every other parameter (mmdet: ratio 0.001)
        "cos_lr": False,
        # the reference augments with horizontal flips only
        "fliplr": 0.5,
        "flipud": 0.0,
        "mosaic": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "copy_paste": 0.0,
        "close_mosaic": 0,
        "hsv_h": 0.0,
        "hsv_s": 0.0,
        "hsv_v": 0.0,
        "degrees": 0.0,
        "translate": 0.0,
        "scale": 0.0,
        "shear": 0.0,
        "perspective": 0.0,
    },
    "ultralytics": {},  # Ultralytics' defaults, untouched
}
# Epochs of ATSS warm-up before task alignment learning (`initial_epoch`, mmdet's name), per recipe. mmdet: the
# reference's 4 of 12. ultralytics: kept at 4 after 0 / 4 / 8 were measured on bccd val (README, "Ablation"); for scale,
# YOLOv6 v1/v2 use 4 of 300-400 epochs (0 in v3), PP-YOLOE 100 of 300 and PP-YOLOE+ 30 of 80 (static_assigner_epoch).
INITIAL_EPOCH = {"mmdet": 4, "ultralytics": 4}

# Ultralytics' default gains of YOLOv8's loss (ultralytics/cfg/default.yaml). Under `ultralytics`, TOOD's weights follow
# the user's `cls=` / `box=` relative to these, keeping the reference's 1:2 ratio at the defaults.
V8_CLS_GAIN, V8_BOX_GAIN, V8_DFL_GAIN = 0.5, 7.5, 1.5
TOOD_CLS_WEIGHT, TOOD_BOX_WEIGHT = 1.0, 2.0  # the reference's loss_cls / loss_bbox weights
# DFL term of the T-head's DFL variant (the reference has none): mmdet's GFL weight of DFL beside GIoU x 2
# (gfl_r50_fpn_1x_coco: loss_dfl 0.25, loss_bbox 2.0), so the two box terms keep GFL's balance
TOOD_DFL_WEIGHT = 0.25
# Gradient-norm calibration (benchmarks/calibrate_gains.py, README "Training: two recipes"): at init, on bccd train
# batches with Ultralytics' augmentation, the trunk's gradient norm of Detect + v8 loss is 12.0 +- 2.5 times that of the
# T-head + TOOD loss in the ATSS warm-up (focal loss, alpha 0.25) and 1.51 +- 0.44 times in TAL (2 seeds x 3 batches).
# TOOD's weights are multiplied by these per phase, so that lr0 means for a TOOD model what it means for YOLOv8.
ULTRALYTICS_GAIN = {"atss": 12.0, "tal": 1.5}


def arg(args, key: str):
    """`key` of the trainer's arguments as Ultralytics attaches them to a model (a namespace, a dict, or None)."""
    return args.get(key) if isinstance(args, dict) else getattr(args, key, None)


def recipe_of(model_yaml: dict) -> str:
    """The recipe a model YAML names (`recipe:`), else `mmdet` for ResNet backbones (the paper's) and `ultralytics`."""
    if name := model_yaml.get("recipe"):
        return check_recipe(name)
    return "mmdet" if any(row[2] == "ResNet" for row in model_yaml.get("backbone", ())) else "ultralytics"


def check_recipe(name: str) -> str:
    """`name` if it is a known recipe, else a clear error."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe={name!r}: choose one of {', '.join(RECIPES)}")
    return name


def model_yaml_of(model) -> dict:
    """The model YAML dict of a YAML path, a checkpoint path, a model or a dict ({} when there is none to read)."""
    if isinstance(model, dict):
        return model
    if isinstance(model, (str, Path)):
        if Path(model).suffix in {".yaml", ".yml"}:
            from ultralytics.nn.tasks import yaml_model_load

            return yaml_model_load(model)
        if Path(model).suffix == ".pt" and Path(model).exists():
            from ultralytics.nn.tasks import load_checkpoint

            model = load_checkpoint(model)[0]
    return getattr(model, "yaml", None) or {}


@dataclass(frozen=True)
class LossScale:
    """The loss-scale contract of a recipe (see the module docstring): the one place that decides what a step is worth.

    Attributes:
        recipe (str): "mmdet" or "ultralytics".
    """

    recipe: str

    def nominal_batch(self, batch_size: int, nbs: int) -> int:
        """Ultralytics' `nbs` for a run whose batch is `batch_size`: the batch itself under mmdet (no accumulation)."""
        return batch_size if self.recipe == "mmdet" else nbs

    def scale(self, loss, batch_size: int):
        """The loss to back-propagate from the per-positive-normalised loss of a batch of `batch_size` images."""
        if self.recipe == "mmdet":
            return loss / (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)
        return loss * batch_size

    def weights(
        self,
        warmup: bool,
        cls_gain: float | None = None,
        box_gain: float | None = None,
        dfl_gain: float | None = None,
    ) -> tuple[float, float, float]:
        """TOOD's (cls, bbox, dfl) loss weights in the ATSS warm-up (`warmup`) or in TAL: the reference's under mmdet;
        under ultralytics, the reference's scaled by Ultralytics' `cls=` / `box=` / `dfl=` gains relative to their
        defaults (None: the defaults) and calibrated to v8's gradient scale (`ULTRALYTICS_GAIN`)."""
        if self.recipe == "mmdet":
            return TOOD_CLS_WEIGHT, TOOD_BOX_WEIGHT, TOOD_DFL_WEIGHT
        gain = ULTRALYTICS_GAIN["atss" if warmup else "tal"]
        cls_gain = V8_CLS_GAIN if cls_gain is None else cls_gain
        box_gain = V8_BOX_GAIN if box_gain is None else box_gain
        dfl_gain = V8_DFL_GAIN if dfl_gain is None else dfl_gain
        return (gain * TOOD_CLS_WEIGHT * cls_gain / V8_CLS_GAIN, gain * TOOD_BOX_WEIGHT * box_gain / V8_BOX_GAIN,
                gain * TOOD_DFL_WEIGHT * dfl_gain / V8_DFL_GAIN)


@dataclass(frozen=True)
class ATSSWarmup:
    """The ATSS warm-up before task alignment learning: the one place that decides how long it runs and when.

    Its length is the `initial_epoch=` argument, else the model YAML's `initial_epoch:`, else the recipe's default
    (`INITIAL_EPOCH`), never more than epochs - 1, so that every run ends in TAL. Under `time=`, Ultralytics
    re-estimates the run's epochs after each one, and `TOODTrainer` re-plans the warm-up with that estimate
    (`replanned`). `TOODLoss` asks `active(epoch)` for its targets and losses (ATSS + focal loss, or TAL + quality focal
    loss); `TOODTrainer` logs `describe`.

    Attributes:
        epochs (int): Epochs of warm-up this run trains.
        asked (int): Epochs asked for (equal to `epochs` unless the run is too short for them).
    """

    epochs: int
    asked: int

    @classmethod
    def of(cls, args, model_yaml: dict, recipe: str) -> ATSSWarmup:
        """The warm-up of a run with the trainer's arguments `args` (see `arg`), a model YAML and a recipe."""
        n = arg(args, "initial_epoch")
        n = int(model_yaml.get("initial_epoch", INITIAL_EPOCH[recipe]) if n is None else n)
        if n < 0:
            raise ValueError(f"initial_epoch={n} must be >= 0 (epochs of ATSS warm-up before task alignment learning)")
        epochs = arg(args, "epochs")
        return cls(min(n, epochs - 1) if epochs else n, n)

    def replanned(self, epochs: int, epoch: int) -> ATSSWarmup:
        """The warm-up at the start of 0-based `epoch` of a run now expected to train `epochs` epochs in all.

        The asked length, cut to epochs - 1 as in `of`, and never shorter than the `epoch` epochs that have already
        trained in the warm-up. Once an epoch has trained with TAL, the warm-up stays as it is: a run never goes back
        from TAL to ATSS.
        """
        if epoch > self.epochs:
            return self
        return ATSSWarmup(max(min(self.asked, epochs - 1), epoch), self.asked)

    def active(self, epoch: int) -> bool:
        """Whether 0-based `epoch` trains with the warm-up's targets and losses."""
        return epoch < self.epochs

    def describe(self, run_epochs: int) -> tuple[str, str | None]:
        """What the run does (for the log), and a warning when the warm-up was cut (else None)."""
        cut = None
        if self.epochs < self.asked:
            cut = (
                f"initial_epoch={self.asked} would leave no epoch of task alignment learning in a {run_epochs}-epoch "
                f"run; the ATSS warm-up is cut to {self.epochs} epoch(s) so that the run ends in TAL"
            )
        return f"ATSS warm-up for {self.epochs} epoch(s), then task alignment learning", cut
