"""`TOODTrainer`: Ultralytics' DetectionTrainer with TOOD's recipes (`tood_yolo.utils.recipe`) and the loss
epoch wired in."""

from __future__ import annotations

from copy import copy

from torch import optim
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..nn.model import TOODDetectionModel
from ..utils.loss import TOODLoss
from ..utils.recipe import RECIPES, LossScale, check_recipe, model_yaml_of, recipe_of
from .validator import TOODDetectionValidator

WARMUP_ITERS = 500  # mmdet LinearLR over the first 500 iterations
MILESTONES = (8 / 12, 11 / 12)  # lr x0.1 at epoch 8 and again at 11 of 12 (16 and 22 of 24 for the 2x schedule)
V8_LOSS_GAINS = ("box", "cls", "dfl")  # v8DetectionLoss gains: meaningless for TOOD's loss under the mmdet recipe


def _criteria(trainer):
    """The losses of the trained and the EMA model, built if Ultralytics has not built them yet."""
    for model in (unwrap_model(trainer.model), getattr(trainer.ema, "ema", None)):
        if model is not None:
            if getattr(model, "criterion", None) is None:
                model.criterion = model.init_criterion()
            yield model.criterion


def _tood_criteria(trainer) -> list[TOODLoss]:
    """The TOOD losses of the trained and the EMA model (none for the ablation's T-head + v8 loss: no warm-up)."""
    return [c for c in _criteria(trainer) if isinstance(c, TOODLoss)]


def set_loss_epoch(trainer) -> None:
    """Tell the loss of the trained and the EMA model which epoch runs (warm-up or TAL); also right after a resume.

    Under `time=`, Ultralytics re-estimates the run's epochs after each epoch (`BaseTrainer._do_train` sets
    `trainer.epochs`); the warm-up is re-planned with that estimate first (`ATSSWarmup.replanned`), and each change is
    logged, so that the last epoch the budget allows trains with TAL.
    """
    criteria = _tood_criteria(trainer)
    if trainer.args.time and criteria:
        warmup = criteria[0].atss_warmup.replanned(trainer.epochs, trainer.epoch)
        if warmup != criteria[0].atss_warmup:
            LOGGER.info(f"TOOD: time={trainer.args.time} h is now estimated at {trainer.epochs} epochs: ATSS warm-up "
                        f"for {warmup.epochs} epoch(s), then task alignment learning")
        for criterion in criteria:
            criterion.atss_warmup = warmup
    for criterion in _criteria(trainer):
        criterion.epoch = trainer.epoch


def log_warmup(trainer) -> None:
    """Say at the start how many epochs the ATSS warm-up takes, and when it was cut so that the run ends in TAL."""
    criteria = _tood_criteria(trainer)
    if not criteria:
        return
    if trainer.args.time:
        LOGGER.info(f"TOOD: recipe '{trainer.recipe}', time={trainer.args.time} h: ATSS warm-up for "
                    f"{criteria[0].atss_warmup.asked} epoch(s), cut to leave the last epoch of the run to task "
                    "alignment learning once Ultralytics has estimated the run's epochs (after each epoch)")
        return
    plan, cut = criteria[0].atss_warmup.describe(trainer.epochs)
    if cut:
        LOGGER.warning(f"TOOD: {cut}")
    LOGGER.info(f"TOOD: recipe '{trainer.recipe}', {plan}")


def warn_if_ended_in_warmup(trainer) -> None:
    """Warn when the run stopped in the ATSS warm-up, before any epoch of TAL: a `time=` budget of about one epoch
    (Ultralytics estimates the run's length only after its first epoch), or early stopping (`patience=`)."""
    criteria = _tood_criteria(trainer)
    if criteria and criteria[0].warmup:
        LOGGER.warning(f"TOOD: the run stopped in epoch {trainer.epoch + 1}, inside the ATSS warm-up: no epoch trained "
                       "with task alignment learning (lower initial_epoch= or give a longer time= / patience=)")


class TOODTrainer(DetectionTrainer):
    """Train TOOD models through Ultralytics' trainer with one of TOOD's recipes.

    The recipe is the `recipe=` argument, else the model YAML's `recipe:`, else `mmdet` for ResNet backbones and
    `ultralytics` otherwise (`tood_yolo.utils.recipe`). Every Ultralytics argument overrides the recipe's values.

    `mmdet` (the reference's 1x recipe): SGD lr 0.01 without Nesterov, momentum 0.9, weight decay 1e-4 on every
    parameter, linear warm-up over 500 iterations (while `warmup_epochs` keeps its default), lr steps x0.1 at 8/12 and
    11/12 of the epochs (unless `cos_lr=True` or another `lrf` picks Ultralytics' schedules), flip-only augmentation,
    12 epochs of batch 16, and no gradient accumulation (`LossScale`): the optimiser sees the reference's gradients.
    Deviations that stay: Ultralytics' square letterbox (the reference keeps the aspect ratio at 1333x800) and its EMA.

    `ultralytics`: Ultralytics' defaults, untouched, and TOOD's loss in Ultralytics' convention (`LossScale`).
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = overrides or {}
        recipe = check_recipe(overrides.get("recipe") or recipe_of(model_yaml_of(overrides.get("model"))))
        super().__init__(cfg, {**RECIPES[recipe], **overrides, "recipe": recipe}, _callbacks)
        self.recipe = check_recipe(self.args.recipe)  # a resume restores the run's own arguments
        self.loss_scale = LossScale(self.recipe)
        # Decided from values, not from which keys were passed: a DDP worker or a resume gets every argument back
        if self.recipe == "mmdet":
            for k in V8_LOSS_GAINS:
                if getattr(self.args, k) != DEFAULT_CFG_DICT[k]:
                    LOGGER.warning(f"'{k}={getattr(self.args, k)}' is a gain of YOLOv8's loss: the mmdet recipe keeps "
                                   "the reference's loss weights (recipe=ultralytics maps cls= and box= to TOOD's)")
        for event, callback in (("on_train_epoch_start", set_loss_epoch), ("on_train_start", log_warmup),
                                ("on_train_end", warn_if_ended_in_warmup)):
            if callback not in self.callbacks[event]:  # DDP workers get the callbacks pickled
                self.add_callback(event, callback)

    def get_model(self, cfg: str | dict | None = None, weights=None, verbose: bool = True) -> TOODDetectionModel:
        """`DetectionTrainer.get_model` with TOOD's model class, which builds TOOD's modules and picks TOOD's loss."""
        model = TOODDetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1)
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        return model

    def _setup_train(self) -> None:
        """Ultralytics' set-up with TOOD's AMP check on the model itself (`tood_yolo.engine.amp`): no
        yolo26n.pt download."""
        from ..register import check_amp_replaced  # the module that replaces Ultralytics' names, and imports this one

        with check_amp_replaced():
            super()._setup_train()

    def _build_train_pipeline(self) -> None:
        """Ultralytics' loaders and optimiser with the recipe's nominal batch (`LossScale`) for the batch it runs.

        Ultralytics calls this once the batch is known (after AutoBatch) and again after its out-of-memory retry halves
        the batch; `nbs` decides both the gradient accumulation and the weight-decay scaling there.
        """
        nbs = self.args.nbs
        self.args.nbs = self.loss_scale.nominal_batch(self.batch_size, nbs)
        try:
            super()._build_train_pipeline()
        finally:
            self.args.nbs = nbs

    def _get_warmup_iterations(self, num_batches: int) -> int:
        """mmdet: 500 iterations while `warmup_epochs` keeps Ultralytics' default, never past the last epoch."""
        if self.recipe != "mmdet" or self.args.warmup_epochs != DEFAULT_CFG_DICT["warmup_epochs"]:
            return super()._get_warmup_iterations(num_batches)
        return min(WARMUP_ITERS, max(self.epochs - 1, 0) * num_batches)

    def _setup_scheduler(self) -> None:
        """mmdet: step decay at 8/12 and 11/12 of the epochs, unless `cos_lr=True` or `lrf` differs from its default."""
        if self.recipe != "mmdet" or self.args.cos_lr or self.args.lrf != DEFAULT_CFG_DICT["lrf"]:
            return super()._setup_scheduler()
        m1, m2 = (round(self.epochs * m) for m in MILESTONES)
        self.lf = lambda epoch: 0.1 ** ((epoch >= m1) + (epoch >= m2))
        self.scheduler = optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimiser; mmdet: weight decay on every parameter group and SGD without Nesterov momentum, as
        the reference's `SGD(lr, momentum, weight_decay)` (no paramwise cfg)."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if self.recipe == "mmdet":
            for group in optimizer.param_groups:
                group["weight_decay"] = decay
                if "nesterov" in group:
                    group["nesterov"] = False
        return optimizer

    def get_validator(self):
        """Ultralytics' detection validator; with `save_json=True` it prints COCO's table via pycocotools."""
        return TOODDetectionValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
        )
