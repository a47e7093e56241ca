"""Faults that only show on CUDA, reproduced on the CPU: DDP collectives in the validation loss, fp16 aligned scores."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tood_yolo.utils.loss import TOODLoss

from test_loss import _batch, _Model

WORLD = 2
VAL_BATCHES = (3, 2)  # per rank: Ultralytics' validation sampler can give ranks unequal batch counts
PG_TIMEOUT_S = 10  # gloo raises once a collective has waited this long (a mismatched one waits forever otherwise)
JOIN_TIMEOUT_S = 90  # the test fails, and kills the workers, when they are not done by then
SIZES = ((8, 8), (4, 4))  # 64x64 images at strides 8 and 16
# 4 training images (rank r trains on images 2r, 2r + 1), boxes in pixels, and their classes
TRAIN_BOXES = ([[0, 0, 64, 64], [30, 20, 60, 60]], [[0, 0, 48, 64], [2, 2, 5, 5]], [[8, 8, 64, 56]], [[16, 0, 64, 48]])
TRAIN_CLASSES = ([0, 2], [1, 1], [2], [0])


def _feats(b: int, seed: int) -> list[torch.Tensor]:
    """Random (b, 8, H, W) FPN maps for `_Model`'s head."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 8, h, w, generator=g) for h, w in SIZES]


def _images_batch(images) -> dict:
    """An Ultralytics batch of the training images `images`, re-indexed from 0."""
    boxes = [box for i in images for box in TRAIN_BOXES[i]]
    classes = [c for i in images for c in TRAIN_CLASSES[i]]
    index = [j for j, i in enumerate(images) for _ in TRAIN_BOXES[i]]
    return _batch(boxes, classes, index)


def _model() -> torch.nn.Module:
    """`_Model` with the same weights in every process; the head is what DDP wraps (Ultralytics wraps the model)."""
    torch.manual_seed(0)
    return _Model()


def _val_loss(model, loss_fn, k: int) -> torch.Tensor:
    """(2,) loss_cls, loss_bbox of validation batch `k` from the eval-mode head, as the validator computes it."""
    preds = model.model[-1](_feats(2, 100 + k))  # eval mode: (inference output, raw dict), as Ultralytics' validator
    items = loss_fn(preds, _batch([[4, 4, 40, 30], [10, 30, 22, 44]], [k % 3, 1], [0, 1]))[1]
    return torch.stack((items["loss_cls"], items["loss_bbox"]))


def _train_step(head, loss_fn, feats, batch, world: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The trainer's step: loss x world size (Ultralytics undoes `LossScale`'s division), backward; head gradients."""
    head.zero_grad()
    total, items = loss_fn(head(feats), batch)
    (total * world).backward()
    module = getattr(head, "module", head)
    return total.detach(), torch.stack((items["loss_cls"], items["loss_bbox"])), {
        n: p.grad.clone() for n, p in module.named_parameters()
    }


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """Train (warm-up epoch), validate unequal batch counts under inference mode, train (TAL epoch); save results."""
    dist.init_process_group(
        "gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=PG_TIMEOUT_S)
    )
    try:
        model = _model()
        loss_fn = TOODLoss(model)
        ddp = DistributedDataParallel(model.model[-1])
        mine = [2 * rank, 2 * rank + 1]
        feats, batch = [f[mine] for f in _feats(4, 0)], _images_batch(mine)
        results = {"train0": _train_step(ddp, loss_fn, feats, batch, WORLD)}
        model.eval()
        with torch.inference_mode():  # Ultralytics' validator (smart_inference_mode)
            first = sum(VAL_BATCHES[:rank])  # rank r validates batches first, ..., first + VAL_BATCHES[r] - 1
            val = sum(_val_loss(model, loss_fn, k) for k in range(first, first + VAL_BATCHES[rank]))
            dist.all_reduce(val)  # the validator's reduction of the loss items over ranks
        results["val"] = val
        model.train()
        loss_fn.epoch = 4  # task alignment learning
        results["train4"] = _train_step(ddp, loss_fn, feats, batch, WORLD)
        dist.barrier()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_validation_with_unequal_batches_finishes_and_training_matches_one_process(tmp_path):
    ctx = mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers still running after {JOIN_TIMEOUT_S} s: a collective hangs")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # validation: every rank's batches counted once, each with its own (not all-reduced) averaging factors
    model = _model()
    loss_fn = TOODLoss(model)
    model.eval()
    with torch.no_grad():
        expected = sum(_val_loss(model, loss_fn, k) for k in range(sum(VAL_BATCHES)))
    for r in ranks:
        torch.testing.assert_close(r["val"], expected)

    # training: one process on the union of the ranks' images; mmdet's avg_factor (all-reduced mean) makes the mean of
    # the ranks' losses and DDP's averaged gradients those of the union
    model.train()
    feats, batch = _feats(4, 0), _images_batch(range(2 * WORLD))
    for key, epoch in (("train0", 0), ("train4", 4)):
        loss_fn.epoch = epoch
        total, items, grads = _train_step(model.model[-1], loss_fn, feats, batch, 1)
        torch.testing.assert_close(sum(r[key][1] for r in ranks) / WORLD, items)
        torch.testing.assert_close(sum(r[key][0] for r in ranks), total)  # LossScale divides by the world size
        assert items.min() > 0  # positives on both ranks
        for r in ranks:
            for n, g in grads.items():
                torch.testing.assert_close(r[key][2][n], g, rtol=1e-4, atol=1e-7, msg=f"{key} gradient of {n}")


# Tolerances (loss rtol, relative L2 error of all head gradients): autocast rounds every conv to fp16 (~1e-3) or bf16
# (~4e-3, 8 bits), and the gradient through the head's GroupNorms is noisier; measured on this set-up: loss 6e-4 (fp16)
# and 4e-3 (bf16), gradients 3.5-6 % for both. Before the fix (score formed in fp16 / bf16): NaN gradients under fp16,
# and under bf16 a loss 6x the fp32 one.
AMP_TOLERANCE = {torch.float16: (2e-3, 0.1), torch.bfloat16: (1e-2, 0.1)}


def _amp_step(
    model, loss_fn, feats, batch, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Loss, all head gradients (flattened) and the aligned scores' dtype of a step under CPU autocast (None: fp32)."""
    head = model.model[-1]
    head.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        preds = head(feats)
        total = loss_fn(preds, batch)[0]
    total.backward()
    return total.detach(), torch.cat([p.grad.flatten() for p in head.parameters()]), preds["scores"].dtype


@pytest.mark.parametrize("epoch", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_loss_and_gradients_are_finite_and_match_fp32_with_extreme_logits(dtype, epoch):
    model = _model()
    head = model.model[-1]
    with torch.no_grad():  # class logits spread over about +-20, alignment logits M about 12: fp16 sigmoids hit 1.0
        head.tood_cls.weight.normal_(0, 0.55)
        head.tood_cls.bias.zero_()
        head.cls_prob_module[-1].weight.normal_(0, 0.5)
        head.cls_prob_module[-1].bias.fill_(12.0)
    feats, batch = _feats(2, 1), _images_batch([0, 1])
    logits = head.forward_level(feats[0], 0, torch.zeros(64, 2))["cls_logits"]
    assert logits.min() < -15 and logits.max() > 15
    loss_fn = TOODLoss(model)
    loss_fn.epoch = epoch
    loss32, grad32, _ = _amp_step(model, loss_fn, feats, batch, None)
    loss, grad, score_dtype = _amp_step(model, loss_fn, feats, batch, dtype)
    assert torch.isfinite(grad).all()
    rtol, grad_rtol = AMP_TOLERANCE[dtype]
    torch.testing.assert_close(loss, loss32, rtol=rtol, atol=0)
    assert (grad - grad32).norm() / grad32.norm() < grad_rtol
    assert score_dtype == torch.float32  # formed in fp32 from the autocast logits


class _BrokenFp16(torch.nn.Module):
    """A "model" whose autocast forward overflows, as on GPUs with a faulty fp16 path."""

    stride = torch.tensor([8.0])

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = x.mean((1, 2, 3)) * self.w
        return {"scores": y * float("inf") if torch.is_autocast_enabled("cpu") else y}


def test_tood_amp_check_uses_the_model_itself_and_downloads_nothing(monkeypatch):
    from ultralytics.engine import trainer as trainer_module
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import checks

    from tood_yolo import TOODDetectionModel
    from tood_yolo.engine import amp
    from tood_yolo.engine.amp import check_amp_replaced
    from tood_yolo.engine.trainer import TOODTrainer

    def no_network(*args, **kwargs):
        raise AssertionError("the AMP check tried to download or load another model")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("ultralytics.YOLO", no_network)
    monkeypatch.setattr("ultralytics.utils.downloads.attempt_download_asset", no_network)
    monkeypatch.setattr(amp, "NO_AMP_DEVICES", set())  # run the CUDA path on the CPU (fp16 CPU autocast)

    # TOODTrainer's set-up runs Ultralytics' with TOOD's check in place of Ultralytics' own, and puts it back
    seen = []
    monkeypatch.setattr(DetectionTrainer, "_setup_train", lambda self: seen.append(trainer_module.check_amp))
    TOODTrainer.__new__(TOODTrainer)._setup_train()
    assert seen == [amp.check_amp] and trainer_module.check_amp is checks.check_amp

    torch.manual_seed(0)
    model = TOODDetectionModel(Path(__file__).parents[1] / "cfg/tood-n.yaml", verbose=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert amp.amp_difference(model, imgsz=64) < amp.AMP_RTOL / 2  # measured 3e-3 (fp16; 2e-3 at 128 and 256 px)
    with check_amp_replaced():
        assert trainer_module.check_amp(model, imgsz=64)
        assert not trainer_module.check_amp(_BrokenFp16())
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # untouched
