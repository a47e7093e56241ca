"""Tests of tood_yolo.tools.convert (mmdet TOOD checkpoints -> Ultralytics) and tood_yolo.tools.evaluate (the
reference's COCO protocol).

The mmdet checkpoints are synthetic: key names and shapes written here from mmdetection 3.3.0's sources (ResNet /
ResNeXt backbones, FPN, TOODHead with mmcv ConvModule / ModulatedDeformConv2dPack), values random. Every tensor is
checked by value against an independent functional re-implementation of the reference forward (F.conv2d,
F.batch_norm, F.group_norm, torchvision's deform_conv2d standing in for mmcv's), not against our modules.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from tood_yolo.tools.convert import (
    load_mmdet_checkpoint,
    main,
    mmdet_key_map,
    read_mmdet_checkpoint,
    ultralytics_checkpoint,
)
from tood_yolo.data.reference import padded_shape, reference_resize_shape
from tood_yolo.tools.evaluate import evaluate, postprocess, preprocess
from tood_yolo.utils.coco import COCO_STATS

from test_safe_load import save_mmdet3  # tests/ is on sys.path (pytest's rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
# mmdet's data pre-processor, in 0-255 RGB (an independent copy of the constants our ResNet applies in [0, 1])
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
STRIDES = (8, 16, 32, 64, 128)
NC = 80
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# --------------------------------------------------------------------------------------------------------------------
# The reference checkpoint layout, written from mmdet's sources
# --------------------------------------------------------------------------------------------------------------------
def _bn(prefix: str, c: int) -> list[tuple[str, tuple]]:
    """mmdet `build_norm_layer(dict(type='BN'))` state: nn.BatchNorm2d's five entries."""
    return [(f"{prefix}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())
    ]


def mmdet_resnet_keys(depth: int = 50, groups: int = 1, base_width: int = 4, dcn_stages=()) -> list[tuple[str, tuple]]:
    """mmdet ResNet / ResNeXt (style='pytorch', deep_stem=False, avg_down=False) state-dict keys and shapes.

    Bottleneck planes 64/128/256/512, expansion 4; ResNeXt width = floor(planes * base_width / 64) * groups. A DCN
    stage builds conv2 as mmcv's ModulatedDeformConv2dPack (no bias, conv_offset with 3 * 9 * deform_groups(1) outputs).
    """
    keys = [("backbone.conv1.weight", (64, 3, 7, 7)), *_bn("backbone.bn1", 64)]
    inplanes = 64
    for s, n in enumerate(BLOCKS[depth], 1):
        planes = 64 * 2 ** (s - 1)
        width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
        for b in range(n):
            p = f"backbone.layer{s}.{b}"
            keys += [(f"{p}.conv1.weight", (width, inplanes, 1, 1)), *_bn(f"{p}.bn1", width)]
            keys += [(f"{p}.conv2.weight", (width, width // groups, 3, 3))]
            if s in dcn_stages:
                keys += [(f"{p}.conv2.conv_offset.weight", (27, width, 3, 3)), (f"{p}.conv2.conv_offset.bias", (27,))]
            keys += _bn(f"{p}.bn2", width)
            keys += [(f"{p}.conv3.weight", (planes * 4, width, 1, 1)), *_bn(f"{p}.bn3", planes * 4)]
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1))]
                keys += _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return keys


def mmdet_fpn_keys(in_channels=(512, 1024, 2048), out: int = 256, num_outs: int = 5) -> list[tuple[str, tuple]]:
    """mmdet FPN(start_level=1, add_extra_convs='on_output'): ConvModule(conv only) laterals, outputs, extra convs."""
    keys = []
    for i, c in enumerate(in_channels):
        keys += [(f"neck.lateral_convs.{i}.conv.weight", (out, c, 1, 1)), (f"neck.lateral_convs.{i}.conv.bias", (out,))]
    for i in range(num_outs):
        keys += [(f"neck.fpn_convs.{i}.conv.weight", (out, out, 3, 3)), (f"neck.fpn_convs.{i}.conv.bias", (out,))]
    return keys


def mmdet_head_keys(nc: int = NC, c: int = 256, stacked: int = 6, num_dcn: int = 0, levels: int = 5) -> list[tuple]:
    """mmdet TOODHead: ConvModule(conv, gn) inter convs (DCNv2 with 4 deform groups for the first num_dcn),
    TaskDecomposition (layer_attention Sequential, reduction_conv ConvModule(conv, gn) without bias), predictors,
    M and O, one Scale per level."""
    keys = []
    for i in range(stacked):
        keys += [(f"bbox_head.inter_convs.{i}.conv.weight", (c, c, 3, 3))]
        if i < num_dcn:
            keys += [
                (f"bbox_head.inter_convs.{i}.conv.conv_offset.weight", (4 * 27, c, 3, 3)),
                (f"bbox_head.inter_convs.{i}.conv.conv_offset.bias", (4 * 27,)),
            ]
        keys += [(f"bbox_head.inter_convs.{i}.gn.weight", (c,)), (f"bbox_head.inter_convs.{i}.gn.bias", (c,))]
    cc, la = c * stacked, c * stacked // (stacked * 8)
    for t in ("cls", "reg"):
        p = f"bbox_head.{t}_decomp"
        keys += [
            (f"{p}.layer_attention.0.weight", (la, cc, 1, 1)),
            (f"{p}.layer_attention.0.bias", (la,)),
            (f"{p}.layer_attention.2.weight", (stacked, la, 1, 1)),
            (f"{p}.layer_attention.2.bias", (stacked,)),
            (f"{p}.reduction_conv.conv.weight", (c, cc, 1, 1)),
            (f"{p}.reduction_conv.gn.weight", (c,)),
            (f"{p}.reduction_conv.gn.bias", (c,)),
        ]
    keys += [
        ("bbox_head.tood_cls.weight", (nc, c, 3, 3)),
        ("bbox_head.tood_cls.bias", (nc,)),
        ("bbox_head.tood_reg.weight", (4, c, 3, 3)),
        ("bbox_head.tood_reg.bias", (4,)),
        ("bbox_head.cls_prob_module.0.weight", (c // 4, cc, 1, 1)),
        ("bbox_head.cls_prob_module.0.bias", (c // 4,)),
        ("bbox_head.cls_prob_module.2.weight", (1, c // 4, 3, 3)),
        ("bbox_head.cls_prob_module.2.bias", (1,)),
        ("bbox_head.reg_offset_module.0.weight", (c // 4, cc, 1, 1)),
        ("bbox_head.reg_offset_module.0.bias", (c // 4,)),
        ("bbox_head.reg_offset_module.2.weight", (8, c // 4, 3, 3)),
        ("bbox_head.reg_offset_module.2.bias", (8,)),
    ]
    return keys + [(f"bbox_head.scales.{i}.scale", ()) for i in range(levels)]


def mmdet_tood_keys(depth=50, groups=1, base_width=4, dcn_stages=(), num_dcn=0, nc=NC) -> list[tuple[str, tuple]]:
    """Every key of an mmdet TOOD checkpoint's state_dict with its shape (tood_r50_fpn_1x_coco by default)."""
    backbone = mmdet_resnet_keys(depth, groups, base_width, dcn_stages)
    return backbone + mmdet_fpn_keys() + mmdet_head_keys(nc, num_dcn=num_dcn)


def random_mmdet_state(keys: list[tuple[str, tuple]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values with sane activations: fan-in scaled convs, BN/GN affine near 1/0, positive running variances,
    small residual-branch gains, class biases near -2, box offsets of about a cell (exercising the sampling, the
    borders and the invalid-box fallback), scales in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".scale"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            std = 1 / math.sqrt(fan_in)
            if "conv_offset" in k:
                std *= 0.3  # DCN offsets / masks of order 1
            elif "reg_offset_module.2" in k or "tood_reg" in k:
                std *= 0.3
            sd[k] = std * torch.randn(shape, generator=g)
        elif ".bn3." in k and k.endswith("weight") or ".downsample.1.weight" in k:
            sd[k] = 0.2 + 0.2 * torch.rand(shape, generator=g)  # keeps 23-block stages bounded
        elif k.endswith("weight"):  # BN / GN gains
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k == "bbox_head.tood_cls.bias" or k == "bbox_head.cls_prob_module.2.bias":
            sd[k] = -2 + 0.5 * torch.randn(shape, generator=g)
        elif k == "bbox_head.reg_offset_module.2.bias":
            sd[k] = 1.0 * torch.randn(shape, generator=g)
        elif k == "bbox_head.tood_reg.bias":
            sd[k] = 0.7 + 0.3 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


# --------------------------------------------------------------------------------------------------------------------
# An independent functional forward of the reference (mmdet semantics)
# --------------------------------------------------------------------------------------------------------------------
def _bn_f(x, sd, p):
    mean, var, w, b = (sd[f"{p}.{n}"] for n in ("running_mean", "running_var", "weight", "bias"))
    return F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5)


def _conv_f(x, sd, p, stride=1, padding=0, bias=True):
    """Plain conv, or mmcv ModulatedDeformConv2dPack when `p.conv_offset.*` exists (o1, o2, mask chunks)."""
    w = sd[f"{p}.weight"]
    b = sd.get(f"{p}.bias") if bias else None
    groups = x.shape[1] // w.shape[1]
    if f"{p}.conv_offset.weight" not in sd:
        return F.conv2d(x, w, b, stride, padding, 1, groups)
    o1, o2, mask = F.conv2d(x, sd[f"{p}.conv_offset.weight"], sd[f"{p}.conv_offset.bias"], stride, padding).chunk(3, 1)
    return deform_conv2d(x, torch.cat((o1, o2), 1), w, b, (stride, stride), (padding, padding), mask=mask.sigmoid())


def reference_backbone(sd, x, depth=50):
    """mmdet ResNet(style='pytorch', norm_eval) on RGB x in [0, 1]: returns the stem output and [C3, C4, C5]."""
    x = (x * 255 - x.new_tensor(MMDET_MEAN).view(1, 3, 1, 1)) / x.new_tensor(MMDET_STD).view(1, 3, 1, 1)
    stem = F.relu(_bn_f(F.conv2d(x, sd["backbone.conv1.weight"], None, 2, 3), sd, "backbone.bn1"))
    x = F.max_pool2d(stem, 3, 2, 1)
    outs = []
    for s, n in enumerate(BLOCKS[depth], 1):
        for b in range(n):
            p, stride = f"backbone.layer{s}.{b}", 2 if b == 0 and s > 1 else 1
            y = F.relu(_bn_f(_conv_f(x, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
            y = F.relu(_bn_f(_conv_f(y, sd, f"{p}.conv2", stride, 1, bias=False), sd, f"{p}.bn2"))
            y = _bn_f(_conv_f(y, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            idt = x
            if b == 0:
                idt = _bn_f(F.conv2d(x, sd[f"{p}.downsample.0.weight"], None, stride), sd, f"{p}.downsample.1")
            x = F.relu(y + idt)
        outs.append(x)
    return stem, outs[1:]


def reference_fpn(sd, feats):
    def conv(x, name, stride=1, padding=0):
        return F.conv2d(x, sd[f"neck.{name}.conv.weight"], sd[f"neck.{name}.conv.bias"], stride, padding)

    lat = [conv(f, f"lateral_convs.{i}") for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    outs = [conv(t, f"fpn_convs.{i}", 1, 1) for i, t in enumerate(lat)]
    for i in range(len(lat), 5):  # add_extra_convs='on_output', no ReLU before them
        outs.append(conv(outs[-1], f"fpn_convs.{i}", 2, 1))
    return outs


def mmdet_delta2bbox(anchors, deltas, stds=(0.1, 0.1, 0.2, 0.2), wh_ratio_clip=16 / 1000):
    """mmdet DeltaXYWHBBoxCoder.decode (means 0), anchors and boxes (N, 4) xyxy."""
    d = deltas * deltas.new_tensor(stds)
    clip = abs(math.log(wh_ratio_clip))
    px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gw, gh = pw * d[:, 2].clamp(-clip, clip).exp(), ph * d[:, 3].clamp(-clip, clip).exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    return torch.stack((gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5), -1)


def reference_head_level(sd, x, level, anchor_type="anchor_free", stacked=6):
    """mmdet 3.3.0 TOODHead.forward on one level: dict of class logits, M logits, scores, boxes (pixels, xyxy) etc."""
    b, _, h, w = x.shape
    stride = STRIDES[level]
    feats = []
    for i in range(stacked):
        x = _conv_f(x, sd, f"bbox_head.inter_convs.{i}.conv", 1, 1, bias=False)
        gn = f"bbox_head.inter_convs.{i}.gn"
        x = F.relu(F.group_norm(x, 32, sd[f"{gn}.weight"], sd[f"{gn}.bias"]))
        feats.append(x)
    feat = torch.cat(feats, 1)
    avg = F.adaptive_avg_pool2d(feat, 1)

    def decomp(t):  # the paper's form: scale each inter layer's features by its attention weight, then the 1x1 conv
        p = f"bbox_head.{t}_decomp"
        att = F.relu(F.conv2d(avg, sd[f"{p}.layer_attention.0.weight"], sd[f"{p}.layer_attention.0.bias"]))
        att = F.conv2d(att, sd[f"{p}.layer_attention.2.weight"], sd[f"{p}.layer_attention.2.bias"]).sigmoid()
        scaled = torch.cat([f * att[:, k : k + 1] for k, f in enumerate(feats)], 1)
        y = F.conv2d(scaled, sd[f"{p}.reduction_conv.conv.weight"])
        return F.relu(F.group_norm(y, 32, sd[f"{p}.reduction_conv.gn.weight"], sd[f"{p}.reduction_conv.gn.bias"]))

    cls_logits = F.conv2d(decomp("cls"), sd["bbox_head.tood_cls.weight"], sd["bbox_head.tood_cls.bias"], 1, 1)
    prob = F.relu(F.conv2d(feat, sd["bbox_head.cls_prob_module.0.weight"], sd["bbox_head.cls_prob_module.0.bias"]))
    prob = F.conv2d(prob, sd["bbox_head.cls_prob_module.2.weight"], sd["bbox_head.cls_prob_module.2.bias"], 1, 1)
    score = (cls_logits.sigmoid() * prob.sigmoid()).sqrt()

    reg = F.conv2d(decomp("reg"), sd["bbox_head.tood_reg.weight"], sd["bbox_head.tood_reg.bias"], 1, 1)
    scale = sd[f"bbox_head.scales.{level}.scale"]
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")  # centre offset 0
    cx, cy = xs.reshape(-1).float(), ys.reshape(-1).float()
    if anchor_type == "anchor_free":
        dist = (reg.exp() * scale).permute(0, 2, 3, 1).reshape(b, -1, 4)
        px, py = cx / stride, cy / stride  # distance2bbox(anchor_center / stride, dist)
        reg_bbox = torch.stack((px - dist[..., 0], py - dist[..., 1], px + dist[..., 2], py + dist[..., 3]), -1)
    else:
        anchors = torch.stack((cx - 4 * stride, cy - 4 * stride, cx + 4 * stride, cy + 4 * stride), -1)  # 8*stride
        deltas = (reg * scale).permute(0, 2, 3, 1).reshape(b, -1, 4)
        reg_bbox = torch.stack([mmdet_delta2bbox(anchors, d) for d in deltas]) / stride
    reg_bbox = reg_bbox.reshape(b, h, w, 4).permute(0, 3, 1, 2)
    o = "bbox_head.reg_offset_module"
    offset = F.relu(F.conv2d(feat, sd[f"{o}.0.weight"], sd[f"{o}.0.bias"]))
    offset = F.conv2d(offset, sd[f"{o}.2.weight"], sd[f"{o}.2.bias"], 1, 1)
    # mmdet deform_sampling: a 1x1 depthwise deform_conv2d of unit weight (4 groups, 4 deform groups)
    bbox = deform_conv2d(reg_bbox, offset, reg_bbox.new_ones(4, 1, 1, 1))
    invalid = ((bbox[:, [0]] > bbox[:, [2]]) | (bbox[:, [1]] > bbox[:, [3]])).expand_as(bbox)
    bbox = torch.where(invalid, reg_bbox, bbox)
    return {
        "cls_logits": cls_logits,
        "m_logits": prob,
        "score": score,
        "offset": offset,
        "box_raw": reg_bbox,
        "box": bbox * stride,
        "invalid": invalid[:, 0],
    }


def reference_forward(sd, x, depth=50, anchor_type="anchor_free"):
    """Pre-NMS outputs of the reference per level: (scores (B, nc, H, W), boxes (B, 4, H, W) xyxy pixels)."""
    _, feats = reference_backbone(sd, x, depth)
    outs = [reference_head_level(sd, p, i, anchor_type) for i, p in enumerate(reference_fpn(sd, feats))]
    return [(o["score"], o["box"]) for o in outs], outs


def assert_matches_reference(pred: torch.Tensor, ref_levels, atol=1e-4, rtol=1e-4) -> None:
    """Our (B, 4 + nc, A) output (xywh pixels, scores) equals the reference's boxes and scores level by level."""
    start = 0
    for i, (score, box) in enumerate(ref_levels):
        b, nc, h, w = score.shape
        p = pred[:, :, start : start + h * w]
        start += h * w
        xy, wh = p[:, :2], p[:, 2:4]
        ours_box = torch.cat((xy - wh / 2, xy + wh / 2), 1)
        tol = {"atol": atol, "rtol": rtol}
        torch.testing.assert_close(ours_box, box.reshape(b, 4, -1), **tol, msg=lambda m: f"P{i + 3} boxes: {m}")
        torch.testing.assert_close(p[:, 4:], score.reshape(b, nc, -1), **tol, msg=lambda m: f"P{i + 3} scores: {m}")
    assert start == pred.shape[-1]


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: one model per architecture per session
# --------------------------------------------------------------------------------------------------------------------
R50_KEYS = mmdet_tood_keys()
INPUT = torch.rand(2, 3, 160, 224, generator=torch.Generator().manual_seed(1))  # non-square; P6, P7 round up


@pytest.fixture(scope="module")
def r50_state():
    return random_mmdet_state(R50_KEYS)


@pytest.fixture(scope="module")
def r50(r50_state):
    """cfg/tood-r50.yaml with the random reference checkpoint loaded."""
    return load_mmdet_checkpoint({"state_dict": r50_state, "meta": {}}, str(ROOT / "cfg" / "tood-r50.yaml"))


@pytest.fixture(scope="module")
def r50_reference(r50_state):
    with torch.no_grad():
        return reference_forward(r50_state, INPUT)


# --------------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------------
def test_key_map_covers_the_reference_layout(r50):
    """Our model's keys map one to one onto mmdet's tood_r50_fpn_1x_coco keys, with the same shapes."""
    mapping = mmdet_key_map(r50)
    assert len(set(mapping.values())) == len(mapping)
    ref = dict(R50_KEYS)
    assert set(mapping.values()) == set(ref)
    ours = r50.state_dict()
    for k, mk in mapping.items():
        assert tuple(ours[k].shape) == ref[mk], (k, mk)
    # a few hand-checked pairs
    assert mapping["model.1.lateral_convs.0.weight"] == "neck.lateral_convs.0.conv.weight"
    assert mapping["model.2.cls_decomp.reduction_conv.weight"] == "bbox_head.cls_decomp.reduction_conv.conv.weight"
    assert mapping["model.2.reg_decomp.gn.bias"] == "bbox_head.reg_decomp.reduction_conv.gn.bias"
    assert mapping["model.0.layer1.0.bn1.num_batches_tracked"] == "backbone.layer1.0.bn1.num_batches_tracked"
    assert mapping["model.2.scales.4.scale"] == "bbox_head.scales.4.scale"


def test_names_and_eval_mode(r50):
    assert not r50.training
    assert r50.names[0] == "person" and r50.names[79] == "toothbrush" and len(r50.names) == NC
    assert next(iter(r50.state_dict().values())).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Every tensor lands where it should, by value
# --------------------------------------------------------------------------------------------------------------------
def test_backbone_by_value(r50, r50_state):
    backbone = r50.model[0]
    captured = {}
    handle = backbone.relu.register_forward_hook(lambda m, i, o: captured.setdefault("stem", o))
    with torch.no_grad():
        c3_c5 = backbone(INPUT)
        stem, ref = reference_backbone(r50_state, INPUT)
    handle.remove()
    # stem: F.conv2d of mmdet's conv1 weight on the mmdet-normalised input, then bn1 + ReLU
    torch.testing.assert_close(captured["stem"], stem, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(c3_c5, ref):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_neck_by_value(r50, r50_state):
    _, feats = reference_backbone(r50_state, INPUT)
    with torch.no_grad():
        ours = r50.model[1](feats)
    for o, r in zip(ours, reference_fpn(r50_state, feats)):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_head_by_value(r50, r50_state):
    """Each level's intermediate maps of our T-head equal the functional reference's on the same FPN maps."""
    head = r50.model[2]
    feats = reference_fpn(r50_state, reference_backbone(r50_state, INPUT)[1])
    from ultralytics.utils.tal import make_anchors

    points, _ = make_anchors(feats, torch.ones(5), 0.0)
    start, n_invalid = 0, 0
    with torch.no_grad():
        for i, x in enumerate(feats):
            n = x.shape[2] * x.shape[3]
            ours = head.forward_level(x, i, points[start : start + n])
            start += n
            ref = reference_head_level(r50_state, x, i)
            for k in ("cls_logits", "m_logits", "score", "offset", "box_raw"):
                torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"P{i + 3} {k}: {m}")
            torch.testing.assert_close(ours["box"] * STRIDES[i], ref["box"], atol=1e-4, rtol=1e-5)
            n_invalid += int(ref["invalid"].sum())
    assert n_invalid > 0  # the random offsets exercised mmdet's invalid-box fallback


def test_outputs_equal_reference(r50, r50_reference):
    """The converted model's model(x)[0] = the reference's pre-NMS boxes and scores, level by level, to 1e-4."""
    with torch.no_grad():
        pred = r50(INPUT)[0]
    assert pred.shape == (2, 4 + NC, sum(math.ceil(160 / s) * math.ceil(224 / s) for s in STRIDES))
    assert_matches_reference(pred, r50_reference[0])


def test_anchor_based_outputs_equal_reference():
    """tood_r50-fpn-anchor-based_1x_coco (same keys) converted into cfg/tood-r50-anchor.yaml."""
    sd = random_mmdet_state(R50_KEYS, seed=3)
    model = load_mmdet_checkpoint({"state_dict": sd}, str(ROOT / "cfg" / "tood-r50-anchor.yaml"))
    x = INPUT[:1]
    with torch.no_grad():
        assert_matches_reference(model(x)[0], reference_forward(sd, x, anchor_type="anchor_based")[0])


def test_dcn_resnext_outputs_equal_reference():
    """DCNv2 in the backbone (grouped ResNeXt convs, 1 deform group, stride-2 blocks included) and in the first two
    head convs (4 deform groups): the layout of tood_x101-64x4d-dconv-c4-c5 (and of tood_r101-dconv-c3-c5 but for C3),
    on a ResNeXt-50 32x4d to keep the test fast."""
    cfg = {
        "nc": NC,
        "backbone": [[-1, 1, "ResNet", [50, 32, 4, 1, [3, 4], None]]],
        "head": [[0, 1, "FPN", [256, 5]], [1, 1, "TOODHead", ["nc", 256, 6, 2, "anchor_free", 0.0]]],
    }
    keys = mmdet_tood_keys(50, groups=32, base_width=4, dcn_stages=(3, 4), num_dcn=2)
    sd = random_mmdet_state(keys, seed=4)
    model = load_mmdet_checkpoint({"state_dict": sd}, cfg)
    assert set(mmdet_key_map(model).values()) == {k for k, _ in keys}
    x = INPUT[:1, :, :96, :128]
    with torch.no_grad():
        assert_matches_reference(model(x)[0], reference_forward(sd, x)[0])


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------
def test_rejects_missing_key(r50, r50_state):
    sd = dict(r50_state)
    del sd["bbox_head.cls_decomp.reduction_conv.gn.weight"]
    with pytest.raises(ValueError, match=r"missing.*bbox_head\.cls_decomp\.reduction_conv\.gn\.weight"):
        load_mmdet_checkpoint({"state_dict": sd}, r50)


def test_rejects_unexpected_key(r50, r50_state):
    sd = {**r50_state, "bbox_head.atss_centerness.weight": torch.zeros(1, 256, 3, 3)}
    with pytest.raises(ValueError, match=r"not used.*bbox_head\.atss_centerness\.weight"):
        load_mmdet_checkpoint({"state_dict": sd}, r50)


def test_rejects_mis_shaped_key(r50, r50_state):
    sd = {**r50_state, "neck.fpn_convs.3.conv.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(ValueError, match=r"different shape.*neck\.fpn_convs\.3\.conv\.weight \(256, 256, 1, 1\)"):
        load_mmdet_checkpoint({"state_dict": sd}, r50)


def test_num_batches_tracked_optional(r50, r50_state, r50_reference):
    sd = {k: v for k, v in r50_state.items() if not k.endswith("num_batches_tracked")}
    model = load_mmdet_checkpoint({"state_dict": sd}, r50)
    with torch.no_grad():
        assert_matches_reference(model(INPUT)[0], r50_reference[0])


AUTHOR_RENAMES = {  # mmdet's key part -> fcjian/TOOD's, written from the authors' mmdet 2.14 code
    "layer_attention.0.": "la_conv1.",
    "layer_attention.2.": "la_conv2.",
    "cls_prob_module.0.": "cls_prob_conv1.",
    "cls_prob_module.2.": "cls_prob_conv2.",
    "reg_offset_module.0.": "reg_offset_conv1.",
    "reg_offset_module.2.": "reg_offset_conv2.",
}


def authors_layout(state: dict) -> dict:
    """`state` under the key names of the authors' release."""
    sd = {}
    for k, v in state.items():
        for a, b in AUTHOR_RENAMES.items():
            k = k.replace(a, b)
        sd[k] = v
    return sd


def test_authors_release_layout(r50, r50_state, r50_reference):
    """fcjian/TOOD checkpoints (the authors' mmdet 2.14 code) name the layer attention and M / O convs differently."""
    sd = authors_layout(r50_state)
    assert "bbox_head.cls_decomp.la_conv1.weight" in sd and "bbox_head.reg_offset_conv2.bias" in sd
    meta = {"config": "num_dcn_on_head=0, anchor_type='anchor_free'"}
    model = load_mmdet_checkpoint({"state_dict": sd, "meta": meta}, r50)
    with torch.no_grad():
        assert_matches_reference(model(INPUT)[0], r50_reference[0])


def test_rejects_anchor_type_mismatch(r50, r50_state):
    meta = {"config": "model = dict(bbox_head=dict(type='TOODHead', anchor_type='anchor_based'))"}
    with pytest.raises(ValueError, match="anchor_based"):
        load_mmdet_checkpoint({"state_dict": r50_state, "meta": meta}, r50)


def test_rejects_non_resnet_model(r50_state):
    with pytest.raises(ValueError, match="ResNet"):
        load_mmdet_checkpoint({"state_dict": r50_state}, str(ROOT / "cfg" / "tood-n.yaml"))


# --------------------------------------------------------------------------------------------------------------------
# Files: mmdet .pth -> CLI -> Ultralytics .pt -> YOLO
# --------------------------------------------------------------------------------------------------------------------
def test_reads_mmdet3_meta_with_foreign_objects(tmp_path, r50_state):
    """mmdet 3.x pickles mmengine objects in the meta; the reader must not need mmengine."""
    mod = types.ModuleType("fake_mmengine_logging")

    class HistoryBuffer:  # stands for mmengine.logging.HistoryBuffer
        def __init__(self):
            self.data = [1.0, 2.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = "fake_mmengine_logging", "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    sys.modules["fake_mmengine_logging"] = mod
    try:
        meta = {"dataset_meta": {"classes": [f"c{i}" for i in range(NC)]}, "message_hub": {"loss": HistoryBuffer()}}
        torch.save({"state_dict": r50_state, "meta": meta}, tmp_path / "m3.pth")
    finally:
        del sys.modules["fake_mmengine_logging"]
    with pytest.raises((pickle.UnpicklingError, ModuleNotFoundError, AttributeError, RuntimeError)):
        torch.load(tmp_path / "m3.pth", weights_only=False)  # what a plain load does without the package
    state, meta = read_mmdet_checkpoint(tmp_path / "m3.pth")
    assert set(state) == set(r50_state) and meta["dataset_meta"]["classes"][3] == "c3"


class _RunsCode:
    """What the issue's crafted checkpoint holds in its meta: unpickling it runs `touch marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalsCode(_RunsCode):
    def __reduce__(self):
        return builtins.eval, (f"open({self.marker!r}, 'w').close()",)


def test_convert_runs_no_code_from_the_checkpoint(tmp_path, r50_state):
    """os.system in the meta is refused by name; builtins.eval becomes an inert stand-in and the conversion goes on.
    Legacy format, as mmdet publishes its checkpoints."""
    marker, crafted, dst = tmp_path / "marker", tmp_path / "crafted.pth", tmp_path / "out.pt"
    cfg = str(ROOT / "cfg" / "tood-r50.yaml")
    names = tuple(f"c{i}" for i in range(NC))
    torch.save({"state_dict": r50_state, "meta": {"CLASSES": names, "x": _RunsCode(marker)}}, crafted,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=f"{crafted.name} names posix.system"):
        main([str(crafted), str(dst), "--cfg", cfg])
    assert not marker.exists() and not dst.exists()
    torch.load(crafted, weights_only=False)
    assert marker.exists()  # the payload is live: the old converter's full unpickler ran it
    marker.unlink()

    torch.save({"state_dict": r50_state, "meta": {"CLASSES": names, "x": _EvalsCode(marker)}}, crafted,
               _use_new_zipfile_serialization=False)
    assert main([str(crafted), str(dst), "--cfg", cfg]) == dst
    assert not marker.exists()
    assert torch.load(dst, weights_only=False)["model"].names[5] == "c5"


def test_converts_an_mmdet3_file_with_mmengine_objects(tmp_path, r50_state, r50_reference):
    """mmdet 3.x meta: dataset_meta, config text, mmengine's message hub and history buffers (numpy inside), pickled
    while modules named as mmengine's existed; converted without them, class names and outputs intact."""
    src = save_mmdet3(r50_state, tuple(f"k{i}" for i in range(NC)), tmp_path / "m3.pth", "legacy")
    model = load_mmdet_checkpoint(src, str(ROOT / "cfg" / "tood-r50.yaml"))
    assert "mmengine" not in sys.modules  # nothing was imported by its pickled name
    assert model.names[0] == "k0" and model.names[79] == "k79"
    with torch.no_grad():
        assert_matches_reference(model(INPUT)[0], r50_reference[0])


def test_authors_release_file(tmp_path, r50_state, r50_reference):
    """A file of the authors' release (fcjian/TOOD, mmdet 2.14: legacy format, meta with CLASSES, the config text and
    numpy values) converts, outputs equal to the reference."""
    meta = {
        "CLASSES": tuple(f"a{i}" for i in range(NC)),
        "config": "model = dict(bbox_head=dict(type='TOODHead', num_dcn_on_head=0, anchor_type='anchor_free'))",
        "mmcv_version": "1.3.8",
        "hook_msgs": {"best_score": np.float64(0.421), "iters": np.arange(3)},
    }
    src = tmp_path / "tood_r50_fpn_1x_coco.pth"
    torch.save({"state_dict": authors_layout(r50_state), "meta": meta}, src, _use_new_zipfile_serialization=False)
    model = load_mmdet_checkpoint(src, str(ROOT / "cfg" / "tood-r50.yaml"))
    assert model.names[3] == "a3"
    with torch.no_grad():
        assert_matches_reference(model(INPUT)[0], r50_reference[0])


@pytest.fixture(scope="module")
def converted_pt(tmp_path_factory, r50_state):
    """An mmdet 2.x-style .pth file (meta with CLASSES and the config text) converted by the CLI."""
    folder = tmp_path_factory.mktemp("converted")
    src, dst = folder / "tood_r50_fpn_1x_coco.pth", folder / "tood-r50.pt"
    meta = {"CLASSES": ("person",) + tuple(f"class{i}" for i in range(1, NC)), "config": "anchor_type='anchor_free'"}
    torch.save({"state_dict": r50_state, "meta": meta}, src)
    assert main([str(src), str(dst), "--cfg", str(ROOT / "cfg" / "tood-r50.yaml")]) == dst
    return dst


def test_cli_finds_a_config_by_name_from_any_folder(tmp_path, r50_state, r50_reference, monkeypatch):
    """README's line `... convert tood_r50_fpn_1x_coco.pth tood-r50.pt --cfg tood-r50.yaml`, run outside the
    repository: the config is found by name, as `yolo` finds it."""
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": r50_state, "meta": {}}, "tood_r50_fpn_1x_coco.pth")
    assert main(["tood_r50_fpn_1x_coco.pth", "tood-r50.pt", "--cfg", "tood-r50.yaml"]) == Path("tood-r50.pt")
    with torch.no_grad():
        assert_matches_reference(torch.load("tood-r50.pt", weights_only=False)["model"](INPUT)[0], r50_reference[0])
    with pytest.raises(SystemExit):
        main(["tood_r50_fpn_1x_coco.pth", "x.pt", "--cfg", "tood-r99.yaml"])


def test_cli_round_trip_through_yolo(tmp_path, converted_pt, r50_reference):
    """mmdet .pth -> `python -m tood_yolo.tools.convert` -> .pt that ultralytics.YOLO loads, predicts and exports with,
    and whose model(x)[0] still equals the reference."""
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    dst = shutil.copy(converted_pt, tmp_path / "tood-r50.pt")
    ckpt = torch.load(dst, weights_only=False)
    assert {"model", "train_args", "date", "version"} <= set(ckpt) and ckpt["train_args"]["task"] == "detect"
    assert ckpt["model"].yaml["backbone"][0][3][5] is None  # weights come from the checkpoint, not ImageNet
    assert ckpt["train_args"]["imgsz"] % 128 == 0  # Ultralytics wants multiples of the largest stride (P7)

    yolo = YOLO(str(dst))
    assert yolo.task == "detect" and yolo.names[1] == "class1"
    with torch.no_grad():
        assert_matches_reference(yolo.model(INPUT)[0], r50_reference[0])
    results = yolo.predict(ASSETS / "bus.jpg", imgsz=256, conf=0.01, verbose=False)
    assert len(results) == 1 and results[0].boxes.data.shape[1] == 6
    with torch.no_grad():  # still the same model after the predictor's fuse()
        assert_matches_reference(yolo.model(INPUT)[0], r50_reference[0])
    onnx_file = YOLO(str(dst)).export(format="onnx", imgsz=64, simplify=False)
    assert onnx_file.endswith(".onnx") and (tmp_path / "tood-r50.onnx").exists()


def test_converted_checkpoint_validates(tmp_path, shared_data, converted_pt):
    """`yolo val` (Ultralytics' validator) runs on the converted checkpoint."""
    from ultralytics import YOLO

    metrics = YOLO(str(converted_pt)).val(data=str(shared_data("coco8") / "data.yaml"), imgsz=128, batch=4,
                                          plots=False, verbose=False, project=str(tmp_path), name="val")
    assert 0 <= metrics.box.map <= 1


def test_half_checkpoint(tmp_path, r50, r50_reference):
    from ultralytics import YOLO

    dst = tmp_path / "half.pt"
    torch.save(ultralytics_checkpoint(r50, str(ROOT / "cfg" / "tood-r50.yaml"), half=True), dst)
    assert torch.load(dst, weights_only=False)["model"].model[2].tood_cls.weight.dtype == torch.float16
    with torch.no_grad():
        pred = YOLO(str(dst)).model(INPUT)[0]
    assert_matches_reference(pred, r50_reference[0], atol=0.05, rtol=0.01)


# --------------------------------------------------------------------------------------------------------------------
# tood_yolo.tools.evaluate: the reference's test protocol
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, resized, padded",
    [
        ((480, 640), (800, 1067), (800, 1088)),  # 4:3 landscape: shorter side 800
        ((640, 427), (1199, 800), (1216, 800)),  # portrait: 640*1.8735 + 0.5 -> 1199
        ((100, 1000), (133, 1333), (160, 1344)),  # very wide: longer side capped at 1333
        ((800, 1333), (800, 1333), (800, 1344)),  # already at scale
        ((1000, 1000), (800, 800), (800, 800)),
    ],
)
def test_resize_and_pad_rule(hw, resized, padded):
    """mmcv rescale_size((w, h), (1333, 800)) and pad_size_divisor=32, values worked out by hand."""
    assert reference_resize_shape(*hw) == resized
    assert padded_shape(*resized) == padded
    img = np.full((*hw, 3), (10, 20, 30), np.uint8)  # BGR
    x, (ws, hs) = preprocess(img)
    assert x.shape == (1, 3, *padded)
    assert ws == resized[1] / hw[1] and hs == resized[0] / hw[0]
    torch.testing.assert_close(x[0, :, : resized[0], : resized[1]].mean((1, 2)), torch.tensor([30, 20, 10]) / 255)
    # padding bottom/right only, with the ImageNet mean (0 after the reference's normalisation)
    if padded != resized:
        pad = torch.cat((x[0, :, resized[0] :, :].reshape(3, -1), x[0, :, :, resized[1] :].reshape(3, -1)), 1)
        torch.testing.assert_close(pad, torch.tensor([0.485, 0.456, 0.406]).view(3, 1).expand_as(pad))


def test_postprocess_per_level_topk_and_nms():
    """Scores <= 0.05 dropped, top-k per level (not per image), class-aware NMS at 0.6, rescaled boxes, max 100."""
    nc, counts = 3, [6, 2]
    pred = torch.zeros(4 + nc, 8)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10],
                          [70, 70, 80, 80], [100, 100, 120, 120], [20, 20, 40, 40]], dtype=torch.float)
    pred[:2], pred[2:4] = ((boxes[:, :2] + boxes[:, 2:]) / 2).T, (boxes[:, 2:] - boxes[:, :2]).T
    pred[4 + 0, 0], pred[4 + 0, 1] = 0.9, 0.8  # IoU 0.82 same class: suppressed
    pred[4 + 1, 2] = 0.7  # same box, other class: kept
    pred[4 + 0, 3], pred[4 + 2, 3] = 0.6, 0.5  # one anchor, two classes above the threshold
    pred[4 + 0, 4] = 0.05  # not above score_thr
    pred[4 + 0, 5] = 0.3
    pred[4 + 0, 6], pred[4 + 1, 7] = 0.2, 0.1  # level 2
    b, s, lab = postprocess(pred, counts, scale_factor=(2.0, 0.5), nms_pre=3)
    # level 1 top-3 of (0.9, 0.8, 0.7, 0.6, 0.5, 0.3) -> 0.9, 0.8, 0.7; 0.8 suppressed by 0.9; level 2 keeps both
    torch.testing.assert_close(s, torch.tensor([0.9, 0.7, 0.2, 0.1]))
    assert lab.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(b[0], torch.tensor([0.0, 0.0, 5.0, 20.0]))  # x / 2, y / 0.5
    torch.testing.assert_close(b[3], torch.tensor([10.0, 40.0, 20.0, 80.0]))
    assert len(postprocess(pred, counts, max_det=2)[0]) == 2


def _coco8_json(root, shuffle_categories=True):
    """A COCO-format annotation file for coco8's val images, with COCO's real (1..90) category ids."""
    from ultralytics.data.converter import coco80_to_coco91_class
    from ultralytics.utils import ROOT as ULTRALYTICS_ROOT
    from ultralytics.utils import YAML

    names = YAML.load(ULTRALYTICS_ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    ids = coco80_to_coco91_class()
    cats = [{"id": ids[i], "name": names[i], "supercategory": "x"} for i in range(80)]
    if shuffle_categories:
        cats = cats[::-1]  # the file's order must not matter: classes map to ids in sorted order
    images, anns, gts = [], [], {}
    for n, f in enumerate(sorted((root / "images" / "val").glob("*.jpg"))):
        h, w = cv2.imread(str(f)).shape[:2]
        img_id = int(f.stem)
        images.append({"id": img_id, "file_name": f.name, "height": h, "width": w})
        gts[img_id] = []
        for line in (root / "labels" / "val" / f"{f.stem}.txt").read_text().splitlines():
            c, cx, cy, bw, bh = map(float, line.split())
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": ids[int(c)], "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
            gts[img_id].append((int(c), box))
    file = root / "instances_val.json"
    file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return file, gts


class PerfectModel(torch.nn.Module):
    """Outputs each image's ground truth (found by the padded input's shape and content) in the model's layout."""

    def __init__(self, root, gts, nc=80):
        super().__init__()
        self.nc, self.table = nc, []
        for f in sorted((root / "images" / "val").glob("*.jpg")):
            x, (ws, hs) = preprocess(cv2.imread(str(f)), (114 / 255,) * 3)
            pred = torch.zeros(4 + nc, len(gts[int(f.stem)]) + 3)  # plus 3 empty anchors
            for j, (c, (x1, y1, bw, bh)) in enumerate(gts[int(f.stem)]):
                pred[:4, j] = torch.tensor([(x1 + bw / 2) * ws, (y1 + bh / 2) * hs, bw * ws, bh * hs])
                pred[4 + c, j] = 0.99
            self.table.append((x, pred))

    def forward(self, x):
        for key, pred in self.table:
            if key.shape == x.shape and torch.equal(key, x):
                return pred[None], {}
        raise AssertionError("unknown image")


def test_evaluate_perfect_detections_score_ap_1(shared_data, tmp_path):
    """GT-equal detections give AP 1.0 only if class indices map to the sorted COCO category ids."""
    root = shared_data("coco8")
    ann, gts = _coco8_json(root)
    out = tmp_path / "dets.json"
    stats = evaluate(PerfectModel(root, gts), root / "images" / "val", ann, out=out, verbose=False)
    assert stats["n_images"] == 4 and stats["n_detections"] == sum(len(v) for v in gts.values())
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    dets = json.loads(out.read_text())
    gt = json.loads(ann.read_text())["annotations"]
    pairs = sorted((d["image_id"], d["category_id"]) for d in dets)
    assert pairs == sorted((a["image_id"], a["category_id"]) for a in gt)
    for d in dets:  # boxes are back in original-image pixels, COCO xywh
        assert any(np.allclose(d["bbox"], a["bbox"], atol=1e-3) for a in gt if a["image_id"] == d["image_id"])
    stats = evaluate(PerfectModel(root, gts), root / "images" / "val", ann, max_images=2, out=out, verbose=False)
    assert stats["n_images"] == 2 and stats["AP"] == pytest.approx(1.0)


def test_evaluate_cli_runs_a_real_model(shared_data, tmp_path, converted_pt, capsys):
    """The CLI on a converted checkpoint: runs end to end, prints the COCO table, writes the json."""
    root = shared_data("coco8")
    ann, _ = _coco8_json(root)
    pt = converted_pt
    out = tmp_path / "d.json"
    from tood_yolo.tools.evaluate import main as eval_main

    args = [f"model={pt}", f"images={root / 'images' / 'val'}", f"annotations={ann}", "max_images=1", f"out={out}"]
    stats = eval_main(args)
    assert set(COCO_STATS) <= set(stats) and stats["n_images"] == 1
    dets = json.loads(out.read_text())
    assert len(dets) == stats["n_detections"] <= 100
    cat_ids = {a["id"] for a in json.loads(ann.read_text())["categories"]}
    assert all(d["score"] > 0.05 and d["category_id"] in cat_ids for d in dets)
    if dets:
        assert "Average Precision" in capsys.readouterr().out
