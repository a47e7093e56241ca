"""Offline means offline, and every bad input says what is wrong: one test per case a new user meets.

The network cases run under the guard of tests/netguard (`no_network` in this process, `offline_env` for the `yolo`
command and the scripts) and assert that no DNS lookup or connect was attempted, not only that the command failed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from ultralytics import YOLO

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOD_N = str(ROOT / "cfg" / "tood-n.yaml")
IMGSZ = 128  # TOOD's largest stride: the smallest image size
FAST = {"imgsz": IMGSZ, "batch": 4, "device": "cpu", "workers": 0, "plots": False, "verbose": False}


def run(cmd: list[str], env: dict, cwd: Path, ok: bool = True) -> str:
    """Run a command offline under the network guard; assert its exit status and that it tried no network access."""
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert (p.returncode == 0) == ok, f"{cmd} exit {p.returncode}:\n{out[-3000:]}"
    log = Path(env["TOOD_NETGUARD_LOG"])
    assert not log.exists(), f"network attempted: {log.read_text()}"
    return out


@contextlib.contextmanager
def ultralytics_log(level: int = logging.INFO):
    """Collect the messages of Ultralytics' logger (which YOLO_VERBOSE=false keeps at ERROR) in a list."""
    logged, handler, logger = [], logging.Handler(), logging.getLogger("ultralytics")
    handler.emit = lambda record: logged.append(record.getMessage())
    old = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield logged
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


@pytest.fixture
def train_script(monkeypatch):
    """train.py loaded as a module (its OMP_NUM_THREADS default is undone after the test)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco8(shared_data) -> Path:
    return shared_data("coco8") / "data.yaml"


@pytest.fixture
def interrupted_run(coco8, tmp_path) -> Path:
    """A tood-n run on coco8 stopped after its first of two epochs: its last.pt is resumable (into this run folder,
    which its arguments name: a resume continues there, whatever folder it is started from)."""

    class Stop(Exception):
        pass

    def stop(trainer):
        raise Stop

    project = tmp_path / "runs"
    model = YOLO(TOOD_N)
    model.add_callback("on_fit_epoch_end", stop)
    with pytest.raises(Stop):  # conf: the final validation of the resumed runs need not sort an untrained model's boxes
        model.train(data=str(coco8), epochs=2, val=False, conf=0.9, project=str(project), name="run", **FAST)
    return project / "run"


# --- offline: weights, datasets and resume never reach for the network --------------------------------------------
def test_missing_weights_fail_at_once_in_yolo_predict(offline_env, tmp_path):
    out = run([BIN / "yolo", "predict", "model=missing.pt", "source=x.jpg"], offline_env, tmp_path, ok=False)
    assert "weights file missing.pt not found" in out and "GitHub" not in out


def test_missing_weights_fail_at_once_in_yolo_train_train_py_and_analysis(no_network, train_script, coco8):
    from ultralytics.cfg import entrypoint

    from tood_yolo.tools import analysis

    for run_it in (lambda: entrypoint(f"yolo train model=missing.pt data={coco8}"),
                   lambda: train_script.main(["model=missing.pt", f"data={coco8}"]),
                   lambda: analysis.main(["model=missing.pt", f"data={coco8}"])):
        with pytest.raises(FileNotFoundError, match="weights file missing.pt not found"):
            run_it()
    assert no_network == []


def test_builtin_dataset_name_is_not_downloaded(no_network, tmp_path, monkeypatch):
    from ultralytics.data import utils as data_utils

    monkeypatch.chdir(tmp_path)  # no coco8/ here, and none in Ultralytics' datasets folder
    monkeypatch.setattr(data_utils, "DATASETS_DIR", tmp_path / "datasets")
    msg = r"dataset coco8.yaml not found locally \(offline: nothing is downloaded\); pass data="
    with pytest.raises(RuntimeError, match=msg):
        YOLO(TOOD_N).train(data="coco8.yaml", epochs=1, project=str(tmp_path), **FAST)
    with pytest.raises(FileNotFoundError, match=msg):
        YOLO(TOOD_N).val(data="coco8.yaml", project=str(tmp_path), **FAST)
    assert no_network == [] and not (tmp_path / "datasets").exists()


def test_yolo_train_resume_path_resumes_that_run(interrupted_run, offline_env, tmp_path):
    last = interrupted_run / "weights" / "last.pt"
    out = run([BIN / "yolo", "train", f"resume={last}"], offline_env, tmp_path)
    assert f"Resuming training {last} from epoch 2 to 2 total epochs" in out
    assert "yolo26n" not in out  # Ultralytics' default model was neither built nor looked up
    assert len((interrupted_run / "results.csv").read_text().splitlines()) == 3  # header, epoch 1, resumed epoch 2


def test_train_py_resume_true_with_a_yaml_model(interrupted_run, offline_env, tmp_path, coco8, train_script):
    args = [sys.executable, ROOT / "train.py", "resume=True", f"model={TOOD_N}", f"data={coco8}",
            f"project={interrupted_run.parent}"]
    out = run([*args, f"name={interrupted_run.name}"], offline_env, tmp_path)
    assert f"Resuming training {interrupted_run / 'weights' / 'last.pt'} from epoch 2" in out
    assert "model 'None'" not in out and "Starting new training" not in out
    with pytest.raises(FileNotFoundError, match=f"no last.pt in {re.escape(str(interrupted_run.parent / 'gone'))}"):
        train_script.main(args[2:] + ["name=gone"])


# --- messages ------------------------------------------------------------------------------------------------------
def bad_rows_set(coco8: Path, tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    """A copy of coco8 whose first two training images are unreadable and whose labels 3 and 4 have bad rows."""
    root = shutil.copytree(coco8.parent, tmp_path / "set")
    images, labels = sorted((root / "images" / "train").glob("*.jpg")), sorted((root / "labels" / "train").glob("*"))
    images[0].write_bytes(b"")  # zero bytes
    images[1].write_text("not an image")
    labels[2].write_text("45 0.5 0.5 0.2 0.2\n45 0.5 0.5 0.2\n")  # line 2: four numbers
    labels[3].write_text("45 nan 0.5 0.2 0.2\n")
    return root, images, labels


def test_unreadable_images_and_bad_label_rows_are_named(coco8, tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.utils import check_det_dataset

    from tood_yolo.data.dataset import build_tood_dataset

    root, images, labels = bad_rows_set(coco8, tmp_path)
    with pytest.raises(RuntimeError, match="No valid images found") as e:
        build_tood_dataset(get_cfg(overrides={"imgsz": IMGSZ}), str(root / "images" / "train"), 4,
                           check_det_dataset(str(root / "data.yaml")), mode="train")
    msg = str(e.value)
    assert f"cannot identify image file '{images[0]}'" in msg and f"cannot identify image file '{images[1]}'" in msg
    assert f"{labels[2]} line 2: 4 values, expected 5 columns" in msg
    assert f"{labels[3]} line 1: value 'nan' is not a finite number" in msg
    assert "pi_heif" not in msg and "inhomogeneous" not in msg


def test_ultralytics_datasets_are_left_as_they_are(coco8, tmp_path):
    """Ultralytics' own `build_yolo_dataset` (any model TOOD does not own) builds its `YOLODataset` with its own
    messages, the package imported."""
    import tood_yolo  # noqa: F401  (registered)
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.dataset import YOLODataset, verify_image_label
    from ultralytics.data.utils import check_det_dataset

    from tood_yolo.data.dataset import TOODDataset

    assert verify_image_label.__module__ == "ultralytics.data.utils"
    assert YOLODataset.get_label_files.__module__ == "ultralytics.data.dataset"
    root, _, labels = bad_rows_set(coco8, tmp_path)
    with pytest.raises(RuntimeError, match="No valid images found") as e:
        build_yolo_dataset(get_cfg(overrides={"imgsz": IMGSZ}), str(root / "images" / "train"), 4,
                           check_det_dataset(str(root / "data.yaml")), mode="train")
    assert "inhomogeneous" in str(e.value) and f"{labels[2]} line 2" not in str(e.value)  # Ultralytics' own reason
    for f in (root / "labels").glob("*.cache"):
        f.unlink()
    data = check_det_dataset(str(root / "data.yaml"))
    assert type(build_yolo_dataset(get_cfg(overrides={"imgsz": IMGSZ}), str(root / "images" / "val"), 4, data,
                                   mode="val")) is YOLODataset is not TOODDataset


@pytest.mark.parametrize("mode, overrides", [("train", {}), ("val", {"rect": True, "fraction": 0.5,
                                                                     "single_cls": True})])
def test_tood_dataset_is_built_as_ultralytics_builds_its_own(coco8, mode, overrides):
    """`build_tood_dataset` gives the dataset `build_yolo_dataset` gives, attribute for attribute, in TOOD's class."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from tood_yolo.data.dataset import TOODDataset, build_tood_dataset

    cfg, data = get_cfg(overrides={"imgsz": IMGSZ, **overrides}), check_det_dataset(str(coco8))
    split = str(Path(data[mode]))
    ours, theirs = (build(cfg, split, 4, data, mode=mode, stride=64) for build in (build_tood_dataset,
                                                                                   build_yolo_dataset))
    assert type(ours) is TOODDataset and type(theirs).__name__ == "YOLODataset"
    keys = ("imgsz", "augment", "rect", "pad", "stride", "single_cls", "prefix", "im_files", "batch_shapes", "ni")

    def settings(ds) -> dict:
        values = {k: getattr(ds, k, None) for k in keys}
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in values.items()}

    def augmentations(ds) -> str:
        return re.sub(" at 0x[0-9a-f]+", "", repr(ds.transforms))  # object addresses aside

    assert settings(ours) == settings(theirs)
    assert [lb["cls"].tolist() for lb in ours.labels] == [lb["cls"].tolist() for lb in theirs.labels]
    assert augmentations(ours) == augmentations(theirs)


def test_tood_trainer_and_validator_build_tood_datasets(coco8, tmp_path):
    from tood_yolo.data.dataset import TOODDataset
    from tood_yolo.engine.trainer import TOODTrainer
    from tood_yolo.nn.model import TOODDetectionModel

    trainer = TOODTrainer(overrides={"model": TOOD_N, "data": str(coco8), "project": str(tmp_path), **FAST})
    trainer.model = TOODDetectionModel(TOOD_N, verbose=False)
    assert type(trainer.build_dataset(trainer.data["train"], mode="train", batch=4)) is TOODDataset
    validator = trainer.get_validator.__func__(SimpleNamespace(test_loader=None, save_dir=tmp_path, args=trainer.args,
                                                               callbacks=trainer.callbacks))
    validator.data, validator.stride = trainer.data, 32
    assert type(validator.build_dataset(trainer.data["val"])) is TOODDataset


def test_label_rows_that_ultralytics_reads_pass_the_row_check(tmp_path):
    from tood_yolo.data.dataset import label_row_error

    rows = {"box": "0 0.5 0.5 0.2 0.2", "polygon": "0 0.1 0.1 0.9 0.1 0.5 0.9", "pose": "0 " + "0.5 " * 55}
    for name, row in rows.items():
        (tmp_path / f"{name}.txt").write_text(f"{row}\n\n{row}\n")
    assert label_row_error(str(tmp_path / "box.txt"), keypoint=False) is None
    assert label_row_error(str(tmp_path / "polygon.txt"), keypoint=False) is None
    assert label_row_error(str(tmp_path / "pose.txt"), keypoint=False, kpt_values=17 * 3) is None  # a box task
    assert "56 values, expected 5 columns" in label_row_error(str(tmp_path / "pose.txt"), keypoint=False)


def test_missing_labels_folder(coco8, tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.utils import check_det_dataset

    from tood_yolo.data.dataset import build_tood_dataset

    root = shutil.copytree(coco8.parent, tmp_path / "set", ignore=shutil.ignore_patterns("labels"))
    data, cfg = check_det_dataset(str(root / "data.yaml")), get_cfg(overrides={"imgsz": IMGSZ})
    with pytest.raises(FileNotFoundError, match=f"no labels folder at {re.escape(str(root / 'labels' / 'train'))}"):
        build_tood_dataset(cfg, str(root / "images" / "train"), 4, data, mode="train")
    with ultralytics_log(logging.WARNING) as logged:  # an unlabelled validation set only warns, as in Ultralytics
        build_tood_dataset(cfg, str(root / "images" / "val"), 4, data, mode="val")
    assert any(f"no labels folder at {root / 'labels' / 'val'}" in m for m in logged), logged


def test_val_warns_when_model_and_dataset_class_names_differ(coco8, tmp_path):
    cfg = tmp_path / "tood-n-3.yaml"
    cfg.write_text(Path(TOOD_N).read_text().replace("nc: 80", "nc: 3"))
    model = YOLO(str(cfg))
    model.model.names = {0: "RBC", 1: "WBC", 2: "Platelets"}
    with ultralytics_log(logging.WARNING) as logged:
        model.val(data=str(coco8), conf=0.9, project=str(tmp_path), **FAST)
    warning = next((m for m in logged if "class names differ" in m), "")
    assert "['RBC', 'WBC', 'Platelets']" in warning and "['person', 'bicycle'" in warning, logged


def test_convert_names_a_bad_file_and_finds_its_default_cfg_anywhere(tmp_path, monkeypatch, capsys):
    import torch

    from tood_yolo.tools.convert import main

    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not a PyTorch checkpoint"):
        main([str(bad), str(tmp_path / "out.pt")])
    with pytest.raises(SystemExit):
        main([str(bad), str(tmp_path / "out.pt"), "--cfg", "nope.yaml"])
    assert "model YAML nope.yaml not found: pass --cfg" in capsys.readouterr().err
    # outside the checkout the default cfg/tood-r50.yaml is still found: the checkpoint is what does not match it
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small.pth"
    torch.save({"state_dict": {"bbox_head.tood_cls.weight": torch.zeros(80, 256, 3, 3)}}, small)
    with pytest.raises(ValueError, match="does not match the model YAML"):
        main([str(small), str(tmp_path / "out.pt")])


def test_evaluate_names_a_truncated_annotation_file(tmp_path):
    from tood_yolo.tools.evaluate import main

    ann = tmp_path / "instances_val.json"
    ann.write_text('{"images": [{"id": 1, "file_na')
    with pytest.raises(ValueError, match=f"{re.escape(str(ann))} is not valid JSON"):
        main(["model=missing.pt", f"images={tmp_path}", f"annotations={ann}"])  # fails before loading the model


def test_maps_says_a_missing_source_is_not_found(tmp_path):
    from tood_yolo.tools.maps import main

    with pytest.raises(FileNotFoundError, match=f"source={re.escape(str(tmp_path / 'nope.jpg'))} not found"):
        main([f"model={TOOD_N}", f"source={tmp_path / 'nope.jpg'}"])


def test_plain_predict_reads_a_video_past_its_damaged_frame(tmp_path):
    video = tmp_path / "damaged.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 128))
    rng = np.random.default_rng(0)
    for _ in range(10):
        writer.write(rng.integers(0, 255, (128, 160, 3), dtype=np.uint8))
    writer.release()
    data = bytearray(video.read_bytes())
    soi = [m.start() for m in re.finditer(b"\xff\xd8\xff", bytes(data))]  # one JPEG per frame
    data[soi[5] : soi[5] + 600] = bytes(600)  # frame 6 can no longer be decoded
    video.write_bytes(data)
    with ultralytics_log(logging.WARNING) as logged:
        results = list(YOLO(TOOD_N).predict(source=str(video), imgsz=IMGSZ, conf=0.9, stream=True, verbose=False))
    assert len(results) == 9  # Ultralytics alone ends the video at the damaged frame: 5
    assert any("Video Frame Read Error" in m and "frame 6 of 10" in m for m in logged), logged
