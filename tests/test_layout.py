"""The package's surface on Ultralytics: a non-TOOD model in the same process is Ultralytics' own in every part, TOOD's
validation NMS leaves Ultralytics' NMS alone, and the flat layout's module names still resolve for old pickles."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import torch
from ultralytics import YOLO
from ultralytics.data import dataset
from ultralytics.data.dataset import YOLODataset
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.nn import tasks
from ultralytics.utils import nms
from ultralytics.utils.loss import v8DetectionLoss

from tood_yolo import TOOD, TOODDetectionModel
from tood_yolo.data.dataset import TOODDataset
from tood_yolo.data.synthetic import make_synthetic_dataset
from tood_yolo.utils.loss import TOODLoss
from tood_yolo.engine.trainer import TOODTrainer
from tood_yolo.engine.validator import TOODDetectionValidator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "v0.1" / "tood-tiny.yaml"
# Ultralytics' own functions, as its modules define them (a wrapper or a partial would not be defined there)
OWN = {"parse_model": (tasks, "ultralytics.nn.tasks"), "guess_model_task": (tasks, "ultralytics.nn.tasks"),
       "non_max_suppression": (nms, "ultralytics.utils.nms"),
       "verify_image_label": (dataset, "ultralytics.data.utils"),
       "get_label_files": (YOLODataset, "ultralytics.data.dataset")}


def _is_ultralytics_own(module, name: str, defined_in: str) -> bool:
    fn = getattr(module, name)
    return getattr(fn, "__module__", None) == defined_in and not hasattr(fn, "__wrapped__")


def test_a_yolo_model_trained_beside_a_tood_model_is_ultralytics_own(tmp_path):
    data = make_synthetic_dataset(tmp_path / "syn", n_train=8, n_val=4, imgsz=128)
    seen = {}

    def record(name):
        def on_train_end(trainer):
            model = trainer.model
            seen[name] = (type(trainer), type(trainer.validator), type(model), type(model.criterion),
                          type(trainer.train_loader.dataset), type(trainer.validator.dataloader.dataset))

        return on_train_end

    args = {"data": str(data), "epochs": 1, "imgsz": 128, "batch": 4, "device": "cpu", "workers": 0, "plots": False,
            "project": str(tmp_path), "exist_ok": True, "verbose": False}
    tood = YOLO(str(TINY))
    tood.add_callback("on_train_end", record("tood"))
    tood.train(**args, name="tood")
    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_train_end", record("yolo"))
    yolo.train(**args, name="yolo")

    assert type(tood) is TOOD and type(yolo) is YOLO
    assert seen["tood"] == (TOODTrainer, TOODDetectionValidator, TOODDetectionModel, TOODLoss, TOODDataset, TOODDataset)
    assert seen["yolo"] == (DetectionTrainer, DetectionValidator, tasks.DetectionModel, v8DetectionLoss, YOLODataset,
                            YOLODataset)
    assert tasks.DetectionModel.init_criterion.__qualname__ == "DetectionModel.init_criterion"
    for name, (module, defined_in) in OWN.items():
        assert _is_ultralytics_own(module, name, defined_in), f"{defined_in}.{name} is replaced"
    assert "TOODHead" not in vars(tasks)  # Ultralytics' parser resolves YAML names here: it knows no TOOD module


def test_tood_validation_nms_passes_no_time_limit_and_leaves_ultralytics_nms_alone(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append((nms.non_max_suppression is spy, kwargs))
        return [torch.zeros(0, 6)]

    monkeypatch.setattr(nms, "non_max_suppression", spy)
    validator = TOODDetectionValidator(args={"task": "detect", "conf": 0.001, "iou": 0.7, "max_det": 300})
    validator.nc, validator.end2end = 3, False
    validator.postprocess(torch.zeros(1, 7, 10))
    (unswapped, kwargs), = calls
    assert unswapped and kwargs["max_time_img"] == math.inf  # an argument of this call, not a module-wide swap


def test_flat_layout_module_names_resolve_for_old_pickles():
    from tood_yolo.nn import backbone, head, neck

    for old, new in (("head", head), ("neck", neck), ("backbone", backbone)):
        for name in ("TOODHead", "TaskDecomposition", "ConvGNReLU", "ModulatedDeformConv", "Scale", "FPN", "ResNet"):
            if hasattr(new, name):
                # pickle's own lookup: import the module by its old dotted name, then the attribute
                assert pickle.Unpickler(io.BytesIO()).find_class(f"tood_yolo.{old}", name) is getattr(new, name)


def test_tood_model_class_builds_an_ultralytics_yaml_exactly_as_detection_model():
    """`TOODDetectionModel` repeats `DetectionModel`'s set-up around its own parser: on a YAML both can build, the two
    must agree in every attribute, buffer and initial weight (this fails when Ultralytics adds a set-up step)."""
    torch.manual_seed(0)
    ours = TOODDetectionModel("yolov8n.yaml", nc=3, verbose=False)
    torch.manual_seed(0)
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    assert set(vars(ours)) == set(vars(theirs))
    assert (ours.yaml, ours.names, ours.save, ours.inplace) == (theirs.yaml, theirs.names, theirs.save, theirs.inplace)
    assert torch.equal(ours.stride, theirs.stride) and torch.equal(ours.model[-1].stride, theirs.model[-1].stride)
    assert repr(ours.model) == repr(theirs.model)  # module settings too: BatchNorm eps/momentum, inplace activations
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
