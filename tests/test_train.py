"""Training TOOD through the Ultralytics trainer: recipe defaults, warm-up switch and resume, CLI parity, bad data."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

from tood_yolo.data.synthetic import make_synthetic_dataset
from tood_yolo.utils.recipe import RECIPES
from tood_yolo.engine.trainer import TOODTrainer

ROOT = Path(__file__).resolve().parents[1]
# the mmdet recipe (no mosaic): loss curves of a few tiny epochs that can be compared
TINY = {"epochs": 3, "imgsz": 128, "batch": 8, "device": "cpu", "workers": 0, "amp": False, "plots": False,
        "seed": 0, "deterministic": True, "exist_ok": True, "val": False, "recipe": "mmdet"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "syn", n_train=24, n_val=8, imgsz=128)


def tood_yaml(tmp_path: Path, initial_epoch: int) -> Path:
    cfg = tmp_path / "tood-n-test.yaml"
    cfg.write_text((ROOT / "cfg/tood-n.yaml").read_text() + f"\ninitial_epoch: {initial_epoch}\n")
    return cfg


def read_losses(run: Path) -> list[tuple[float, float]]:
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return [(float(r["train/loss_cls"]), float(r["train/loss_bbox"])) for r in rows]


def test_recipe_defaults_and_user_overrides(tiny_data, tmp_path):
    trainer = TOODTrainer(overrides={"model": str(ROOT / "cfg/tood-r50.yaml"), "data": str(tiny_data), "lr0": 0.02,
                                     "batch": 4, "project": str(tmp_path), "device": "cpu"})
    a = trainer.args
    assert trainer.recipe.name == a.recipe == "mmdet"
    assert (a.optimizer, a.lr0, a.momentum, a.weight_decay, a.epochs) == ("SGD", 0.02, 0.9, 1e-4, 12)
    assert a.mosaic == 0 and a.fliplr == 0.5 and a.hsv_v == 0 and a.scale == 0
    assert trainer._get_warmup_iterations(1000) == 500 and trainer._get_warmup_iterations(20) == 11 * 20
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    trainer.optimizer = trainer.build_optimizer(model, "SGD", 0.01, 0.9, 1e-4)
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {1e-4}  # BN and biases decay too
    assert {g["nesterov"] for g in trainer.optimizer.param_groups} == {False}  # the reference's SGD
    trainer._setup_scheduler()
    assert [trainer.lf(e) for e in (0, 7, 8, 10, 11)] == [1, 1, 0.1 ** 1, 0.1 ** 1, 0.1 ** 2]
    assert set(RECIPES["mmdet"].overrides) <= set(vars(a))


def test_ddp_worker_rebuilds_the_same_tood_trainer(tiny_data, ddp_worker_prints, tmp_path):
    """Ultralytics' DDP launch pickles the trainer class, its args and callbacks; a worker rebuilds it from all args."""
    trainer = TOODTrainer(overrides={"model": str(ROOT / "cfg/tood-n.yaml"), "data": str(tiny_data), "batch": 4,
                                     "project": str(tmp_path), "device": "cpu", "lr0": 0.02, "recipe": "mmdet"})
    trainer.model = trainer.get_model(cfg=str(ROOT / "cfg/tood-n.yaml"), verbose=False)
    printed = ddp_worker_prints(
        trainer,
        "type(trainer).__name__, trainer.args.lr0, trainer.recipe.name, trainer._get_warmup_iterations(1000), "
        "sum(f.__name__ == 'set_loss_epoch' for f in trainer.callbacks['on_train_epoch_start']), "
        "type(trainer.model.model[-1]).__name__",
    )
    assert printed[-6:] == ["TOODTrainer", "0.02", "mmdet", "500", "1", "TOODHead"]


def test_short_training_lowers_both_losses(tiny_data, tmp_path):
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    model.train(data=str(tiny_data), project=str(tmp_path), name="run", **TINY)
    losses = read_losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r)).all() for r in losses)
    assert losses[-1][0] < losses[0][0] and losses[-1][1] < losses[0][1], losses
    assert type(model.trainer).__name__ == "TOODTrainer"


def test_warmup_ends_at_initial_epoch_also_after_resume(tiny_data, tmp_path):
    seen = []

    def record(trainer):
        crit = trainer.model.criterion
        seen.append((trainer.epoch, crit.epoch, crit.warmup))

    def stop_after_first_epoch(trainer):
        if trainer.epoch == 1:
            raise KeyboardInterrupt  # leaves last.pt of epoch 0 with its optimizer: resumable

    model = YOLO(str(tood_yaml(tmp_path, initial_epoch=1)))
    model.add_callback("on_train_batch_end", record)
    model.add_callback("on_train_epoch_start", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        model.train(data=str(tiny_data), project=str(tmp_path), name="run", **{**TINY, "epochs": 2})
    assert seen and all(s == (0, 0, True) for s in seen)

    seen.clear()
    resumed = YOLO(str(tmp_path / "run" / "weights" / "last.pt"))
    resumed.add_callback("on_train_batch_end", record)
    resumed.train(resume=True)
    assert seen and all(s == (1, 1, False) for s in seen), seen


def test_yolo_cli_and_train_py_give_the_same_loss_curve(tiny_data, tmp_path):
    # the same thread count for both: train.py would otherwise use every core and `yolo` one (Ultralytics' default)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "OMP_NUM_THREADS": "1"}
    args = [f"model={ROOT / 'cfg/tood-n.yaml'}", f"data={tiny_data}", f"project={tmp_path}", "epochs=2",
            *[f"{k}={v}" for k, v in TINY.items() if k != "epochs"]]
    for cmd, name in (([str(Path(sys.executable).parent / "yolo"), "train"], "cli"),
                      ([sys.executable, str(ROOT / "train.py")], "script")):
        p = subprocess.run([*cmd, *args, f"name={name}"], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    cli, script = read_losses(tmp_path / "cli"), read_losses(tmp_path / "script")
    assert len(cli) == 2 and cli == script


def test_bad_labels_and_images_are_skipped_with_a_warning_and_an_empty_set_is_an_error(tiny_data, tmp_path, caplog):
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.cfg import get_cfg

    root = tmp_path / "bad"
    shutil.copytree(tiny_data.parent, root)
    (root / "data.yaml").write_text(tiny_data.read_text().replace(str(tiny_data.parent), str(root)))
    for f in (root / "labels").rglob("*.cache"):
        f.unlink()
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    images = sorted((root / "images" / "train").glob("*.jpg"))
    labels[0].write_text("17 0.5 0.5 0.2 0.2\n")  # class outside the 5 names
    labels[1].write_text("0 1.4 0.5 0.2 0.2\n")  # centre outside the image
    labels[2].write_text("")  # an image without objects: kept as background
    images[3].write_bytes(b"not a jpeg")  # corrupt image
    data = check_det_dataset(str(root / "data.yaml"))
    cfg = get_cfg(overrides={"imgsz": 128})
    with caplog.at_level("WARNING"):
        try:
            ds = build_yolo_dataset(cfg, str(root / "images" / "train"), 4, data, mode="train")
        except AssertionError as e:  # Ultralytics raises for a class beyond nc
            assert "17" in str(e) and "exceeds" in str(e)
            labels[0].write_text("0 0.5 0.5 0.2 0.2\n")
            for f in (root / "labels").rglob("*.cache"):
                f.unlink()
            ds = build_yolo_dataset(cfg, str(root / "images" / "train"), 4, data, mode="train")
    files = {Path(f).name for f in ds.im_files}
    assert images[3].name not in files and labels[1].stem + ".jpg" not in files  # skipped ...
    assert images[2].name in files  # ... the empty label is a background image
    (root / "images" / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        build_yolo_dataset(cfg, str(root / "images" / "empty"), 4, data, mode="train")
