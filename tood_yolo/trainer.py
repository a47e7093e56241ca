"""`TOODTrainer`: Ultralytics' DetectionTrainer with TOOD's recipe as defaults and the loss epoch wired in."""

from __future__ import annotations

from copy import copy

from torch import optim
from ultralytics.cfg import DEFAULT_CFG, DEFAULT_CFG_DICT
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from .coco import TOODDetectionValidator

# mmdet tood_r50_fpn_1x_coco in Ultralytics' terms. Every argument a user passes overrides these.
RECIPE = {
    "epochs": 12,
    "batch": 16,
    "optimizer": "SGD",
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
}
WARMUP_ITERS = 500  # mmdet LinearLR over the first 500 iterations
MILESTONES = (8 / 12, 11 / 12)  # lr x0.1 at epoch 8 and again at 11 of 12 (16 and 22 of 24 for the 2x schedule)
V8_LOSS_GAINS = ("box", "cls", "dfl")  # v8DetectionLoss gains, meaningless for TOOD's loss


def set_loss_epoch(trainer) -> None:
    """Tell the loss of the trained and the EMA model which epoch runs (warm-up or TAL); also right after a resume."""
    for model in (unwrap_model(trainer.model), getattr(trainer.ema, "ema", None)):
        if model is not None:
            if getattr(model, "criterion", None) is None:
                model.criterion = model.init_criterion()
            model.criterion.epoch = trainer.epoch


class TOODTrainer(DetectionTrainer):
    """Train TOOD models with the reference's recipe through Ultralytics' trainer.

    Defaults (overridable by any Ultralytics argument): SGD lr 0.01, momentum 0.9, weight decay 1e-4 on every
    parameter, linear warm-up over 500 iterations (while `warmup_epochs` keeps its default), lr steps x0.1 at 8/12 and
    11/12 of the epochs (unless `cos_lr=True` or another `lrf` picks Ultralytics' schedules), flip-only
    augmentation, 12 epochs of batch 16, and `nbs` equal to the batch, so that Ultralytics neither accumulates
    gradients over batches nor rescales weight decay: with `TOODLoss` the optimiser sees the reference's gradients.
    Deviations that stay: Ultralytics' square letterbox (the reference keeps the aspect ratio at 1333x800) and its
    EMA of the weights for validation and checkpoints.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks=None):
        overrides = {**RECIPE, **(overrides or {})}
        if isinstance(overrides["batch"], int) and overrides["batch"] > 0:
            overrides.setdefault("nbs", overrides["batch"])
        super().__init__(cfg, overrides, _callbacks)
        # Decided from values, not from which keys were passed: a DDP worker or a resume gets every argument back
        for k in V8_LOSS_GAINS:
            if getattr(self.args, k) != DEFAULT_CFG_DICT[k]:
                LOGGER.warning(f"'{k}={getattr(self.args, k)}' is a gain of YOLOv8's loss and does not apply to TOOD")
        if set_loss_epoch not in self.callbacks["on_train_epoch_start"]:  # DDP workers get the callbacks pickled
            self.add_callback("on_train_epoch_start", set_loss_epoch)

    def _get_warmup_iterations(self, num_batches: int) -> int:
        """500 iterations as the reference while `warmup_epochs` keeps Ultralytics' default; never past the last epoch."""
        if self.args.warmup_epochs != DEFAULT_CFG_DICT["warmup_epochs"]:
            return super()._get_warmup_iterations(num_batches)
        return min(WARMUP_ITERS, max(self.epochs - 1, 0) * num_batches)

    def _setup_scheduler(self) -> None:
        """Step decay at 8/12 and 11/12 of the epochs, unless `cos_lr=True` or `lrf` differs from its default."""
        if self.args.cos_lr or self.args.lrf != DEFAULT_CFG_DICT["lrf"]:
            return super()._setup_scheduler()
        m1, m2 = (round(self.epochs * m) for m in MILESTONES)
        self.lf = lambda epoch: 0.1 ** ((epoch >= m1) + (epoch >= m2))
        self.scheduler = optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        """Ultralytics' optimiser with weight decay on every parameter group, as mmdet applies it (no paramwise cfg)."""
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        for group in optimizer.param_groups:
            group["weight_decay"] = decay
        return optimizer

    def get_validator(self):
        """Ultralytics' detection validator; with `save_json=True` it prints COCO's table via pycocotools."""
        return TOODDetectionValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
        )
