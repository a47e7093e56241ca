"""Tests of the model zoo (cfg/*.yaml): build, forward, ONNX export, and the parts specific to each reference variant
(anchor-based decoding, DCNv2 placement and initialisation, mmdet checkpoint layout, ImageNet weights by name)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection._utils import BoxCoder

from tood_yolo.nn.backbone import ResNet
from tood_yolo.tools.convert import mmdet_key_map
from tood_yolo.nn.head import TOODHead
from tood_yolo.nn.ops import ModulatedDeformConv, delta2bbox

from test_convert import mmdet_tood_keys

ROOT = Path(__file__).resolve().parents[1]
# YOLO twins: test_yolo_neck
CFGS = sorted(p.stem for p in (ROOT / "cfg").glob("*.yaml") if not p.stem.startswith("yolo"))
RESNET_CFGS = [c for c in CFGS if c.startswith(("tood-r", "tood-x"))]
DCN_CFGS = [c for c in CFGS if c.endswith("-dcn")]
IMGSZ = 128
ANCHORS_128 = sum(math.ceil(IMGSZ / s) ** 2 for s in (8, 16, 32, 64, 128))  # 256 + 64 + 16 + 4 + 1

# What each ResNet config is, per the reference configs (mmdet configs/tood/*.py): depth, groups, base width,
# backbone DCN stages (stage_with_dcn), head DCN convs (num_dcn), anchor type
REFERENCE = {
    "tood-r50": (50, 1, 4, (), 0, "anchor_free"),  # tood_r50_fpn_1x_coco
    "tood-r50-anchor": (50, 1, 4, (), 0, "anchor_based"),  # tood_r50-fpn-anchor-based_1x_coco
    "tood-r101": (101, 1, 4, (), 0, "anchor_free"),  # tood_r101_fpn_ms-2x_coco
    "tood-r101-dcn": (101, 1, 4, (2, 3, 4), 2, "anchor_free"),  # tood_r101-dconv-c3-c5_fpn_ms-2x_coco
    "tood-x101": (101, 64, 4, (), 0, "anchor_free"),  # tood_x101-64x4d_fpn_ms-2x_coco
    "tood-x101-dcn": (101, 64, 4, (3, 4), 2, "anchor_free"),  # tood_x101-64x4d-dconv-c4-c5_fpn_ms-2x_coco
}

def _params(cfgs):
    return [pytest.param(c, id=c) for c in cfgs]


@pytest.fixture(scope="module")
def zoo_model(request):
    """`ultralytics.YOLO` of one cfg, built once per module (pytest groups the tests by config)."""
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO(str(ROOT / "cfg" / f"{request.param}.yaml"))
    yolo.model.eval()
    yield yolo
    del yolo


def _head(yolo) -> TOODHead:
    return yolo.model.model[-1]


# --------------------------------------------------------------------------------------------------------------------
# Every config
# --------------------------------------------------------------------------------------------------------------------
def test_zoo_lists_every_config():
    assert set(CFGS) >= {"tood-n", "tood-s", "tood-m", *REFERENCE}


@pytest.mark.parametrize("zoo_model", _params(CFGS), indirect=True)
def test_forward(zoo_model):
    """Every config (the TOOD ones and any other, e.g. an ablation twin with Ultralytics' Detect) builds and runs."""
    model = zoo_model.model
    assert zoo_model.task == "detect"
    assert model.stride.tolist() == [8, 16, 32, 64, 128]
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        y = model(x)[0]
    assert y.shape == (2, 84, ANCHORS_128) and torch.isfinite(y).all()
    assert ((y[:, 4:] >= 0) & (y[:, 4:] <= 1)).all() and (y[:, 2:4] >= 0).all()  # scores, box w/h
    if not isinstance(_head(zoo_model), TOODHead):
        return
    model.train()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.eval()
    assert out["boxes"].shape == (2, 4, ANCHORS_128) and out["scores"].shape == (2, 80, ANCHORS_128)


@pytest.mark.parametrize("zoo_model", _params(CFGS), indirect=True)
def test_onnx_export(zoo_model, tmp_path, monkeypatch):
    """Ultralytics' exporter (what users run) gives an ONNX model (opset >= 16) that onnxruntime runs to the same
    output as PyTorch."""
    import onnx
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)  # the exporter writes a YAML-built model's file into the working directory

    name = Path(zoo_model.model.yaml["yaml_file"]).stem
    # onnxslim (simplify=True, the default) is exercised on the light and R-50 models; the graphs are the
    # same blocks repeated, so they skip it to keep the suite fast
    f = zoo_model.export(format="onnx", imgsz=IMGSZ, opset=18, simplify=not name.startswith(("tood-r101", "tood-x101")))
    assert Path(f).resolve().parent == tmp_path.resolve()
    proto = onnx.load(f)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 16
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    (y_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        y = zoo_model.model(x)[0].numpy()
    assert y_onnx.shape == (1, 84, ANCHORS_128)
    np.testing.assert_allclose(y_onnx, y, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("zoo_model", _params(RESNET_CFGS), indirect=True)
def test_matches_reference_architecture(zoo_model):
    """The config's state dict maps one to one onto the mmdet checkpoint layout of its reference config (names and
    shapes written from mmdet's sources in test_convert): this pins depth, ResNeXt width, DCN placement and the head."""
    name = Path(zoo_model.model.yaml["yaml_file"]).stem
    depth, groups, width, dcn_stages, num_dcn, anchor_type = REFERENCE[name]
    ref = dict(mmdet_tood_keys(depth, groups, width, dcn_stages, num_dcn))
    mapping = mmdet_key_map(zoo_model.model)
    assert set(mapping.values()) == set(ref)
    ours = zoo_model.model.state_dict()
    bad = [(k, tuple(ours[k].shape), ref[m]) for k, m in mapping.items() if tuple(ours[k].shape) != ref[m]]
    assert not bad
    head = _head(zoo_model)
    assert (head.anchor_type, head.num_dcn, head.stacked_convs, head.feat_channels) == (anchor_type, num_dcn, 6, 256)


# --------------------------------------------------------------------------------------------------------------------
# Small models: the n/s/m ladder
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zoo_model", _params(["tood-n", "tood-s", "tood-m"]), indirect=True)
def test_edge_ladder(zoo_model):
    name = Path(zoo_model.model.yaml["yaml_file"]).stem
    head = _head(zoo_model)
    width = {"tood-n": 64, "tood-s": 128, "tood-m": 192}[name]
    assert head.feat_channels == width and width % 32 == 0
    assert all(m.out_channels == width for m in zoo_model.model.model[-2].fpn_convs)
    d = zoo_model.model.yaml
    assert (d["depth_multiple"], d["width_multiple"]) == {
        "tood-n": (0.33, 0.25), "tood-s": (0.33, 0.5), "tood-m": (0.67, 0.75)}[name]


# --------------------------------------------------------------------------------------------------------------------
# Box decoding
# --------------------------------------------------------------------------------------------------------------------
def test_delta2bbox_matches_torchvision_box_coder():
    """The head's delta decoder = torchvision's BoxCoder with weights (10, 10, 5, 5) (stds 0.1/0.2, same dw/dh clamp
    log(1000/16)), including clamped large deltas."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 500
    anchors = torch.cat((xy, xy + 1 + torch.rand(500, 2, generator=g) * 200), 1)
    deltas = torch.randn(500, 4, generator=g) * 3
    deltas[:10, 2:] = 60.0  # beyond the clamp
    expected = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas, anchors)
    torch.testing.assert_close(delta2bbox(anchors, deltas), expected, rtol=1e-5, atol=1e-3)


def _level_outputs(yolo, level=1, size=8, seed=0):
    """Run the head on one random level with non-unit scales; returns (its output dict, tood_reg's raw output)."""
    head = _head(yolo)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, yolo.model.model[-2].fpn_convs[0].out_channels, size, size, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    points = torch.stack((xs, ys), -1).view(-1, 2).float()
    captured = {}
    handle = head.tood_reg.register_forward_hook(lambda m, i, o: captured.setdefault("reg", o))
    old = head.scales[level].scale.detach().clone()
    try:
        with torch.no_grad():
            head.scales[level].scale.fill_(1.3)
            out = head.forward_level(x, level, points)
    finally:
        with torch.no_grad():
            head.scales[level].scale.copy_(old)
        handle.remove()
    return out, captured["reg"], points


@pytest.mark.parametrize("zoo_model", ["tood-r50-anchor"], indirect=True)
def test_anchor_based_decoding(zoo_model):
    """Anchor-based boxes = BoxCoder(10, 10, 5, 5) decoding of Scale(reg) against one 8*stride square anchor centred on
    each location (offset 0), in stride units; the layout of mmdet's anchor_type='anchor_based'."""
    stride = 16
    out, reg, points = _level_outputs(zoo_model, level=1)
    deltas = (reg * 1.3).permute(0, 2, 3, 1).reshape(-1, 4)
    c = points * stride
    anchors = torch.cat((c - 4 * stride, c + 4 * stride), 1)
    assert torch.equal(anchors[:, 2:] - anchors[:, :2], torch.full((64, 2), 128.0))
    expected = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas, anchors) / stride
    torch.testing.assert_close(out["box_raw"].permute(0, 2, 3, 1).reshape(-1, 4), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("zoo_model", ["tood-r50"], indirect=True)
def test_anchor_free_decoding(zoo_model):
    """Anchor-free boxes = point -/+ Scale(exp(reg)) (ltrb distances in stride units, no ReLU)."""
    out, reg, points = _level_outputs(zoo_model, level=1)
    dist = (reg.exp() * 1.3).permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cat((points - dist[:, :2], points + dist[:, 2:]), 1)
    torch.testing.assert_close(out["box_raw"].permute(0, 2, 3, 1).reshape(-1, 4), expected)


# --------------------------------------------------------------------------------------------------------------------
# DCN variants
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zoo_model", _params(DCN_CFGS), indirect=True)
def test_dcn_placement_and_zero_init(zoo_model):
    """DCNv2 where the reference has it: every block's 3x3 conv of its DCN stages (stride-2 blocks too, 1 deform
    group, the block's conv groups), the head's first two inter convs (4 deform groups); offsets and masks start at 0,
    so each DCN computes mask * conv = sigmoid(0) * conv = 0.5 * conv(x) of the same weight, without bias."""
    name = Path(zoo_model.model.yaml["yaml_file"]).stem
    depth, groups, _, dcn_stages, num_dcn, _ = REFERENCE[name]
    backbone, head = zoo_model.model.model[0], _head(zoo_model)
    g = torch.Generator().manual_seed(0)
    for s in range(1, 5):
        for blk in getattr(backbone, f"layer{s}"):
            assert isinstance(blk.conv2, ModulatedDeformConv) == (s in dcn_stages)
    checked = []
    for s in dcn_stages:
        layer = getattr(backbone, f"layer{s}")
        for blk in (layer[0], layer[-1]):  # the stride-2 block and a stride-1 block
            checked.append((blk.conv2, 1, groups))
    for i, conv in enumerate(head.inter_convs):
        assert isinstance(conv.conv, ModulatedDeformConv) == (i < num_dcn)
        if i < num_dcn:
            checked.append((conv.conv, 4, 1))
    for m, deform_groups, conv_groups in checked:
        assert m.conv_offset.out_channels == deform_groups * 3 * 9 and m.conv.groups == conv_groups
        assert m.conv.bias is None
        assert not m.conv_offset.weight.any() and not m.conv_offset.bias.any()
        x = torch.randn(1, m.conv.in_channels, 12, 12, generator=g)
        with torch.no_grad():
            y = m(x)
            expected = 0.5 * F.conv2d(x, m.conv.weight, None, m.conv.stride, m.conv.padding, 1, m.conv.groups)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# ImageNet weights in torchvision's layout load by name
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """Random state dicts in torchvision's layout (names from torchvision.models built on the meta device), saved."""
    folder, files = tmp_path_factory.mktemp("imagenet"), {}
    g = torch.Generator().manual_seed(0)

    def get(arch: str) -> tuple[Path, dict]:
        if arch not in files:
            with torch.device("meta"):
                names = getattr(torchvision.models, arch)().state_dict()
            sd = {
                k: torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(7, dtype=v.dtype)
                for k, v in names.items()
            }
            files[arch] = (folder / f"{arch}.pth", sd)
            torch.save(sd, files[arch][0])
        return files[arch]

    return get


@pytest.mark.parametrize("name", _params(RESNET_CFGS))
def test_imagenet_weights_load_by_name(name, torchvision_weights):
    """The config's backbone with `weights` = a torchvision-layout checkpoint of its architecture equals it tensor by
    tensor (the classifier dropped; DCN stages keep torchvision's conv2 weight, their offset convs stay zero)."""
    from ultralytics.nn.tasks import yaml_model_load

    args = list(yaml_model_load(ROOT / "cfg" / f"{name}.yaml")["backbone"][0][3])
    depth, groups, width = args[0], args[1], args[2]
    arch = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width}d"
    file, tv = torchvision_weights(arch)
    args[5] = str(file)
    backbone = ResNet(*args)
    ours = backbone.state_dict()
    dcn = {n for n, m in backbone.named_modules() if isinstance(m, ModulatedDeformConv)}
    used = set()
    for k, v in tv.items():
        if k.startswith("fc."):
            continue
        parent, _, leaf = k.rpartition(".")
        key = f"{parent}.conv.{leaf}" if parent in dcn else k
        assert torch.equal(ours[key], v), key
        used.add(key)
    assert {k for k in ours if k not in used} == {k for k in ours if ".conv_offset." in k}


# --------------------------------------------------------------------------------------------------------------------
# benchmarks/model_table.py
# --------------------------------------------------------------------------------------------------------------------
def test_model_table_measures_a_config():
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "benchmarks" / "model_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    row = table.measure(ROOT / "cfg" / "tood-n.yaml", imgsz=64)
    assert row["params"] > 1e6 and 0 < row["head_share"] < 1 and row["gflops"] > 0
    assert "| tood-n |" in table.markdown([row])
