"""Checkpoints saved by earlier versions of tood-yolo load, predict the same boxes, and validate."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from ultralytics import YOLO

V01 = Path(__file__).resolve().parent / "data" / "v0.1"  # tests/data/v0.1/make_checkpoint.py made these


def test_v01_checkpoint_predicts_the_boxes_it_predicted_then():
    expected = np.load(V01 / "tood-tiny-boxes.npz")
    r = YOLO(str(V01 / "tood-tiny.pt"))(str(V01 / "image.jpg"), imgsz=128, conf=0.001, max_det=20, verbose=False)[0]
    order = np.lexsort(np.c_[r.boxes.xyxy.numpy(), r.boxes.cls.numpy()].T)
    order_then = np.lexsort(np.c_[expected["xyxy"], expected["cls"]].T)
    np.testing.assert_allclose(r.boxes.xyxy.numpy()[order], expected["xyxy"][order_then], atol=1e-3)
    np.testing.assert_allclose(r.boxes.conf.numpy()[order], expected["conf"][order_then], atol=1e-5)
    np.testing.assert_array_equal(r.boxes.cls.numpy()[order], expected["cls"][order_then])


def test_validating_a_deformable_checkpoint_on_cpu_does_not_crash(tmp_path, offline_env):
    """Ultralytics counts a loaded model's FLOPs on an uninitialised tensor; torchvision's CPU deformable conv read
    out of bounds at its non-finite offsets and killed the process (tood-tiny has a deformable inter conv)."""
    code = (
        "from tood_yolo.data.synthetic import make_synthetic_dataset; from ultralytics import YOLO; "
        f"d = make_synthetic_dataset({str(tmp_path / 'syn')!r}, n_train=4, n_val=4, imgsz=128); "
        f"YOLO({str(tmp_path / 'tood-tiny.pt')!r}).val(data=str(d), imgsz=128, batch=4, workers=0, plots=False); "
        "print('validated')"
    )
    shutil.copy(V01 / "tood-tiny.pt", tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env, timeout=300)
    assert r.returncode == 0 and "validated" in r.stdout, f"exit {r.returncode}: {r.stderr[-2000:]}"
