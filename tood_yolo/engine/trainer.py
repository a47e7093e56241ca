"""`TOODTrainer`: Ultralytics' DetectionTrainer with TOOD's recipe (`tood_yolo.utils.recipe.Recipe`) worked out once
and handed to its losses, and the loss epoch wired in."""

from __future__ import annotations

from copy import copy, deepcopy
from pathlib import Path

from torch import optim
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import unwrap_model

from ..data.dataset import TOODDataset, build_tood_dataset
from ..data.reference import SIZE_DIVISOR, fill_batch_padding, group_by_aspect_ratio, reference_scale
from ..nn.backbone import fetch_imagenet, imagenet_archs, input_pad_value, without_backbone_weights
from ..nn.configs import YAML_SUFFIXES, read_config
from ..nn.model import TOODDetectionModel
from ..utils.loss import TOODLoss
from ..utils.recipe import RECIPES, Recipe, arg, recipe_arguments
from .amp import check_amp_replaced
from .validator import TOODDetectionValidator


def _criteria(trainer):
    """The losses of the trained and the EMA model, built with the run's recipe if Ultralytics has not built them."""
    for model in (unwrap_model(trainer.model), getattr(trainer.ema, "ema", None)):
        if model is not None:
            if getattr(model, "criterion", None) is None:
                model.criterion = model.init_criterion(trainer.recipe)
            yield model.criterion


def _tood_criteria(trainer) -> list[TOODLoss]:
    """The TOOD losses of the trained and the EMA model (none for the ablation's T-head + v8 loss: no warm-up)."""
    return [c for c in _criteria(trainer) if isinstance(c, TOODLoss)]


def set_loss_epoch(trainer) -> None:
    """Tell the loss of the trained and the EMA model which epoch runs (warm-up or TAL); also right after a resume.

    Under `time=`, Ultralytics re-estimates the run's epochs after each epoch (`BaseTrainer._do_train` sets
    `trainer.epochs`); the warm-up is re-planned with that estimate first (`Recipe.replanned`), and each change is
    logged, so that the last epoch the budget allows trains with TAL. The losses get the trainer's recipe each time.
    """
    criteria = _tood_criteria(trainer)
    if trainer.args.time and criteria:
        recipe = trainer.recipe.replanned(trainer.epochs, trainer.epoch)
        if recipe != trainer.recipe:
            LOGGER.info(f"TOOD: time={trainer.args.time} h is now estimated at {trainer.epochs} epochs: ATSS warm-up "
                        f"for {recipe.warmup.epochs} epoch(s), then task alignment learning")
        trainer.recipe = recipe
    for criterion in criteria:
        criterion.recipe = trainer.recipe
    for criterion in _criteria(trainer):
        criterion.epoch = trainer.epoch


def log_warmup(trainer) -> None:
    """Say at the start how many epochs the ATSS warm-up takes, and when it was cut so that the run ends in TAL."""
    if not _tood_criteria(trainer):
        return
    warmup = trainer.recipe.warmup
    if trainer.args.time:
        LOGGER.info(f"TOOD: recipe '{trainer.recipe.name}', time={trainer.args.time} h: ATSS warm-up for "
                    f"{warmup.asked} epoch(s), cut to leave the last epoch of the run to task "
                    "alignment learning once Ultralytics has estimated the run's epochs (after each epoch)")
        return
    plan, cut = warmup.describe(trainer.epochs)
    if cut:
        LOGGER.warning(f"TOOD: {cut}")
    LOGGER.info(f"TOOD: recipe '{trainer.recipe.name}', {plan}")


def warn_if_ended_in_warmup(trainer) -> None:
    """Warn when the run stopped in the ATSS warm-up, before any epoch of TAL: a `time=` budget of about one epoch
    (Ultralytics estimates the run's length only after its first epoch), or early stopping (`patience=`)."""
    criteria = _tood_criteria(trainer)
    if criteria and criteria[0].warmup:
        LOGGER.warning(f"TOOD: the run stopped in epoch {trainer.epoch + 1}, inside the ATSS warm-up: no epoch trained "
                       "with task alignment learning (lower initial_epoch= or give a longer time= / patience=)")


def count_iterations(trainer) -> None:
    """Count the run's 0-based iteration (Ultralytics' `ni`, which its loop keeps to itself) at each batch start."""
    if trainer.iteration_epoch != trainer.epoch:  # the first batch of an epoch (also after a resume or a retry)
        trainer.iteration_epoch, trainer.iteration = trainer.epoch, trainer.epoch * len(trainer.train_loader) - 1
    trainer.iteration += 1


def read_model_yaml(model) -> dict:
    """The model YAML of a run's `model=`: a YAML path or a shipped config's name, or a checkpoint (loaded whole:
    only a trainer started without `TOOD.train`, which says the recipe and warm-up itself); {} for anything else."""
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() in YAML_SUFFIXES:
        return read_config(model)
    if isinstance(model, (str, Path)) and Path(model).suffix == ".pt" and Path(model).exists():
        return getattr(load_checkpoint(model)[0], "yaml", None) or {}
    return {}


class TOODTrainer(DetectionTrainer):
    """Train TOOD models through Ultralytics' trainer with one of TOOD's recipes.

    The recipe (`tood_yolo.utils.recipe.Recipe`) is worked out once, here: the `recipe=` argument, else the model YAML's
    `recipe:`, else `mmdet` for ResNet backbones and `ultralytics` otherwise; every Ultralytics argument overrides the
    recipe's values. The run's arguments then say the recipe and its warm-up (`recipe_arguments`), so that DDP workers
    and a resume get them back, and the trainer hands the recipe to its losses.

    `mmdet` (the reference's 1x recipe): SGD lr 0.01 without Nesterov, momentum 0.9, one group with weight decay 1e-4
    on every parameter, no gradient clipping, linear warm-up from 0.001 x lr over 500 iterations (while
    `warmup_epochs` keeps its default), lr steps x0.1 at 8/12 and 11/12 of the epochs (unless `cos_lr=True` or another
    `lrf` picks Ultralytics' schedules), the reference's input pipeline (`tood_yolo.data.reference`) with flips only,
    12 epochs of batch 16, no gradient accumulation (`LossScale`), and ImageNet weights for ResNet YAMLs
    (`fetch_imagenet`): step 1 equals mmdet's (tests/test_step1.py). Deviation that stays: Ultralytics' EMA.

    `ultralytics`: Ultralytics' defaults, untouched, and TOOD's loss in Ultralytics' convention (`LossScale`).

    Attributes:
        keep_ratio (tuple[int, int] | None): The (long, short) scale of the reference's pipeline, None: Ultralytics'.
    """

    keep_ratio: tuple[int, int] | None = None

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = overrides or {}
        self.model_yaml: dict | None = None  # read only when the arguments leave the recipe or its warm-up open
        if not overrides.get("resume"):  # a resume takes the run's own arguments back from its checkpoint
            given = recipe_arguments(overrides, self._model_yaml(overrides))
            overrides = {**RECIPES[given["recipe"]].overrides, **overrides, **given}
        super().__init__(cfg, overrides, _callbacks)
        self.recipe = Recipe.of(self.args, self._model_yaml(self.args))
        # the reference's pipeline at the scale the run's imgsz stands for, read before Ultralytics rounds imgsz
        self.keep_ratio = reference_scale(self.args.imgsz) if self.recipe.spec.keep_ratio else None
        for warning in self.recipe.gain_warnings(self.args):
            LOGGER.warning(warning)
        self.iteration_epoch, self.iteration = None, -1
        for event, callback in (("on_train_epoch_start", set_loss_epoch), ("on_train_start", log_warmup),
                                ("on_train_batch_start", count_iterations), ("on_train_end", warn_if_ended_in_warmup)):
            if callback not in self.callbacks[event]:  # DDP workers get the callbacks pickled
                self.add_callback(event, callback)

    def _model_yaml(self, args) -> dict:
        """The model YAML as far as the run's arguments (a dict or the trainer's namespace) need it: {} when they say
        the recipe and its warm-up, else read once (`read_model_yaml`)."""
        if arg(args, "recipe") and arg(args, "initial_epoch") is not None:
            return {}
        if self.model_yaml is None:
            self.model_yaml = read_model_yaml(arg(args, "model"))
        return self.model_yaml

    def get_model(self, cfg: str | dict | None = None, weights=None, verbose: bool = True) -> TOODDetectionModel:
        """`DetectionTrainer.get_model` with TOOD's model class, which builds TOOD's modules and picks TOOD's loss
        (built with the run's recipe once training starts)."""
        if self.model_yaml and isinstance(cfg, (str, Path)) and str(cfg) == str(self.args.model):
            cfg = deepcopy(self.model_yaml)  # the run's YAML, already read for its recipe
        cfg = self._backbone_weights(read_config(cfg) if isinstance(cfg, (str, Path)) else cfg, weights)
        model = TOODDetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        return model

    def _backbone_weights(self, cfg: dict | None, weights) -> dict | None:
        """The model YAML a run builds its model from, as far as its ResNet's ImageNet weights go: none when the
        weights come from a checkpoint (`weights`) or the run asks for random init (`pretrained=False`); else the
        ImageNet file in torch hub's cache, downloaded there when missing, or an error before the first epoch when it
        cannot be (`fetch_imagenet`)."""
        if not cfg or not imagenet_archs(cfg):
            return cfg
        if weights is not None or self.args.pretrained is False:
            if weights is None:
                LOGGER.info("TOOD: pretrained=False: the ResNet backbone starts from random init, not ImageNet")
            return without_backbone_weights(cfg)
        for arch in imagenet_archs(cfg):
            fetch_imagenet(arch)
        return cfg

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> TOODDataset:
        """`DetectionTrainer.build_dataset` with TOOD's dataset class, which names bad label rows and a missing labels
        folder (`tood_yolo.data.dataset`), and under the recipe's `keep_ratio` runs the reference's pipeline at the
        run's scale (`tood_yolo.data.reference`), in training and in its validation (the reference's test pipeline:
        the same resize and padding, no flip)."""
        model = unwrap_model(self.model)
        gs = max(int(model.stride.max()), 32)
        return build_tood_dataset(self.args, img_path, batch, self.data, mode=mode, rect=mode == "val", stride=gs,
                                  keep_ratio=self.keep_ratio, pad_value=input_pad_value(model))

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        """Ultralytics' loader; for training under the reference's pipeline, its batches grouped by aspect ratio as
        mmdet's `AspectRatioBatchSampler` groups them (`group_by_aspect_ratio`)."""
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if self.keep_ratio and mode == "train":
            loader = group_by_aspect_ratio(loader, loader.dataset.aspect_ratio_flags())
        return loader

    def _setup_train(self) -> None:
        """Ultralytics' set-up with TOOD's AMP check on the model itself (`check_amp_replaced`): no yolo26n.pt
        download. Under the reference's pipeline `imgsz` is the long side of its scale, not a square size: Ultralytics
        rounds it to the model's stride, and it is given back as it was (saved arguments and a resume keep it)."""
        imgsz = self.args.imgsz if self.keep_ratio else None
        with check_amp_replaced():
            super()._setup_train()
        if self.keep_ratio:
            self.args.imgsz = imgsz
            LOGGER.info(f"TOOD: the {self.recipe.name} recipe's input pipeline: keep-ratio resize to fit "
                        f"{self.keep_ratio} (imgsz={imgsz} is its long side), horizontal flip p={self.args.fliplr}, "
                        f"batches padded to multiples of {SIZE_DIVISOR} and grouped by aspect ratio")

    def _build_train_pipeline(self) -> None:
        """Ultralytics' loaders and optimiser with the recipe's nominal batch (`LossScale`) for the batch it runs.

        Ultralytics calls this once the batch is known (after AutoBatch) and again after its out-of-memory retry halves
        the batch; `nbs` decides both the gradient accumulation and the weight-decay scaling there.
        """
        nbs = self.args.nbs
        self.iteration_epoch = None  # a retry restarts the epoch: `count_iterations` counts it from its start
        self.args.nbs = self.recipe.loss_scale.nominal_batch(self.batch_size, nbs)
        try:
            super()._build_train_pipeline()
        finally:
            self.args.nbs = nbs

    def _get_warmup_iterations(self, num_batches: int) -> int:
        """The recipe's learning-rate warm-up (mmdet: 500 iterations), else Ultralytics'
        (`Recipe.warmup_iterations`); kept as `warmup_iters` for the recipe's warm-up rate (`_set_warmup_lr`)."""
        n = self.recipe.warmup_iterations(self.args, self.epochs, num_batches)
        self.warmup_iters = super()._get_warmup_iterations(num_batches) if n is None else n
        return self.warmup_iters

    def _setup_scheduler(self) -> None:
        """The recipe's step schedule (mmdet: x0.1 at 8/12 and 11/12 of the epochs), else Ultralytics' schedules
        (`Recipe.lr_lambda`)."""
        lf = self.recipe.lr_lambda(self.args, self.epochs)
        if lf is None:
            return super()._setup_scheduler()
        self.lf = lf
        self.scheduler = optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """The recipe's optimiser: under mmdet with `optimizer=SGD`, the reference's plain SGD (one group of every
        parameter with weight decay, no Nesterov, `Recipe.param_groups`), logged as it trains; else Ultralytics'."""
        groups = self.recipe.param_groups(unwrap_model(model), name, decay)
        if groups is None:
            return super().build_optimizer(model, name, lr, momentum, decay, iterations)
        optimizer = optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
        n = sum(len(g["params"]) for g in groups)
        LOGGER.info(f"{colorstr('optimizer:')} SGD(lr={lr}, momentum={momentum}, nesterov=False) with 1 parameter "
                    f"group: {n} parameters, weight_decay={decay} on every one (the {self.recipe.name} recipe)")
        return optimizer

    def optimizer_step(self) -> None:
        """Ultralytics' step (unscale, step, EMA update), clipping the gradient norm at 10 only where the recipe does
        (`RecipeSpec.clip_gradients`: the reference's 1x config does not clip)."""
        if self.recipe.spec.clip_gradients:
            return super().optimizer_step()
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def preprocess_batch(self, batch: dict) -> dict:
        """Ultralytics' batch preprocessing, then the padding of a reference batch painted (`fill_batch_padding`);
        before that, the recipe's warm-up learning rate (`Recipe.warmup_lr`) in place of the rate Ultralytics' warm-up
        has just set for this iteration."""
        self._set_warmup_lr()
        return fill_batch_padding(super().preprocess_batch(batch))

    def _set_warmup_lr(self) -> None:
        """Every group's warm-up rate at this iteration (`self.iteration`, counted by `count_iterations`), while the
        warm-up runs and the recipe starts it from a factor of the rate (mmdet: 0.001 x lr, as LinearLR)."""
        nw, ni = getattr(self, "warmup_iters", 0), getattr(self, "iteration", -1)
        if not nw or not 0 <= ni <= nw:
            return
        for group in self.optimizer.param_groups:
            lr = self.recipe.warmup_lr(group["initial_lr"] * self.lf(self.epoch), ni, nw)
            if lr is not None:
                group["lr"] = lr

    def get_validator(self):
        """Ultralytics' detection validator; with `save_json=True` it prints COCO's table via pycocotools."""
        return TOODDetectionValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
        )
