"""The T-head in Ultralytics' multi-input form (`[[P3, P4, P5], 1, TOODHead, [...]]`) and on YOLOv8/YOLO11 necks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from tood_yolo.head import TOODHead

REFERENCE = Path(__file__).parent / "data" / "thead_fpn_reference.npz"
FPN_CASES = {  # the heads of tests/data/make_thead_fpn_reference.py
    "free": dict(nc=3, feat_channels=32, stacked_convs=2, num_dcn=0, anchor_type="anchor_free", anchor_offset=0.0,
                 ch=(8,) * 5),
    "based_dcn": dict(nc=2, feat_channels=32, stacked_convs=1, num_dcn=1, anchor_type="anchor_based",
                      anchor_offset=0.5, ch=(32,) * 3),
}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (GN affine, offsets, layer attention), so that every path shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.5))


def _model(widths: list[int], head_args: list, nc: int = 3) -> DetectionModel:
    """A small backbone of stride-2 convs with levels of the given (unequal) widths from P3 on, then a T-head."""
    backbone = [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]]  # P1, P2
    backbone += [[-1, 1, "Conv", [w, 3, 2]] for w in widths]  # P3, P4, ...
    head = [[list(range(2, 2 + len(widths))), 1, "TOODHead", ["nc", *head_args]]]
    return DetectionModel({"nc": nc, "backbone": backbone, "head": head}, ch=3, nc=nc, verbose=False)


@pytest.mark.parametrize("case", FPN_CASES)
def test_fpn_form_outputs_equal_those_before_the_multi_input_form(case):
    """Same weights, same inputs: the FPN form gives the outputs of the head before this change (saved reference)."""
    ref = np.load(REFERENCE)
    head = TOODHead(**FPN_CASES[case])
    state = {k.split("/", 2)[2]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith(f"{case}/state/")}
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    assert not head.proj  # equal widths: no projection, the first inter conv takes the FPN's width
    head.stride = torch.tensor([8.0 * 2**i for i in range(head.nl)])
    x = [torch.from_numpy(ref[f"{case}/x/{i}"]).float() for i in range(head.nl)]
    head.eval()
    with torch.no_grad():
        y, _ = head(x)
    torch.testing.assert_close(y, torch.from_numpy(ref[f"{case}/y"]), rtol=1e-5, atol=1e-5)


def test_unequal_widths_are_projected_then_run_through_the_shared_head():
    widths, c = (16, 48, 24), 32
    head = TOODHead(nc=3, feat_channels=c, stacked_convs=2, norm_groups=4, ch=widths)
    assert [p.conv.kernel_size for p in head.proj] == [(1, 1)] * 3
    assert [(p.conv.in_channels, p.conv.out_channels, p.gn.num_groups) for p in head.proj] == [(w, c, 4) for w in widths]
    assert head.inter_convs[0].conv.in_channels == c
    _randomise(head)
    # the same head minus the projections, on equal-width inputs: must see exactly the projected maps
    shared = TOODHead(nc=3, feat_channels=c, stacked_convs=2, norm_groups=4, ch=(c,) * 3)
    shared.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("proj.")}, strict=True)
    for h in (head, shared):
        h.stride = torch.tensor([8.0, 16.0, 32.0])
        h.eval()
    x = [torch.randn(2, w, s, s + 1) for w, s in zip(widths, (8, 4, 2))]
    with torch.no_grad():
        y, raw = head(x)
        y_shared, _ = shared([p(xi) for p, xi in zip(head.proj, x)])
    torch.testing.assert_close(y, y_shared)
    assert y.shape == (2, 4 + 3, 8 * 9 + 4 * 5 + 2 * 3)
    assert raw["feats"] is x  # the loss reads the input maps' shapes


@pytest.mark.parametrize("widths", [(16, 32, 64), (16, 24, 32, 48, 64)])
def test_any_number_of_levels_with_strides_from_the_model(widths):
    model = _model(list(widths), [32, 2, 0, "anchor_free", 0.0, 4])
    head = model.model[-1]
    assert head.nl == len(widths) and len(head.proj) == len(widths)
    torch.testing.assert_close(head.stride, torch.tensor([8.0 * 2**i for i in range(len(widths))]))
    assert model.stride.max() == 8 * 2 ** (len(widths) - 1)
    model.eval()
    s = 8 * 2 ** (len(widths) - 1) * 2  # the coarsest level is 2x2
    with torch.no_grad():
        y, _ = model(torch.rand(1, 3, s, s))
    assert y.shape == (1, 4 + 3, sum((s // 8 // 2**i) ** 2 for i in range(len(widths))))
    assert torch.isfinite(y).all()


def test_a_level_of_one_pixel_trains_and_aligns_exactly():
    model = _model([16, 32, 64], [32, 2, 0, "anchor_free", 0.0, 4])
    head = model.model[-1]
    _randomise(head)
    torch.nn.init.zeros_(head.reg_offset_module[-1].weight)  # O = 0: alignment must leave the boxes as they are
    torch.nn.init.zeros_(head.reg_offset_module[-1].bias)
    x = torch.rand(2, 3, 32, 32)
    feats = [x]
    for m in model.model[:-1]:
        feats.append(m(feats[-1]))
    p5 = feats[-1]
    assert p5.shape[2:] == (1, 1)
    level = head.forward_level(p5, 2, torch.zeros(1, 2))
    torch.testing.assert_close(level["box"], level["box_raw"])
    # GroupNorm of 8 channels per group on one pixel still sees its input; 1 channel per group would give every image
    # the same output (the affine bias alone), which is why narrow heads keep the group size rather than 32 groups
    assert not torch.allclose(level["score"][0], level["score"][1])
    per_channel = TOODHead(nc=3, feat_channels=32, stacked_convs=2, norm_groups=32, ch=(16, 32, 64))
    out = per_channel.forward_level(p5, 2, torch.zeros(1, 2))["score"]
    torch.testing.assert_close(out[0], out[1])
    model.train()
    out = model(x)
    (out["boxes"].sum() + out["scores"].sum()).backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert head.proj[2].conv.weight.grad.abs().sum() > 0  # the 1x1 level's projection learns
