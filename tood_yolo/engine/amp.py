"""TOOD's AMP check: Ultralytics' fp32-vs-autocast comparison run on the model being trained, with nothing to download.

Ultralytics' `check_amp` compares the detections of yolo26n.pt in fp32 and under autocast, and fetches that model on
first use: a TOOD run offline would try a download, and a TOOD run online would judge AMP on another model.
`TOODTrainer` puts `check_amp` below in its place for its set-up (`check_amp_replaced`): the one replacement of an
Ultralytics name outside `tood_yolo.register`, temporary, and kept here so that the engine imports nothing above it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy

import cv2
import numpy as np
import torch
from ultralytics.engine import trainer
from ultralytics.utils import ASSETS, LOGGER, colorstr
from ultralytics.utils.torch_utils import unwrap_model

AMP_RTOL = 1e-2  # relative L2 difference of each training output (boxes, scores) of fp16 autocast vs fp32
NO_AMP_DEVICES = {"cpu", "mps"}  # AMP only on accelerators, as Ultralytics


def _images(imgsz: int, device: torch.device) -> torch.Tensor:
    """(2, 3, imgsz, imgsz) RGB images in [0, 1]: Ultralytics' bundled bus.jpg and zidane.jpg, stretched square."""
    ims = [cv2.resize(cv2.imread(str(ASSETS / f)), (imgsz, imgsz))[..., ::-1] for f in ("bus.jpg", "zidane.jpg")]
    return torch.from_numpy(np.ascontiguousarray(np.stack(ims).transpose(0, 3, 1, 2))).to(device).float() / 255


def amp_difference(model: torch.nn.Module, imgsz: int | None = None, dtype: torch.dtype = torch.float16) -> float:
    """Largest relative L2 difference between the training outputs of `model` in fp32 and under autocast to `dtype`.

    The training forward is what AMP runs, and in train mode BatchNorm normalises with batch statistics, so a model
    trained from scratch is checked at its real activation scale (its eval forward, on default running statistics,
    underflows fp16 at random init). It runs on a copy: train-mode BatchNorm updates its running statistics.

    Args:
        model (torch.nn.Module): A detection model whose training forward returns a dict of tensors ("boxes",
            "scores", ...).
        imgsz (int | None): Input size; default max(256, 4 x the largest stride), as Ultralytics' check.
        dtype (torch.dtype): Autocast dtype.

    Returns:
        (float): max over the outputs of ||fp32 - autocast|| / ||fp32||; inf when an autocast output is not finite.
    """
    model = deepcopy(unwrap_model(model)).train()
    imgsz = imgsz or max(256, int(model.stride.max()) * 4)
    im = _images(imgsz, next(model.parameters()).device)
    with torch.no_grad():
        a = model(im)
        with torch.autocast(im.device.type, dtype=dtype):
            b = model(im)
    diff = 0.0
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            if not torch.isfinite(b[k]).all():
                return float("inf")
            diff = max(diff, ((v - b[k].float()).norm() / v.norm().clamp(min=1e-12)).item())
    return diff


def check_amp(model: torch.nn.Module, imgsz: int | None = None) -> bool:
    """Whether to train `model` with AMP: on a CUDA device, when its own fp16 autocast forward agrees with fp32.

    Ultralytics' check without its download: the same kind of fp32-vs-autocast comparison, on the model being trained
    (`amp_difference`). The reason is logged; CPU and MPS: False, as Ultralytics.
    """
    prefix = colorstr("AMP: ")
    device = next(model.parameters()).device
    if device.type in NO_AMP_DEVICES:
        return False
    diff = amp_difference(model, imgsz)
    ok = diff <= AMP_RTOL
    (LOGGER.info if ok else LOGGER.warning)(
        f"{prefix}TOOD check on the model being trained (not yolo26n.pt, nothing downloaded): fp16 autocast vs fp32 "
        f"training forward differ by {diff:.2g} (relative, tolerance {AMP_RTOL:g}) -> "
        + ("AMP on" if ok else "AMP off: anomalies on this system that may cause NaN losses or zero mAP")
    )
    return ok


@contextmanager
def check_amp_replaced() -> Iterator[None]:
    """Within this block Ultralytics' trainer runs TOOD's AMP check (`check_amp`) instead of its own, which downloads
    yolo26n.pt and judges AMP on that model. `BaseTrainer._setup_train` calls `check_amp` as a module global in the
    middle of its set-up (between the model and the DDP broadcast of the result): no argument or hook takes another."""
    original = trainer.check_amp
    trainer.check_amp = check_amp
    try:
        yield
    finally:
        trainer.check_amp = original
