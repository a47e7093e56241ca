"""Export formats beyond ONNX (tests/test_integration.py): NCNN, and ONNX files run by OpenCV DNN (`dnn=True`).

Each runs Ultralytics' own exporter and its own backend for the format (`AutoBackend`, as `yolo predict/val` do).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import ASSETS

from tood_yolo.nn.ops import every

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Ultralytics exports a model built from a YAML into the current folder."""
    monkeypatch.chdir(tmp_path)


def spread_model(cfg: str, tmp_path: Path) -> YOLO:
    """A TOOD model whose head outputs vary: at initialisation the scores are all ~0.01 and the offsets of O a
    fraction of a pixel, so that comparing them would compare little. Weights scaled to their fan-in give class and M
    logits of std ~1 around 0 (scores over (0, 1)), offsets of about a pixel, which move many boxes and leave some
    reversed (x1 > x2, where the unsampled box is kept), and box distances of about exp(+-0.5) strides. Seeded: the
    predictor's detections below depend on the weights."""
    shutil.copy(ROOT / "cfg" / cfg, tmp_path / cfg)
    torch.manual_seed(0)
    model = YOLO(str(tmp_path / cfg))
    head = model.model.model[-1]
    for convs, gain in ((head.tood_cls, 2), (head.cls_prob_module, 2), (head.tood_reg, 1), (head.reg_offset_module, 2)):
        for conv in every(convs):  # one per level for per-level trunks
            conv = conv[-1] if isinstance(conv, torch.nn.Sequential) else conv  # M's and O's (and a "dw" P's) last conv
            torch.nn.init.normal_(conv.weight, 0, gain / conv.weight[0].numel() ** 0.5)
            torch.nn.init.zeros_(conv.bias)
    return model


def assert_same_outputs(got: torch.Tensor, expected: torch.Tensor, box_atol: float, score_atol: float) -> None:
    """(1, 4 + nc, A) outputs: boxes (pixels) and scores each within their absolute tolerance."""
    assert got.shape == expected.shape
    torch.testing.assert_close(got[:, :4], expected[:, :4], atol=box_atol, rtol=0)
    torch.testing.assert_close(got[:, 4:], expected[:, 4:], atol=score_atol, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolo11n-tood.yaml", "tood-n.yaml"])
def test_ncnn_export_gives_pytorch_outputs(cfg, tmp_path):
    """pnnx converts the traced model (the anchor grid a constant, box alignment without comparisons or a B*C batch)
    and NCNN runs it: boxes within 5e-3 pixels and scores within 1e-5 of PyTorch at 128x128 (measured over 10 inputs
    for yolo11n-tood: at most 1.7e-3 px, on boxes of up to ~370 px, and 2e-6)."""
    pytest.importorskip("ncnn", reason="NCNN export and inference need the 'ncnn' package (pip install ncnn)")
    pytest.importorskip("pnnx", reason="NCNN export needs the 'pnnx' package (pip install pnnx==20260526)")
    model = spread_model(cfg, tmp_path)
    f = model.export(format="ncnn", imgsz=128)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected = model.model.eval()(x)[0]
    assert_same_outputs(AutoBackend(f, device=CPU)(x), expected, box_atol=5e-3, score_atol=1e-5)


@pytest.mark.slow
# conf: >= 8e-4 from every score of these seeded models on bus.jpg (4 detections 0.7549-0.7404, next 0.7356; 3
# detections 0.7640-0.7621, next 0.7602), and the kept anchors' two best classes differ by >= 1.4e-3: both 18x more
# than the backends' scores ever differ, so that the same detections are a fair demand
@pytest.mark.parametrize(("cfg", "conf", "n"), [("yolo11n-tood.yaml", 0.738, 4), ("tood-n.yaml", 0.761, 3)])
def test_opencv_dnn_runs_tood_onnx_as_onnxruntime_does(cfg, conf, n, tmp_path):
    """`dnn=True` reads the ONNX file with OpenCV's DNN module: the outputs of ONNX Runtime, boxes within 5e-3 pixels
    and scores within 1e-4 at 256x256 (measured over 5 inputs: at most 2.6e-3 px and 4.4e-5; ONNX Runtime itself
    differs from PyTorch by up to 2.6e-3 px), and the same detections through Ultralytics' predictor."""
    pytest.importorskip("onnxruntime", reason="the reference backend needs 'onnxruntime' (the export extra)")
    model = spread_model(cfg, tmp_path)
    f = model.export(format="onnx", imgsz=256)
    x = torch.rand(1, 3, 256, 256)
    expected = AutoBackend(f, device=CPU)(x)
    assert_same_outputs(AutoBackend(f, device=CPU, dnn=True)(x), expected, box_atol=5e-3, score_atol=1e-4)

    kwargs = {"source": str(ASSETS / "bus.jpg"), "imgsz": 256, "conf": conf, "verbose": False}
    ort = YOLO(f).predict(**kwargs)[0].boxes
    dnn = YOLO(f).predict(dnn=True, **kwargs)[0].boxes
    assert len(ort) == n
    np.testing.assert_array_equal(dnn.cls.numpy(), ort.cls.numpy())
    np.testing.assert_allclose(dnn.xyxy.numpy(), ort.xyxy.numpy(), atol=1e-2)
    np.testing.assert_allclose(dnn.conf.numpy(), ort.conf.numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx-dnn", "ncnn"])
def test_batchnorm_dfl_head_exports_to_opencv_dnn_and_ncnn(fmt, tmp_path):
    """The YOLO-regime head (per-level BatchNorm trunks, DFL distributions sampled by O) in the two runtimes with the
    fewest operators: OpenCV DNN gives ONNX Runtime's outputs, NCNN PyTorch's, within the tolerances above."""
    model = spread_model("yolo11n-tood-bn.yaml", tmp_path)
    x = torch.rand(1, 3, 128, 128)
    if fmt == "ncnn":
        pytest.importorskip("ncnn", reason="NCNN export and inference need the 'ncnn' package (pip install ncnn)")
        pytest.importorskip("pnnx", reason="NCNN export needs the 'pnnx' package (pip install pnnx==20260526)")
        f = model.export(format="ncnn", imgsz=128)
        with torch.no_grad():
            expected = model.model.eval()(x)[0]
        assert_same_outputs(AutoBackend(f, device=CPU)(x), expected, box_atol=5e-3, score_atol=1e-5)
    else:
        pytest.importorskip("onnxruntime", reason="the reference backend needs 'onnxruntime' (the export extra)")
        f = model.export(format="onnx", imgsz=128)
        expected = AutoBackend(f, device=CPU)(x)
        assert_same_outputs(AutoBackend(f, device=CPU, dnn=True)(x), expected, box_atol=5e-3, score_atol=1e-4)


@pytest.mark.slow
def test_tflite_export_of_the_product_model_gives_pytorch_outputs(tmp_path):
    """`format=tflite` (Ultralytics 8.4.190's LiteRT exporter: litert-torch converts the torch.export graph) of
    yolo11n-tood-bn, run by the LiteRT interpreter (ai-edge-litert, through AutoBackend): PyTorch's outputs within
    NCNN's tolerances, 5e-3 pixels and 1e-5 (measured over 3 inputs: 1.9e-6 px and 6e-8)."""
    for package in ("litert_torch", "ai_edge_litert"):
        pytest.importorskip(package, reason=f"{package} is not installed (the 'tflite' extra of pyproject.toml)")
    model = spread_model("yolo11n-tood-bn.yaml", tmp_path)
    f = model.export(format="tflite", imgsz=128)
    assert Path(f).suffix == ".tflite"
    backend = AutoBackend(f, device=CPU)
    for _ in range(2):
        x = torch.rand(1, 3, 128, 128)
        with torch.no_grad():
            expected = model.model.eval()(x)[0]
        got = backend(x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert_same_outputs(got, expected, box_atol=5e-3, score_atol=1e-5)


@pytest.mark.slow
def test_coreml_export_of_the_product_model_has_the_pytorch_interface(tmp_path):
    """`format=coreml` of yolo11n-tood-bn: CoreML runs only on macOS, so what Linux can check is the converted spec.
    An ML program whose one input is the 128x128 RGB image and whose one output has PyTorch's (1, 4 + nc, anchors)
    shape, with Ultralytics' metadata naming the T-head, as yolo11n's export has with `Detect`."""
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed (the 'coreml' extra of pyproject)")
    model = spread_model("yolo11n-tood-bn.yaml", tmp_path)
    f = str(model.export(format="coreml", imgsz=128))
    assert f.endswith(".mlpackage"), f
    spec = ct.utils.load_spec(f)
    assert spec.WhichOneof("Type") == "mlProgram"
    (image,) = spec.description.input
    assert image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (128, 128)
    (output,) = spec.description.output
    with torch.no_grad():
        expected = model.model.eval()(torch.rand(1, 3, 128, 128))[0]
    assert list(output.type.multiArrayType.shape) == list(expected.shape)
    assert spec.description.metadata.userDefined["head"] == "TOODHead"
