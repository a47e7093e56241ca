"""Test-time augmentation (`augment=True`) of TOOD models: Ultralytics' three passes, merged as for its own heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS
from ultralytics.utils.torch_utils import scale_img

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cfg", "shape"), [("yolo11n-tood.yaml", (256, 320)), ("tood-n.yaml", (256, 384))])
def test_tta_merges_three_passes_mapped_back_to_the_input(cfg, shape):
    """Full size, 0.83 flipped left-right and 0.67 (Ultralytics' passes, padded to the largest stride): each pass's xywh
    boxes are divided by its scale and the flipped pass's x mirrored; the full-size pass drops its coarsest level and
    the 0.67 pass its finest, as `DetectionModel` does for `Detect`."""
    model = YOLO(str(ROOT / "cfg" / cfg)).model.eval()
    strides = [int(s) for s in model.stride]
    h, w = shape
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        got, _ = model(x, augment=True)
        passes = []
        for scale, flip in ((1, False), (0.83, True), (0.67, False)):
            xi = scale_img(x.flip(3) if flip else x, scale, gs=max(strides))
            y = model(xi)[0].clone()
            y[:, :4] /= scale
            if flip:
                y[:, 0] = w - y[:, 0]
            levels = [(xi.shape[2] // s) * (xi.shape[3] // s) for s in strides]
            assert y.shape[-1] == sum(levels)
            passes.append((y, levels))
    (full, full_levels), (flipped, _), (small, small_levels) = passes
    expected = torch.cat((full[..., : -full_levels[-1]], flipped, small[..., small_levels[0] :]), -1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_tta_predict_runs_all_passes_without_falling_back(monkeypatch):
    warnings = []
    monkeypatch.setattr("ultralytics.nn.tasks.LOGGER.warning", lambda msg, *a, **k: warnings.append(msg))
    model = YOLO(str(ROOT / "cfg/yolo11n-tood.yaml"))
    r = model.predict(str(ASSETS / "bus.jpg"), imgsz=256, augment=True, conf=0.0, max_det=50, verbose=False)[0]
    assert not [m for m in warnings if "augment" in m], warnings  # Ultralytics' single-pass fallback warns
    assert len(r.boxes) == 50
