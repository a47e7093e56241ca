"""The alignment maps during training: an `on_fit_epoch_end` callback that saves them and adds them to TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import cv2
from torch import nn

from .compute import NotTOODError, tood_model
from .report import save_alignment_maps


def _tensorboard_enabled() -> bool:
    """Whether Ultralytics' settings enable TensorBoard logging."""
    from ultralytics.utils import SETTINGS

    return bool(SETTINGS.get("tensorboard", False))


def _tensorboard_writer(trainer: Any) -> Any:
    """Ultralytics' TensorBoard writer of this run (module global `WRITER` of its callback), else a SummaryWriter of
    our own on `trainer.save_dir` (Ultralytics' callback logs nothing under pytest), else None."""
    if not _tensorboard_enabled():
        return None
    try:
        from ultralytics.utils.callbacks import tensorboard as tb

        writer = getattr(tb, "WRITER", None)
    except Exception:
        writer = None
    if writer is not None:
        return writer
    writer = getattr(trainer, "_alignment_tb_writer", None)
    if writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        writer = trainer._alignment_tb_writer = SummaryWriter(str(trainer.save_dir))

        def close(trainer):
            w = getattr(trainer, "_alignment_tb_writer", None)
            if w is not None:
                w.close()
                trainer._alignment_tb_writer = None

        trainer.add_callback("teardown", close)
    return writer


def alignment_map_callback(
    image: Any,
    every: int = 1,
    imgsz: int | None = None,
    conf: float = 0.0,
    topk: int = 20,
    cls: Any = None,
    arrow_scale: float = 1.0,
) -> Callable:
    """An `on_fit_epoch_end` callback saving the maps of `image` to `save_dir/alignment_maps/epoch_N/` every `every`
    epochs and at the last one (EMA weights, as validation uses), and adding them to TensorBoard when enabled.

    Usage: `model.add_callback("on_fit_epoch_end", alignment_map_callback("image.jpg", every=5))`.
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    image = str(image) if isinstance(image, Path) else image
    if isinstance(image, str) and not Path(image).is_file():
        raise FileNotFoundError(f"alignment map image {image} not found")
    done = {}

    def on_fit_epoch_end(trainer) -> None:
        from ultralytics.utils import LOGGER, RANK

        if RANK not in {-1, 0} or done.get("trainer") is trainer:
            return  # other DDP ranks; or the final validation of best.pt, which calls this once more
        epoch = trainer.epoch + 1
        last = trainer.stop or epoch >= trainer.epochs
        if last:
            done["trainer"] = trainer
        if epoch % every and not last:
            return
        model = trainer.ema.ema if getattr(trainer, "ema", None) else trainer.model
        try:
            tood_model(model)
        except NotTOODError as e:
            LOGGER.warning(f"alignment maps skipped: {e}")
            return
        save_dir = Path(trainer.save_dir) / "alignment_maps" / f"epoch_{epoch}"
        page = save_alignment_maps(model, image, save_dir, conf=conf, topk=topk, cls=cls,
                                   imgsz=imgsz or trainer.args.imgsz, arrow_scale=arrow_scale)
        LOGGER.info(f"Alignment maps saved to {page}")
        writer = _tensorboard_writer(trainer)
        if writer is not None:
            for name in ("montage", "offsets", "attention"):
                img = cv2.imread(str(save_dir / f"{name}.png"), cv2.IMREAD_COLOR)
                if img is not None:
                    writer.add_image(f"alignment/{name}", img[..., ::-1].copy(), epoch, dataformats="HWC")
            writer.flush()

    return on_fit_epoch_end


def add_alignment_map_callback(model_or_trainer: Any, image: Any, every: int = 1, **kwargs) -> Callable:
    """Register `alignment_map_callback(image, every, **kwargs)` on a YOLO object or trainer ("on_fit_epoch_end").

    A YOLO object whose model is not TOOD raises NotTOODError at once.
    """
    from ultralytics.engine.model import Model

    if isinstance(model_or_trainer, Model) and isinstance(getattr(model_or_trainer, "model", None), nn.Module):
        tood_model(model_or_trainer)
    cb = alignment_map_callback(image, every, **kwargs)
    model_or_trainer.add_callback("on_fit_epoch_end", cb)
    return cb
