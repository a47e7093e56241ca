"""Ultralytics' entry points that start new processes, with tood-yolo installed, for TOOD models and Ultralytics' own:
the tuner and MultiTrainer (children `python -m ultralytics.cfg.__init__ train ...` that receive every argument, TOOD's
`recipe=None initial_epoch=None` included), the DDP launcher's script, and any interpreter that reads Ultralytics'
default configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import YAML

ROOT = Path(__file__).resolve().parents[1]


def test_a_new_interpreter_knows_tood_arguments_before_anything_imports_tood(offline_env, tmp_path):
    code = ("import sys; from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT; "
            "print(DEFAULT_CFG_DICT['recipe'], DEFAULT_CFG.initial_epoch, 'tood_yolo' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], env=offline_env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["None", "None", "False"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "loss_key", "recipe"),
    [("yolo11n.yaml", "val/box_loss", None), (str(ROOT / "cfg/yolo11n-tood.yaml"), "val/loss_bbox", "ultralytics")],
)
def test_tune_trains_its_trial_in_a_child_process(model, loss_key, recipe, offline_env, shared_data, tmp_path,
                                                  monkeypatch):
    """One tuner iteration: MultiTrainer saves the model and trains it in `python -m ultralytics.cfg.__init__`, which
    checks every argument of the parent's run (TOOD's among them) before it builds the model."""
    for k, v in offline_env.items():
        monkeypatch.setenv(k, v)  # the children run offline, with the network guard, and log any attempt
    coco8 = shared_data("coco8")
    YOLO(model).tune(data=str(coco8 / "data.yaml"), epochs=1, iterations=1, imgsz=64, batch=4, workers=0,
                     device="cpu", plots=False, project=str(tmp_path), name="tune")
    records = [json.loads(line) for line in (tmp_path / "tune" / "tune_results.ndjson").read_text().splitlines()]
    assert len(records) == 1
    assert loss_key in (records[0]["datasets"]["coco8"] or {}), records  # only a trial that trained has losses
    args = YAML.load(Path(records[0]["save_dirs"]["coco8"]) / "args.yaml")
    assert args["recipe"] == recipe  # TOOD's trainer picks a recipe; Ultralytics' carries TOOD's keys untouched
    log = Path(offline_env["TOOD_NETGUARD_LOG"])
    assert not log.exists(), log.read_text()


def test_ddp_script_of_an_ultralytics_model_carries_tood_arguments(shared_data, ddp_worker_prints, tmp_path):
    """The DDP launcher's script rebuilds Ultralytics' own trainer from every argument of the run, TOOD's included (the
    TOOD trainer's case: tests/test_train.py). Only `trainer.train()` is left out: it needs several GPUs."""
    coco8 = shared_data("coco8")
    trainer = DetectionTrainer(overrides={"model": "yolo11n.yaml", "data": str(coco8 / "data.yaml"), "batch": 4,
                                          "project": str(tmp_path), "device": "cpu", "lr0": 0.02})
    assert {"recipe", "initial_epoch"} <= set(vars(trainer.args))
    trainer.model = trainer.get_model(cfg="yolo11n.yaml", verbose=False)
    printed = ddp_worker_prints(
        trainer, "type(trainer).__name__, type(trainer.model.model[-1]).__name__, trainer.args.lr0, trainer.args.recipe"
    )
    assert printed[-4:] == ["DetectionTrainer", "Detect", "0.02", "None"]
