"""TOOD's two recipes: which one a run gets, the loss-scale contract (the optimiser's actual steps) and the warm-up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils.tal import dist2bbox, make_anchors

from tood_yolo import TOODDetectionModel
from tood_yolo.utils import recipe as recipes
from tood_yolo.data.synthetic import make_synthetic_dataset
from tood_yolo.utils.loss import THeadV8Loss, TOODLoss
from tood_yolo.engine.trainer import TOODTrainer

from test_loss import BATCH, _inputs, _Model  # tests/ is on sys.path (pytest's rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "imgsz": 128, "device": "cpu", "workers": 0, "amp": False, "plots": False, "seed": 0,
        "deterministic": True, "exist_ok": True, "val": False, "warmup_epochs": 0}  # constant lr: every step moves


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "syn", n_train=24, n_val=8, imgsz=128)


def trainer_for(model: str, tmp_path: Path, data: Path, **overrides) -> TOODTrainer:
    return TOODTrainer(overrides={"model": str(ROOT / model), "data": str(data), "project": str(tmp_path),
                                  "device": "cpu", **overrides})


def test_recipe_comes_from_the_yaml_and_the_argument_overrides_it(tiny_data, tmp_path):
    a = trainer_for("cfg/tood-n.yaml", tmp_path, tiny_data).args
    assert (a.recipe, a.optimizer, a.mosaic, a.hsv_v, a.nbs, a.epochs) == ("ultralytics", "auto", 1.0, 0.4, 64, 100)
    a = trainer_for("cfg/tood-r50.yaml", tmp_path, tiny_data).args
    assert (a.recipe, a.optimizer, a.mosaic, a.epochs) == ("mmdet", "SGD", 0.0, 12)
    a = trainer_for("cfg/tood-n.yaml", tmp_path, tiny_data, recipe="mmdet", mosaic=0.5).args
    assert (a.recipe, a.optimizer, a.mosaic, a.fliplr) == ("mmdet", "SGD", 0.5, 0.5)  # any argument beats the recipe
    a = trainer_for("cfg/tood-r50.yaml", tmp_path, tiny_data, recipe="ultralytics").args
    assert (a.recipe, a.optimizer, a.mosaic) == ("ultralytics", "auto", 1.0)
    with pytest.raises(ValueError, match="unknown recipe='yolo'.*mmdet, ultralytics"):
        trainer_for("cfg/tood-n.yaml", tmp_path, tiny_data, recipe="yolo")
    assert [recipes.recipe_of({"backbone": [[-1, 1, "ResNet", [50]]]}), recipes.recipe_of({"backbone": []})] == [
        "mmdet", "ultralytics"]  # the paper's ResNets default to the reference's recipe without a `recipe:` line


def train_and_count_steps(data: Path, tmp_path: Path, monkeypatch, batch, oom: bool = False) -> dict:
    """Train tood-n for one epoch under mmdet; count the optimiser steps that moved the weights."""
    seen = {"moves": 0, "batches": 0, "raised": False}

    def fake_oom(self, batch):  # Ultralytics' retry halves the batch on an out-of-memory error in the first epoch
        if not seen["raised"]:
            seen["raised"] = True
            raise RuntimeError("CPU out of memory (simulated)")
        return orig_preprocess(self, batch)

    if oom:
        orig_preprocess = TOODTrainer.preprocess_batch
        monkeypatch.setattr(TOODTrainer, "preprocess_batch", fake_oom)
    monkeypatch.setattr(TOODTrainer, "auto_batch", lambda self, *a, **k: 6)  # AutoBatch's choice, without CUDA

    def before(trainer):
        seen["w"] = next(trainer.model.model[-1].parameters()).detach().clone()

    def after(trainer):
        w = next(trainer.model.model[-1].parameters())
        seen["moves"] += int(not torch.equal(w, seen["w"]))
        seen["batches"] += 1
        seen["batch_size"], seen["accumulate"] = trainer.batch_size, trainer.accumulate
        seen["wd"] = {g["weight_decay"] for g in trainer.optimizer.param_groups}

    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    model.add_callback("on_train_batch_start", before)
    model.add_callback("on_train_batch_end", after)
    model.train(data=str(data), project=str(tmp_path), name="run", batch=batch, recipe="mmdet", **TINY)
    return seen


@pytest.mark.parametrize("batch,oom,expected_batch", [(-1, False, 6), (0.5, False, 6), (8, True, 4)])
def test_mmdet_steps_once_per_batch_whatever_decided_the_batch(tiny_data, tmp_path, monkeypatch, batch, oom,
                                                               expected_batch):
    """The reference's step: one optimiser step per batch, unscaled weight decay, for AutoBatch (batch=-1 or a
    fraction) and after Ultralytics' out-of-memory retry halved the batch. Before `LossScale` owned `nbs`, these runs
    accumulated round(64 / batch) batches per step (and rescaled weight decay)."""
    seen = train_and_count_steps(tiny_data, tmp_path, monkeypatch, batch, oom)
    assert seen["batch_size"] == expected_batch and seen["accumulate"] == 1
    assert seen["batches"] == -(-24 // expected_batch) and seen["moves"] == seen["batches"]
    assert seen["wd"] == {1e-4}


def test_ultralytics_recipe_accumulates_to_nbs_as_yolov8(tiny_data, tmp_path, monkeypatch):
    clips = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(k) or clip(*a, **k))
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    steps = []
    model.add_callback("on_train_epoch_end", lambda t: steps.append((t.batch_size, t.accumulate, t.args.nbs)))
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", batch=8, **{**TINY, "epochs": 1})
    assert steps == [(8, min(round(64 / 8), 3), 64)]  # capped at the run's 3 batches by Ultralytics itself
    assert clips and all(k["max_norm"] == 10.0 for k in clips)  # Ultralytics' clipping, kept under its recipe


def test_ultralytics_loss_is_the_mmdet_loss_times_batch_with_calibrated_gains():
    preds = _inputs()
    for epoch, phase in ((0, "atss"), (4, "tal")):
        losses = {}
        for recipe in ("mmdet", "ultralytics"):
            fn = TOODLoss(_Model(recipe=recipe))
            fn.epoch = epoch
            losses[recipe] = fn(preds, BATCH)
        gain = recipes.ULTRALYTICS_GAIN[phase]
        torch.testing.assert_close(losses["ultralytics"][0], losses["mmdet"][0] * 2 * gain)  # batch of 2 images
        for k in ("loss_cls", "loss_bbox"):
            torch.testing.assert_close(losses["ultralytics"][1][k], losses["mmdet"][1][k] * gain)
    model = _Model(recipe="ultralytics")
    model.args = {"cls": 1.0, "box": 7.5}  # Ultralytics' cls= doubled, box= at its default
    fn = TOODLoss(model)
    fn.epoch = 4
    base = TOODLoss(_Model(recipe="ultralytics"))
    base.epoch = 4
    torch.testing.assert_close(fn(preds, BATCH)[1]["loss_cls"], 2 * base(preds, BATCH)[1]["loss_cls"])
    torch.testing.assert_close(fn(preds, BATCH)[1]["loss_bbox"], base(preds, BATCH)[1]["loss_bbox"])


def test_warmup_longer_than_the_run_is_cut_so_that_it_ends_in_tal(tiny_data, tmp_path, monkeypatch):
    warnings, phases = [], []
    monkeypatch.setattr("tood_yolo.engine.trainer.LOGGER.warning", lambda msg, *a, **k: warnings.append(msg))
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    model.add_callback("on_train_epoch_end", lambda t: phases.append(t.model.criterion.warmup))
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", batch=8, initial_epoch=5,
                **{**TINY, "epochs": 2})
    assert phases == [True, False]
    assert any("initial_epoch=5" in w and "cut to 1" in w for w in warnings), warnings
    with pytest.raises(ValueError, match="initial_epoch=-1"):
        recipes.Recipe.of({"initial_epoch": -1, "epochs": 3}, {"recipe": "ultralytics"})


@pytest.mark.parametrize(
    ("budget_s", "phases", "message"),
    [
        # 35 s at 10 s an epoch: Ultralytics estimates 4 epochs after the first and stops after the 4th
        (35, [True, True, True, False], "time=0.00972 h is now estimated at 4 epochs: ATSS warm-up for 3 epoch(s)"),
        # 5 s: Ultralytics stops after the first epoch, before it could be planned; the run says so
        (5, [True], "the run stopped in epoch 1, inside the ATSS warm-up"),
    ],
)
def test_time_budget_replans_the_warmup_so_that_the_run_ends_in_tal(budget_s, phases, message, tiny_data, tmp_path,
                                                                   monkeypatch):
    """Under time=, Ultralytics' trainer re-estimates the run's epochs from its clock after each epoch; here that clock
    advances 10 s per epoch, so the run's length does not depend on the machine."""
    epochs_done, seen, logs = [0], [], []
    monkeypatch.setattr("ultralytics.engine.trainer.time", SimpleNamespace(time=lambda: 10.0 * epochs_done[0]))
    monkeypatch.setattr("tood_yolo.engine.trainer.LOGGER.info", lambda msg, *a, **k: logs.append(msg))
    monkeypatch.setattr("tood_yolo.engine.trainer.LOGGER.warning", lambda msg, *a, **k: logs.append(msg))

    def end_epoch(trainer):
        seen.append(trainer.model.criterion.warmup)
        epochs_done[0] += 1

    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    model.add_callback("on_train_epoch_end", end_epoch)
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", batch=8, initial_epoch=4,
                **{**TINY, "epochs": 100, "time": round(budget_s / 3600, 5)})
    assert seen == phases
    assert any(message in m for m in logs), logs


def test_replanned_warmup_only_moves_while_no_tal_epoch_has_trained():
    warmup = recipes.Recipe.of({"epochs": 3}, {"recipe": "ultralytics"}).warmup  # 4 asked, cut to 2 in a 3-epoch plan
    assert (warmup.epochs, warmup.asked) == (2, 4)
    assert warmup.replanned(epochs=50, epoch=2).epochs == 4  # epochs 0-1 trained ATSS, none TAL yet: lengthened
    assert warmup.replanned(epochs=2, epoch=0).epochs == 1
    assert warmup.replanned(epochs=1, epoch=1).epochs == 1  # never shorter than what has already trained
    tal_trained = recipes.ATSSWarmup(1, 4)
    assert tal_trained.replanned(epochs=50, epoch=3) == tal_trained  # epochs 1-2 trained TAL: no way back to ATSS


def test_detect_head_outputs_decode_as_ultralytics_does_at_inference():
    """The 2x2's "Detect + TOOD loss": TOODLoss decodes Detect's DFL distributions and logits like Detect itself."""
    model = TOODDetectionModel(str(ROOT / "cfg/ablation-detect-n.yaml"), nc=3, verbose=False).eval()
    model.args = {"recipe": "ultralytics"}
    x = torch.rand(1, 3, 128, 128)
    head = model.model[-1]
    with torch.no_grad():
        y = model(x)[0]  # (1, 4 + nc, A): xywh pixels, probabilities
        head.training = True
        train_out = model(x)
        head.training = False
    loss = TOODLoss(model)
    boxes, scores = loss.decode(loss.parse_output(train_out))
    strides = make_anchors(train_out["feats"], head.stride, 0.5)[1]
    xywh = torch.cat(((boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]), -1) * strides
    torch.testing.assert_close(xywh, y[:, :4].transpose(1, 2), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(scores, y[:, 4:].transpose(1, 2))


def test_thead_outputs_round_trip_through_v8_distances_and_logits():
    """The 2x2's "T-head + v8 loss": the T-head's boxes and scores become v8's ltrb distances and logits losslessly."""
    model = _Model(recipe="ultralytics")
    model.args = type("Args", (), {"box": 7.5, "cls": 0.5, "dfl": 1.5})()
    head = model.model[-1]
    head.reg_max = 1
    loss = THeadV8Loss.__new__(THeadV8Loss)
    loss.stride = head.stride
    preds = _inputs()
    out = THeadV8Loss.parse_output(loss, preds)
    points = make_anchors(preds["feats"], head.stride, 0.5)[0]
    torch.testing.assert_close(
        dist2bbox(out["boxes"].transpose(1, 2), points, xywh=False), preds["boxes"].transpose(1, 2)
    )
    torch.testing.assert_close(out["scores"].sigmoid(), preds["scores"])


def test_mmdet_warms_up_from_a_thousandth_in_one_group_with_decay_and_no_clipping(tiny_data, tmp_path, monkeypatch):
    """mmdet's `LinearLR(start_factor=0.001)` over the warm-up for every parameter (the first step trains at 1e-5),
    the reference's plain SGD with one group of every parameter at weight decay 1e-4 (as the log says), and no
    gradient clipping (Ultralytics clips at 10; the reference's 1x config does not)."""
    clips, logs, steps = [], [], []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1) or clip(*a, **k))
    monkeypatch.setattr("tood_yolo.engine.trainer.LOGGER.info", lambda msg, *a, **k: logs.append(msg))
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))

    def record(trainer):
        g = trainer.optimizer.param_groups
        steps.append(([x["lr"] for x in g], len(g[0]["params"]), len(list(trainer.model.parameters())),
                      {(x["weight_decay"], x["momentum"], x["nesterov"]) for x in g}))

    model.add_callback("on_train_batch_end", record)
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", batch=8, recipe="mmdet",
                **{**TINY, "epochs": 2, "warmup_epochs": 3.0})  # the default: the recipe's 500 iterations, cut to 3
    assert len(steps) == 6 and not clips
    for i, (lrs, in_group, n_params, settings) in enumerate(steps[:3]):  # epoch 0: warm-up over 3 iterations
        assert lrs == [pytest.approx(0.01 * (0.001 + 0.999 * i / 3), rel=1e-9)]
        assert in_group == n_params and settings == {(1e-4, 0.9, False)}
    assert any("1 parameter group" in m and "weight_decay=0.0001 on every one" in m for m in logs), logs

