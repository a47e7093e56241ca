"""TOOD's training recipes. A run's recipe is one object, `Recipe`, worked out once (`Recipe.of`) and handed to the
trainer and the loss: its name, its trainer arguments, its ATSS warm-up (`ATSSWarmup`), its loss scale (`LossScale`),
its loss weights (`LossWeights`) and how it sets the optimiser's warm-up, schedule and parameter groups.

`mmdet` is the reference's COCO 1x recipe for an ImageNet-initialised ResNet (`tood_r50_fpn_1x_coco`), kept exactly: the
default of the paper's models. `ultralytics` is Ultralytics' own defaults for everything (optimizer=auto, lr0, `nbs`
gradient accumulation and weight-decay scaling, warm-up, lrf schedule, mosaic/HSV/scale/translate/flips, close_mosaic):
the default of YOLO-scale models trained from scratch. A model YAML names its recipe (`recipe: mmdet`), the `recipe=`
argument overrides it, and every Ultralytics argument overrides either. Each recipe is a `RecipeSpec` in `RECIPES`,
whose fields have no defaults: a third recipe states every behaviour, and none falls back to another recipe's.

The loss-scale contract (what one optimiser step is worth) lives in `LossScale` and nowhere else:
- `mmdet`: the loss is the reference's per-positive-normalised loss divided by the world size (Ultralytics multiplies
  it back before DDP averages gradients), and the nominal batch `nbs` is the batch actually trained, so there is never
  gradient accumulation or weight-decay rescaling, whatever the batch: given, AutoBatch (`batch=-1` or a fraction) or
  halved by Ultralytics' CUDA out-of-memory retry. One step = the reference's step on that batch.
- `ultralytics`: the loss is multiplied by the batch size, as Ultralytics' own losses are, and Ultralytics accumulates
  gradients up to `nbs` (64): one step is worth ~nbs images whatever the batch, exactly as for YOLOv8.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from ultralytics.cfg import DEFAULT_CFG_DICT

# Ultralytics' default gains of YOLOv8's loss (ultralytics/cfg/default.yaml). Under `ultralytics`, TOOD's weights follow
# the user's `cls=` / `box=` / `dfl=` relative to these, keeping the reference's 1:2 ratio at the defaults.
V8_GAINS = {"cls": 0.5, "box": 7.5, "dfl": 1.5}
# The reference's loss_cls and loss_bbox weights, and the DFL term of the T-head's DFL variant (the reference has none):
# mmdet's GFL weight of DFL beside GIoU x 2 (gfl_r50_fpn_1x_coco: loss_dfl 0.25, loss_bbox 2.0), so the two box terms
# keep GFL's balance. In the order of `V8_GAINS`.
TOOD_WEIGHTS = (1.0, 2.0, 0.25)
# Gradient-norm calibration (benchmarks/calibrate_gains.py, docs/training.md): at init, on bccd train
# batches with Ultralytics' augmentation, the trunk's gradient norm of Detect + v8 loss is 12.0 +- 2.5 times that of the
# T-head + TOOD loss in the ATSS warm-up (focal loss, alpha 0.25) and 1.51 +- 0.44 times in TAL (2 seeds x 3 batches).
# TOOD's weights are multiplied by these per phase, so that lr0 means for a TOOD model what it means for YOLOv8.
ULTRALYTICS_GAIN = {"atss": 12.0, "tal": 1.5}
LR_STEP = 0.1  # the reference's MultiStepLR gamma


def arg(args, key: str):
    """`key` of a run's arguments: a namespace (the trainer's), a dict (as Ultralytics attaches them to a model after
    a checkpoint load) or None."""
    return args.get(key) if isinstance(args, dict) else getattr(args, key, None)


@dataclass(frozen=True)
class LossScale:
    """The loss-scale contract of a recipe (see the module docstring): the one place that decides what a step is worth.

    Attributes:
        per_image (bool): Ultralytics' convention: the loss is summed over the batch's images (x batch size) and
            Ultralytics accumulates gradients up to `nbs`. False: the reference's, one step per batch (the loss
            divided by the world size, `nbs` = the batch).
    """

    per_image: bool

    def nominal_batch(self, batch_size: int, nbs: int) -> int:
        """Ultralytics' `nbs` for a run whose batch is `batch_size`: the batch itself (no accumulation) unless
        `per_image`."""
        return nbs if self.per_image else batch_size

    def scale(self, loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The loss to back-propagate from the per-positive-normalised loss of a batch of `batch_size` images."""
        if self.per_image:
            return loss * batch_size
        return loss / (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


@dataclass(frozen=True)
class LossWeights:
    """TOOD's (cls, bbox, dfl) loss weights in the ATSS warm-up and in task alignment learning.

    Attributes:
        atss (tuple[float, float, float]): Weights in the warm-up epochs.
        tal (tuple[float, float, float]): Weights once task alignment learning runs.
    """

    atss: tuple[float, float, float]
    tal: tuple[float, float, float]

    @classmethod
    def of(cls, calibration: Mapping[str, float] | None, args) -> LossWeights:
        """The reference's weights (`TOOD_WEIGHTS`) when `calibration` is None; else the reference's scaled by the
        run's `cls=` / `box=` / `dfl=` gains relative to Ultralytics' defaults (None: the defaults) and by the
        calibration of each phase ("atss", "tal")."""
        if calibration is None:
            return cls(TOOD_WEIGHTS, TOOD_WEIGHTS)
        gains = [(default if arg(args, k) is None else arg(args, k), default) for k, default in V8_GAINS.items()]
        return cls(*(tuple(calibration[phase] * w * g / default for w, (g, default) in zip(TOOD_WEIGHTS, gains))
                     for phase in ("atss", "tal")))

    def phase(self, warmup: bool) -> tuple[float, float, float]:
        """The (cls, bbox, dfl) weights in the warm-up (`warmup`) or in TAL."""
        return self.atss if warmup else self.tal


@dataclass(frozen=True)
class ATSSWarmup:
    """The ATSS warm-up before task alignment learning: the one place that decides how long it runs and when.

    Its length is the `initial_epoch=` argument, else the model YAML's `initial_epoch:`, else the recipe's default
    (`RecipeSpec.initial_epoch`), never more than epochs - 1, so that every run ends in TAL. Under `time=`, Ultralytics
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
    def of(cls, args, model_yaml: dict, default: int) -> ATSSWarmup:
        """The warm-up of a run with arguments `args` (see `arg`), a model YAML and the recipe's `default` length."""
        n = arg(args, "initial_epoch")
        n = int(model_yaml.get("initial_epoch", default) if n is None else n)
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


@dataclass(frozen=True)
class RecipeSpec:
    """What a recipe is. No field has a default: a new recipe states each behaviour.

    Attributes:
        overrides (Mapping[str, Any]): Trainer arguments the recipe sets (every argument given overrides them).
        initial_epoch (int): Epochs of ATSS warm-up unless the `initial_epoch=` argument or the YAML says otherwise.
        loss_scale (LossScale): What one optimiser step is worth.
        calibration (Mapping[str, float] | None): Per-phase factors of the loss weights, which then follow
            Ultralytics' `cls=` / `box=` / `dfl=` gains (`LossWeights.of`); None: the reference's weights, and those
            gains (YOLOv8's) are not read, with a warning when one is given.
        lr_warmup_iterations (int | None): Linear learning-rate warm-up over this many iterations while
            `warmup_epochs` keeps Ultralytics' default; None: Ultralytics' `warmup_epochs`.
        lr_warmup_start (float | None): The warm-up's first factor of every group's learning rate, rising linearly to
            1 (mmengine's `LinearLR(start_factor)`); None: Ultralytics' warm-up from 0 (biases from `warmup_bias_lr`).
        lr_milestones (tuple[float, ...] | None): Fractions of the epochs at which the learning rate steps by
            `LR_STEP`, while `cos_lr` is off and `lrf` keeps its default; None: Ultralytics' schedules.
        reference_sgd (bool): Under `optimizer=SGD`, the reference's `SGD(lr, momentum, weight_decay)`: one parameter
            group, weight decay on every parameter, no Nesterov momentum (no paramwise cfg); False: Ultralytics'
            optimiser as built (three groups, no decay on norms and biases).
        clip_gradients (bool): Ultralytics' gradient-norm clipping at 10 before each step; False: none, as the
            reference's `optim_wrapper` (no `clip_grad`).
        keep_ratio (bool): The reference's input pipeline (`tood_yolo.data.reference`: keep-ratio resize to fit the
            scale `imgsz` stands for, flips, batches padded to multiples of 32 and grouped by aspect ratio) in training
            and in its validation; False: Ultralytics' (square letterbox, mosaic, rectangular validation batches).
    """

    overrides: Mapping[str, Any]
    initial_epoch: int
    loss_scale: LossScale
    calibration: Mapping[str, float] | None
    lr_warmup_iterations: int | None
    lr_milestones: tuple[float, ...] | None
    lr_warmup_start: float | None
    reference_sgd: bool
    clip_gradients: bool
    keep_ratio: bool


RECIPES: dict[str, RecipeSpec] = {
    # mmdet tood_r50_fpn_1x_coco in Ultralytics' terms
    "mmdet": RecipeSpec(
        overrides={
            "epochs": 12,
            "batch": 16,
            "imgsz": 1333,  # the long side of the reference's (1333, 800) keep-ratio scale (`keep_ratio`)
            "optimizer": "SGD",  # without Nesterov momentum, as the reference (`reference_sgd`)
            "lr0": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "warmup_momentum": 0.9,  # mmdet warms up the learning rate only
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
        initial_epoch=4,  # the reference's 4 of 12
        loss_scale=LossScale(per_image=False),
        calibration=None,
        lr_warmup_iterations=500,  # mmdet LinearLR over the first 500 iterations
        lr_milestones=(8 / 12, 11 / 12),  # epochs 8 and 11 of 12 (16 and 22 of 24 for the 2x schedule)
        lr_warmup_start=0.001,  # LinearLR(start_factor=0.001): the first step trains at lr 1e-5
        reference_sgd=True,
        clip_gradients=False,  # the 1x config has no clip_grad: the gradient norm is ~10 at step 1 already
        keep_ratio=True,
    ),
    "ultralytics": RecipeSpec(
        overrides={},  # Ultralytics' defaults, untouched
        # kept at 4 after 0 / 4 / 8 were measured on bccd val (docs/results.md); for scale, YOLOv6 v1/v2 use 4 of
        # 300-400 epochs (0 in v3), PP-YOLOE 100 of 300 and PP-YOLOE+ 30 of 80 (static_assigner_epoch)
        initial_epoch=4,
        loss_scale=LossScale(per_image=True),
        calibration=ULTRALYTICS_GAIN,
        lr_warmup_iterations=None,
        lr_milestones=None,
        lr_warmup_start=None,
        reference_sgd=False,
        clip_gradients=True,
        keep_ratio=False,
    ),
}


def check_recipe(name: str) -> str:
    """`name` if it is a known recipe, else a clear error."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe={name!r}: choose one of {', '.join(RECIPES)}")
    return name


def recipe_of(model_yaml: dict) -> str:
    """The recipe a model YAML names (`recipe:`), else `mmdet` for ResNet backbones (the paper's) and `ultralytics`."""
    if name := model_yaml.get("recipe"):
        return check_recipe(name)
    return "mmdet" if any(row[2] == "ResNet" for row in model_yaml.get("backbone", ())) else "ultralytics"


@dataclass(frozen=True)
class Recipe:
    """A run's recipe, worked out once (`of`) from the `recipe=` argument, the model YAML and the recipe's defaults.

    `TOODTrainer` works it out and hands it to its losses (`TOODDetectionModel.init_criterion`); a loss built without a
    trainer works it out from its model's `args` and YAML.

    Attributes:
        name (str): The recipe's name, a key of `RECIPES`.
        spec (RecipeSpec): What the recipe is.
        warmup (ATSSWarmup): The run's ATSS warm-up.
        weights (LossWeights): The run's loss weights.
    """

    name: str
    spec: RecipeSpec
    warmup: ATSSWarmup
    weights: LossWeights

    @classmethod
    def of(cls, args, model_yaml: dict) -> Recipe:
        """The recipe of a run with arguments `args` (see `arg`) and a model YAML (only read for what `args` leave
        open: see `recipe_arguments`)."""
        name = check_recipe(arg(args, "recipe") or recipe_of(model_yaml))
        spec = RECIPES[name]
        warmup = ATSSWarmup.of(args, model_yaml, spec.initial_epoch)
        return cls(name, spec, warmup, LossWeights.of(spec.calibration, args))

    @property
    def loss_scale(self) -> LossScale:
        """What one optimiser step is worth (`LossScale`)."""
        return self.spec.loss_scale

    def replanned(self, epochs: int, epoch: int) -> Recipe:
        """This recipe with its warm-up re-planned for a run now expected to train `epochs` (`ATSSWarmup.replanned`)."""
        return replace(self, warmup=self.warmup.replanned(epochs, epoch))

    def gain_warnings(self, args) -> list[str]:
        """A warning for each of YOLOv8's loss gains (`cls=`, `box=`, `dfl=`) set away from its default in `args` when
        the recipe does not read them. Decided from values, not from which keys were passed: a DDP worker or a resume
        gets every argument back."""
        if self.spec.calibration is not None:
            return []
        return [f"'{k}={arg(args, k)}' is a gain of YOLOv8's loss: the {self.name} recipe keeps the reference's loss "
                "weights (recipe=ultralytics maps cls= and box= to TOOD's)"
                for k in ("box", "cls", "dfl") if arg(args, k) != DEFAULT_CFG_DICT[k]]

    def warmup_iterations(self, args, epochs: int, num_batches: int) -> int | None:
        """The recipe's learning-rate warm-up in iterations, never past the last epoch; None: Ultralytics' own (the
        recipe has none, or `warmup_epochs` was changed from its default)."""
        n = self.spec.lr_warmup_iterations
        if n is None or arg(args, "warmup_epochs") != DEFAULT_CFG_DICT["warmup_epochs"]:
            return None
        return min(n, max(epochs - 1, 0) * num_batches)

    def lr_lambda(self, args, epochs: int) -> Callable[[int], float] | None:
        """The recipe's step schedule as a LambdaLR factor of the epoch; None: Ultralytics' schedules (the recipe has
        none, `cos_lr=True`, or `lrf` was changed from its default)."""
        milestones = self.spec.lr_milestones
        if milestones is None or arg(args, "cos_lr") or arg(args, "lrf") != DEFAULT_CFG_DICT["lrf"]:
            return None
        steps = [round(epochs * m) for m in milestones]
        return lambda epoch: LR_STEP ** sum(epoch >= s for s in steps)

    def warmup_lr(self, target: float, iteration: int, iterations: int) -> float | None:
        """The learning rate of a group whose scheduled rate is `target` at 0-based `iteration` of a warm-up of
        `iterations` (mmengine's LinearLR: factor start + (1 - start) * iteration / iterations); None: Ultralytics'
        warm-up (the recipe has no start factor)."""
        start = self.spec.lr_warmup_start
        if start is None:
            return None
        return target * (start + (1 - start) * min(iteration / iterations, 1.0))

    def param_groups(self, model: torch.nn.Module, name: str, decay: float) -> list[dict] | None:
        """The optimiser's parameter groups as the recipe trains them: the reference's one group of every parameter,
        with weight decay `decay`, under `optimizer=SGD` (`RecipeSpec.reference_sgd`); None: Ultralytics' groups."""
        if not self.spec.reference_sgd or name != "SGD":
            return None
        return [{"params": list(model.parameters()), "weight_decay": decay, "param_group": "weight"}]


def recipe_arguments(args, model_yaml: dict) -> dict[str, Any]:
    """The run's `recipe=` and `initial_epoch=` (the asked warm-up, before any cut) as `Recipe.of` works them out. With
    both in its arguments a run, its DDP workers and its resume need the model YAML no more."""
    recipe = Recipe.of(args, model_yaml)
    return {"recipe": recipe.name, "initial_epoch": recipe.warmup.asked}
