"""TOOD through the plain Ultralytics engine: start-up hook, `yolo` CLI, checkpoints, ONNX export, bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict, cwd: Path) -> str:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    log = Path(env["TOOD_NETGUARD_LOG"])
    assert not log.exists(), f"network attempted: {log.read_text()}"
    return p.stdout + p.stderr


def test_startup_hook_is_installed_without_importing_torch(offline_env, tmp_path):
    code = "import sys; print('torch' in sys.modules, any(type(f).__name__ == 'TOODFinder' for f in sys.meta_path))"
    assert run([sys.executable, "-c", code], offline_env, tmp_path).split() == ["False", "True"]


@pytest.mark.parametrize(
    "first",
    [
        "import ultralytics",
        "from ultralytics.engine.model import Model",
        "from ultralytics.data.utils import check_det_dataset",
        "import ultralytics.nn.tasks",
        "import tood_yolo",
    ],
)
def test_registration_works_whatever_is_imported_first(first, offline_env, tmp_path):
    code = (
        f"{first}\nimport sys\nfrom ultralytics import YOLO\nm = YOLO(sys.argv[1])\n"
        "print(m.task, type(m.model.model[-1]).__name__, m.task_map['detect']['trainer'].__name__, "
        "type(m.model.init_criterion()).__name__)"
    )
    out = run([sys.executable, "-c", code, str(ROOT / "cfg/tood-n.yaml")], offline_env, tmp_path)
    assert out.split()[-4:] == ["detect", "TOODHead", "TOODTrainer", "TOODLoss"]


def test_plain_ultralytics_builds_tood_in_a_new_interpreter(offline_env, tmp_path):
    code = (
        "import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]); h = m.model.model[-1]; "
        "print(m.task, type(h).__module__, type(h).__name__, [int(s) for s in h.stride])"
    )
    out = run([sys.executable, "-c", code, str(ROOT / "cfg/tood-n.yaml")], offline_env, tmp_path)
    assert "detect tood_yolo.nn.head TOODHead [8, 16, 32, 64, 128]" in out


def test_yolo_cli_predict_val_export_and_onnx_predict(offline_env, tmp_path, shared_data):
    coco8 = shared_data("coco8")
    image = str(ASSETS / "bus.jpg")
    out = run([str(BIN / "yolo"), "predict", f"model={ROOT / 'cfg/tood-r50.yaml'}", f"source={image}",
               f"project={tmp_path}", "name=r50", "imgsz=384"], offline_env, tmp_path)
    assert (tmp_path / "r50" / "bus.jpg").exists(), out

    # a checkpoint saved from Python, then val/export/predict from new shells
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    ckpt = tmp_path / "tood-n.pt"
    model.save(ckpt)
    out = run([str(BIN / "yolo"), "val", f"model={ckpt}", f"data={coco8 / 'data.yaml'}", "imgsz=256", "batch=4",
               f"project={tmp_path}", "name=val", "plots=False"], offline_env, tmp_path)
    assert re.search(r"all\s+4\s+17\s", out), out  # 4 images, 17 boxes in coco8 val
    out = run([str(BIN / "yolo"), "export", f"model={ckpt}", "format=onnx", "imgsz=256", "dynamic=True"],
              offline_env, tmp_path)
    onnx = ckpt.with_suffix(".onnx")
    assert onnx.exists(), out
    run([str(BIN / "yolo"), "predict", f"model={onnx}", f"source={image}", "imgsz=256", f"project={tmp_path}",
         "name=onnx"], offline_env, tmp_path)
    assert (tmp_path / "onnx" / "bus.jpg").exists()


@pytest.mark.parametrize("cfg", ["tood-n.yaml", "tood-r50.yaml"])
def test_onnx_outputs_match_pytorch_with_dynamic_batch_and_size(cfg, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)  # the exporter writes a YAML-built model's file into the working directory
    model = YOLO(str(ROOT / "cfg" / cfg))
    f = model.export(format="onnx", imgsz=256, dynamic=True, simplify=True)
    assert Path(f).resolve().parent == tmp_path.resolve()
    session = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    torch_model = model.model.eval()
    for shape in [(1, 3, 256, 256), (2, 3, 384, 256)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = torch_model(x)[0].numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip_keeps_outputs(tmp_path):
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    model.save(tmp_path / "m.pt")
    loaded = YOLO(str(tmp_path / "m.pt"))
    assert type(loaded.model.model[-1]).__name__ == "TOODHead" and loaded.task == "detect"
    expected = model.model.half().float().eval()  # Ultralytics saves checkpoints in fp16
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.float().eval()(x)[0], expected(x)[0])


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda y: y.replace("TOODHead", "TOODHed"), "unknown module 'TOODHed'"),
        (lambda y: y.replace("[nc, 64, 6, 0, anchor_free, 0.0]", "[nc, 64, 6, 0, anchor_free, 0.0, 1, 2]"), "layer 11"),
        (lambda y: y.replace("[64, 5]", "[64, 2]"), "num_outs=2"),
        (lambda y: y.replace("anchor_free", "anchorfree"), "anchor_type"),
    ],
)
def test_wrong_model_yaml_gives_a_clear_error(edit, match, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(edit((ROOT / "cfg/tood-n.yaml").read_text()))
    with pytest.raises(ValueError, match=match):
        YOLO(str(bad))


def test_missing_backbone_weights_file_is_an_error(tmp_path):
    from tood_yolo.nn.backbone import ResNet

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNet(18, weights=str(tmp_path / "nope.pth"))


def test_predict_py_takes_yolo_arguments(offline_env, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ASSETS / "bus.jpg", images / "bus.jpg")
    out = run([sys.executable, str(ROOT / "predict.py"), f"model={ROOT / 'cfg/tood-n.yaml'}", f"source={images}",
               "imgsz=128", f"project={tmp_path}", "name=pred"], offline_env, tmp_path)
    assert (tmp_path / "pred" / "bus.jpg").exists()
    assert f"predict.py: model {ROOT / 'cfg/tood-n.yaml'}" in out and "done: 1 frame(s) in" in out


def test_unreadable_image_is_reported(offline_env, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = run([str(BIN / "yolo"), "predict", f"model={ROOT / 'cfg/tood-n.yaml'}", f"source={bad}",
               f"project={tmp_path}", "imgsz=128"], offline_env, tmp_path)
    assert "Image Read Error" in out and "broken.jpg" in out
