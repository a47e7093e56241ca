"""T-head components against independent computations (the paper, section 3.1; mmdet 3.3.0 TOODHead)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import deform_conv2d

from tood_yolo.nn.head import TaskDecomposition, TOODHead
from tood_yolo.nn.ops import align_boxes, deform_sampling, delta2bbox, modulated_deform_conv2d, sigmoid_geometric_mean

torch.manual_seed(0)


def test_layer_attention_equals_explicit_per_layer_scaling():
    c, n, b = 32, 3, 2
    td = TaskDecomposition(c, n, la_down_rate=8)
    for p in td.parameters():
        torch.nn.init.normal_(p, 0, 0.5)  # non-trivial attention and GN affine
    feat = torch.randn(b, c * n, 5, 7)
    avg = feat.mean((2, 3), keepdim=True)
    w = torch.sigmoid(F.conv2d(F.relu(F.conv2d(avg, *_wb(td.layer_attention[0]))), *_wb(td.layer_attention[2])))
    scaled = torch.cat([feat[:, k * c : (k + 1) * c] * w[:, k : k + 1] for k in range(n)], 1)  # scale each layer
    expected = F.relu(F.group_norm(F.conv2d(scaled, td.reduction_conv.weight), 32, td.gn.weight, td.gn.bias))
    attn = td.attention(avg)
    assert attn.shape == (b, n)
    torch.testing.assert_close(attn, w.flatten(1))
    torch.testing.assert_close(td(feat, attn), expected, atol=1e-5, rtol=1e-5)


def _wb(conv):
    return conv.weight, conv.bias


def test_aligned_score_value_and_gradient_match_a_safe_reference():
    x = torch.tensor([-120.0, -30.0, -2.0, 0.0, 3.0, 40.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-90.0, 5.0, 1.0, -1.0, -60.0, 30.0], dtype=torch.float64, requires_grad=True)
    z = sigmoid_geometric_mean(x, y)
    torch.testing.assert_close(z, (torch.sigmoid(x) * torch.sigmoid(y)).sqrt())
    (gx, gy) = torch.autograd.grad(z.sum(), (x, y))

    xr, yr = x.detach().requires_grad_(), y.detach().requires_grad_()
    zr = torch.exp(0.5 * (F.logsigmoid(xr) + F.logsigmoid(yr)))  # same function, stable autograd
    (rx, ry) = torch.autograd.grad(zr.sum(), (xr, yr))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gy, ry)

    # the naive formula in float32 breaks down where the analytic one does not (the reason for the custom backward)
    xn, yn = x.detach().float().requires_grad_(), y.detach().float().requires_grad_()
    (nx,) = torch.autograd.grad((torch.sigmoid(xn) * torch.sigmoid(yn)).sqrt().sum(), (xn,))
    assert not torch.isfinite(nx).all()
    xf, yf = x.detach().float().requires_grad_(), y.detach().float().requires_grad_()
    (fx,) = torch.autograd.grad(sigmoid_geometric_mean(xf, yf).sum(), (xf,))
    assert torch.isfinite(fx).all()


@pytest.mark.parametrize("h,w", [(6, 9), (1, 5), (4, 1), (1, 1)])
def test_deform_sampling_equals_unit_kernel_deform_conv(h, w):
    b, c = 2, 4
    feat = torch.randn(b, c, h, w, dtype=torch.float64)
    offset = torch.randn(b, 2 * c, h, w, dtype=torch.float64) * 2.5  # many samples fall partly or fully outside
    expected = deform_conv2d(feat, offset, torch.ones(c, 1, 1, 1, dtype=torch.float64))  # groups, offset groups = c
    torch.testing.assert_close(deform_sampling(feat, offset), expected, atol=1e-10, rtol=1e-10)


def test_aligned_score_for_inference_and_export_equals_the_broadcast_product():
    """Without a gradient (inference, exports) M is repeated over the classes explicitly: the broadcast's values."""
    x, y = torch.randn(2, 5, 4, 3) * 4, torch.randn(2, 1, 4, 3) * 4
    with torch.no_grad():
        assert torch.equal(sigmoid_geometric_mean(x, y), (torch.sigmoid(x) * torch.sigmoid(y)).sqrt())


def test_grouped_deform_sampling_equals_deform_conv_of_offset_groups():
    """Channels that share an offset (the 16 bins of a DFL side): torchvision's depthwise deform conv with one offset
    group per shared offset, zeros outside the map."""
    b, c, group, h, w = 2, 12, 4, 5, 7
    feat = torch.randn(b, c, h, w, dtype=torch.float64)
    offset = torch.randn(b, 2 * c // group, h, w, dtype=torch.float64) * 2.5
    expected = deform_conv2d(feat, offset, torch.ones(c, 1, 1, 1, dtype=torch.float64))  # c // group offset groups
    torch.testing.assert_close(deform_sampling(feat, offset, group=group), expected, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="offset channels"):
        deform_sampling(feat, offset, group=5)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_grouped_deform_sampling_equals_sampling_each_channel_at_its_groups_offset(padding_mode):
    """The grouped sampler gives the per-channel sampler's values bit for bit and its gradients up to float rounding,
    for the float32 maps and border padding of the T-head's DFL distributions."""
    b, r, h, w = 2, 16, 9, 11
    probs = torch.randn(b, 4 * r, h, w).softmax(1).requires_grad_()
    offset = (torch.randn(b, 8, h, w) * 3).requires_grad_()  # many samples at or beyond the border
    copies = offset.view(b, 4, 1, 2, h, w).expand(b, 4, r, 2, h, w).reshape(b, 8 * r, h, w)  # each channel its own
    expected = deform_sampling(probs, copies, padding_mode)
    got = deform_sampling(probs, offset, padding_mode, group=r)
    assert torch.equal(got, expected)
    grad = torch.randn_like(got)
    grads = torch.autograd.grad(got, (probs, offset), grad)
    for g, e in zip(grads, torch.autograd.grad(expected, (probs, offset), grad)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,groups,dg", [(1, 1, 1), (2, 2, 1), (1, 1, 4)])
def test_onnx_modulated_deform_conv_equals_torchvision(stride, groups, dg):
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    weight = torch.randn(6, 8 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    ho, wo = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    offset = torch.randn(2, 2 * dg * 9, ho, wo, dtype=torch.float64) * 2
    mask = torch.rand(2, dg * 9, ho, wo, dtype=torch.float64)
    expected = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, stride=stride, padding=1)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_align_boxes_falls_back_to_unsampled_box_where_corners_swap():
    # a 1x2 map: location 0 holds box [0, 0, 4, 4], location 1 holds [5, 0, 6, 3]
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 0.0, 6.0, 3.0]]).T.reshape(1, 4, 1, 2)
    offset = torch.zeros(1, 8, 1, 2)  # channels (dy, dx) for x1, y1, x2, y2
    offset[0, 1, 0, 0] = 1.0  # location 0 takes x1 = 5 from its right neighbour: 5 > x2 = 4, invalid
    offset[0, 5, 0, 1] = -1.0  # location 1 takes x2 = 4 from its left neighbour: x1 = 5 > 4, invalid
    out = align_boxes(box, offset)
    torch.testing.assert_close(out, box)
    # a valid shift is kept: location 1 takes y2 = 4 from location 0 (y1 = 0 < 4)
    offset = torch.zeros(1, 8, 1, 2)
    offset[0, 7, 0, 1] = -1.0
    out = align_boxes(box, offset)
    expected = box.clone()
    expected[0, 3, 0, 1] = box[0, 3, 0, 0]
    torch.testing.assert_close(out, expected)


def test_align_boxes_selects_exactly_as_torch_where_with_its_gradients():
    """The arithmetic select (NCNN has no comparison or select layer) gives torch.where's values and gradients bit
    for bit, ties (x1 == x2 after sampling: valid) included."""
    box = (torch.randn(2, 4, 9, 11, dtype=torch.float64) * 8).requires_grad_()
    offset = (torch.randn(2, 8, 9, 11, dtype=torch.float64) * 2).requires_grad_()
    with torch.no_grad():
        box[:, 2, :3] = box[:, 0, :3]  # offset 0 there: sampled x1 == x2 exactly
        offset[:, 0:2, :3] = 0
        offset[:, 4:6, :3] = 0
    sampled = deform_sampling(box, offset)
    invalid = (sampled[:, 0:1] > sampled[:, 2:3]) | (sampled[:, 1:2] > sampled[:, 3:4])
    assert 0 < invalid.float().mean() < 1 and (sampled[:, 0] == sampled[:, 2]).any()
    expected = torch.where(invalid, box, sampled)
    got = align_boxes(box, offset)
    assert torch.equal(got, expected)
    weights = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad((got * weights).sum(), (box, offset)),
                    torch.autograd.grad((expected * weights).sum(), (box, offset))):
        assert torch.equal(g, e)


def test_delta_decoder_matches_torchvision_box_coder():
    anchors = torch.rand(50, 4) * 100
    anchors[:, 2:] += anchors[:, :2] + 1
    deltas = torch.randn(50, 4) * 3  # includes |dw| beyond the log(1000/16) clamp after scaling
    expected = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas, anchors)
    torch.testing.assert_close(delta2bbox(anchors, deltas), expected, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def r50_head():
    return TOODHead(nc=80, ch=(256,) * 5)


def test_r50_head_parameter_count_matches_reference(r50_head):
    assert sum(p.numel() for p in r50_head.parameters()) == 4_823_790


def test_reference_initialisation(r50_head):
    bias = -math.log((1 - 0.01) / 0.01)
    assert r50_head.tood_cls.bias.allclose(torch.full((80,), bias))
    assert r50_head.cls_prob_module[-1].bias.allclose(torch.tensor([bias]))
    assert r50_head.tood_reg.bias.eq(0).all() and r50_head.reg_offset_module[-1].bias.eq(0).all()
    for m, std in [
        (r50_head.inter_convs[0].conv, 0.01),
        (r50_head.tood_cls, 0.01),
        (r50_head.cls_prob_module[0], 0.01),
        (r50_head.reg_offset_module[0], 0.001),
        (r50_head.cls_decomp.layer_attention[0], 0.001),
        (r50_head.reg_decomp.reduction_conv, 0.01),
    ]:
        assert m.weight.std().item() == pytest.approx(std, rel=0.1)
    assert all(s.scale.item() == 1.0 for s in r50_head.scales)


def test_outputs_shapes_and_anchor_free_decoding(r50_head):
    head = TOODHead(nc=3, feat_channels=32, stacked_convs=2, ch=(16,) * 3)
    head.stride = torch.tensor([8.0, 16.0, 32.0])
    sizes = [(8, 6), (4, 3), (2, 2)]
    x = [torch.randn(2, 16, h, w) for h, w in sizes]
    head.train()
    out = head(x)
    n = sum(h * w for h, w in sizes)
    assert out["boxes"].shape == (2, 4, n) and out["scores"].shape == (2, 3, n)
    # level 0 before alignment: anchor points at (j, i) (offset 0) -/+ Scale * exp(reg), in stride units
    lvl = head.forward_level(
        x[0], 0, torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="xy"), -1).view(-1, 2)
    )
    reg = head.tood_reg(head.reg_decomp(*_decomp_inputs(head, x[0])))
    dist = reg.exp() * head.scales[0].scale
    j = torch.arange(6.0).view(1, 1, 6).expand(1, 8, 6)
    i = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 6)
    torch.testing.assert_close(lvl["box_raw"][:, 0], j - dist[:, 0])
    torch.testing.assert_close(lvl["box_raw"][:, 3], i + dist[:, 3])
    head.eval()
    y, raw = head(x)
    assert y.shape == (2, 4 + 3, n)
    strides = torch.cat([torch.full((h * w,), s) for (h, w), s in zip(sizes, (8.0, 16.0, 32.0))])
    xyxy = raw["boxes"] * strides
    torch.testing.assert_close(y[:, 0], (xyxy[:, 0] + xyxy[:, 2]) / 2)
    torch.testing.assert_close(y[:, 3], xyxy[:, 3] - xyxy[:, 1])
    torch.testing.assert_close(y[:, 4:], raw["scores"])


def _decomp_inputs(head, x):
    feats = []
    for conv in head.inter_convs:
        x = conv(x)
        feats.append(x)
    feat = torch.cat(feats, 1)
    return feat, head.reg_decomp.attention(feat.mean((2, 3), keepdim=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"anchor_type": "anchor_box"}, "anchor_type"),
        ({"num_dcn": 7}, "num_dcn"),
        ({"feat_channels": 48}, "multiple of 32"),
        ({"stacked_convs": 0}, "stacked_convs=0 must be >= 1"),  # else a ZeroDivisionError in the layer attention
        ({"feat_channels": 64, "norm_groups": 24}, "multiple of 24"),
        ({"ch": 256}, "list of input maps"),
    ],
)
def test_bad_head_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TOODHead(**{"nc": 80, "ch": (256,) * 5, **kwargs})


def _small_head(levels: int = 2) -> TOODHead:
    """A small anchor-free T-head whose distances vary from cell to cell and whose offset map O is its last bias."""
    head = TOODHead(nc=3, feat_channels=16, stacked_convs=2, norm_groups=4, ch=(8,) * levels)
    with torch.no_grad():
        torch.nn.init.normal_(head.tood_reg.weight, 0, 0.1)  # reference init (0.01) gives exp(reg) ~ 1 everywhere
        head.reg_offset_module[2].weight.zero_()  # O = bias at every location (0 until a test sets it)
        head.reg_offset_module[2].bias.zero_()
    return head.eval()


def _ltrb(box: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) xyxy boxes in stride units -> (B, 4, H, W) distances from their anchor points (j, i), offset 0."""
    h, w = box.shape[2:]
    i, j = torch.arange(h, dtype=box.dtype).view(h, 1), torch.arange(w, dtype=box.dtype).view(1, w)
    return torch.stack((j - box[:, 0], i - box[:, 1], box[:, 2] - j, box[:, 3] - i), 1)


def test_level_scale_multiplies_that_levels_distances_only():
    """Scale i multiplies level i's exp(reg) distances (the reference's Scale after exp), and no other level's."""
    head = _small_head(levels=3)
    x = [torch.randn(2, 8, 7, 5), torch.randn(2, 8, 4, 3), torch.randn(2, 8, 2, 2)]
    with torch.no_grad():
        before = head.forward_levels(x)
        head.scales[1].scale.fill_(2.0)
        after = head.forward_levels(x)
    for level in before + after:
        assert torch.equal(level["offset"], torch.zeros_like(level["offset"]))
        torch.testing.assert_close(level["box"], level["box_raw"])  # zero offsets sample each box at its own cell
    torch.testing.assert_close(
        _ltrb(after[1]["box_raw"]),
        2 * _ltrb(before[1]["box_raw"]),
        msg="level 1's scale of 2 did not double its distances",
    )
    for k in (0, 2):
        assert torch.equal(after[k]["box_raw"], before[k]["box_raw"]), f"the scale of level 1 changed level {k}"


@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_offsets_sample_each_side_from_its_own_neighbour(frac):
    """O's channels (dy, dx) per coordinate x1, y1, x2, y2: x1 from the left, y1 from above, x2 from below, y2 from the
    right; a whole cell takes the neighbour's value, half a cell the mean of the two (bilinear sampling)."""
    head = _small_head(levels=1)
    x = [torch.randn(2, 8, 6, 7)]
    offset = torch.tensor([0.0, -1.0, -1.0, 0.0, 1.0, 0.0, 0.0, 1.0]) * frac
    with torch.no_grad():
        head.reg_offset_module[2].bias.copy_(offset)
        level = head.forward_levels(x)[0]
    torch.testing.assert_close(level["offset"], offset.view(1, 8, 1, 1).expand_as(level["offset"]))
    raw = level["box_raw"]  # compared on the cells whose four neighbours exist
    neighbour = torch.stack((raw[:, 0, 1:-1, :-2], raw[:, 1, :-2, 1:-1], raw[:, 2, 2:, 1:-1], raw[:, 3, 1:-1, 2:]), 1)
    expected = (1 - frac) * raw[:, :, 1:-1, 1:-1] + frac * neighbour
    # each side moved outwards, so the box stays valid (x1 < x2, y1 < y2) and alignment keeps the sampled values
    torch.testing.assert_close(
        level["box"][:, :, 1:-1, 1:-1], expected, msg=f"aligned box sides not sampled {frac} cell from their own cell"
    )
    assert not torch.allclose(expected, raw[:, :, 1:-1, 1:-1]), "the neighbours' values must differ from the cell's"
