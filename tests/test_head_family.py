"""The T-head family (`TOODHead`'s norm, trunk and reg arguments): each variant against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from ultralytics.nn.modules.block import DFL

from tood_yolo.nn.head import TOODHead
from tood_yolo.nn.ops import ConvBNAct, PerLevel

WIDTHS = [16, 32, 64]  # a YOLO neck's unequal widths, P3-P5
# name: (norm, trunk, reg[, cls_pred]); the paper's head is ("gn", "shared", "ltrb", "conv")
VARIANTS = {
    "gn-dfl": ("gn", "shared", "dfl"),
    "sepbn": ("bn", "shared", "ltrb"),
    "bn-level": ("bn", "level", "ltrb"),
    "bn-level-dfl": ("bn", "level", "dfl"),
    "bn-level-dfl-dw": ("bn", "level", "dfl", "dw"),
}


def _yaml(norm: str, trunk: str, reg: str, cls_pred: str = "conv", nc: int = 3) -> dict:
    """A small backbone of stride-2 convs (P3-P5 of WIDTHS), then a T-head variant with 32 channels, 2 inter convs."""
    backbone = [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]] + [[-1, 1, "Conv", [w, 3, 2]] for w in WIDTHS]
    head = [[[2, 3, 4], 1, "TOODHead", ["nc", 32, 2, 0, "anchor_free", 0.0, 8, norm, trunk, reg, cls_pred]]]
    return {"nc": nc, "backbone": backbone, "head": head}


def _head(norm: str, trunk: str, reg: str, cls_pred: str = "conv", nc: int = 3) -> TOODHead:
    head = TOODHead(nc, 32, 2, 0, "anchor_free", 0.0, 8, norm, trunk, reg, cls_pred, ch=tuple(WIDTHS))
    head.stride = torch.tensor([8.0, 16.0, 32.0])
    return head


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affines far from their initial values, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))


def _batch() -> dict:
    """Three boxes on two images (normalised xywh), as Ultralytics' dataloader gives them."""
    return {
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0], [2.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.25], [0.6, 0.55, 0.35, 0.4], [0.5, 0.5, 0.6, 0.5]]),
    }


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_builds_trains_a_step_and_exports_equal_outputs(name, tmp_path, monkeypatch):
    """Built from a YAML, one optimiser step (every parameter gets a gradient, the loss is finite, TAL then the ATSS
    warm-up), then Ultralytics' dynamic ONNX export runs in onnxruntime to the unfused model's outputs (1e-4) at two
    input sizes; BatchNorm variants export with no BatchNormalization node (folded by Ultralytics' fuse)."""
    import onnx
    import onnxruntime as ort
    from ultralytics import YOLO

    norm, trunk, reg, *_ = VARIANTS[name]
    cfg = tmp_path / f"tiny-{name}.yaml"
    cfg.write_text(yaml.safe_dump(_yaml(*VARIANTS[name])))
    model = YOLO(str(cfg))
    net = model.model
    net.args = {**net.args, "epochs": 8}  # the loss plans its ATSS warm-up from the run's epochs
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    batch = {**_batch(), "img": torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))}
    for epoch in (5, 0):  # TAL, then the ATSS warm-up
        opt.zero_grad()
        loss, items = net.loss(batch)
        net.criterion.epoch = epoch
        loss, items = net.loss(batch)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in items.values())
        assert ("loss_dfl" in items) == (reg == "dfl")
        missing = [n for n, p in net.model[-1].named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{name}: parameters without a gradient (DDP would fail): {missing}"
        opt.step()
    _randomise_bn(net.model[-1])

    net.eval()
    monkeypatch.chdir(tmp_path)
    f = model.export(format="onnx", dynamic=True, imgsz=128, simplify=False)
    ops = {n.op_type for n in onnx.load(f).graph.node}
    if norm == "bn":
        assert "BatchNormalization" not in ops
    session = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    assert norm == "gn" or not net.model[-1].is_fused()  # the exporter fused a copy: this model keeps its BatchNorms
    for shape in ((1, 3, 128, 128), (2, 3, 96, 160)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        (y_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            y = net(x)[0].numpy()
        np.testing.assert_allclose(y_onnx, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sepbn", "bn-level", "bn-level-dfl", "bn-level-dfl-dw"])
def test_fuse_folds_every_batchnorm_and_keeps_the_outputs(name):
    head = _head(*VARIANTS[name])
    _randomise_bn(head)
    head.eval()
    x = [torch.randn(2, w, s, s + 1) for w, s in zip(WIDTHS, (8, 4, 2))]
    with torch.no_grad():
        expected = head(x)[0]
        assert not head.is_fused()
        head.fuse()
        got = head(x)[0]
    assert head.is_fused() and not any(isinstance(m, nn.BatchNorm2d) for m in head.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_sepbn_shares_conv_weights_and_keeps_statistics_per_level():
    """RTMDet's SepBN: one conv per inter layer for all levels, a BatchNorm per level that sees only its level."""
    head = _head("bn", "shared", "ltrb")
    convs = [m for m in head.inter_convs]
    assert all(isinstance(m, ConvBNAct) and isinstance(m.bn, PerLevel) and len(m.bn) == 3 for m in convs)
    assert not isinstance(head.tood_cls, PerLevel)  # the predictors stay shared, as the paper's
    assert [p.conv.in_channels for p in head.proj] == WIDTHS  # 1x1 projections, one BatchNorm each
    assert all(isinstance(p.bn, nn.BatchNorm2d) for p in head.proj)
    head.train()
    # levels with very different statistics: each level's BatchNorm must track its own
    x = [torch.randn(4, w, s, s) * (i + 1) * 3 + i * 5 for i, (w, s) in enumerate(zip(WIDTHS, (8, 4, 2)))]
    before = [bn.running_mean.clone() for bn in convs[0].bn]
    out = head(x)
    after = [bn.running_mean for bn in convs[0].bn]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.allclose(after[0], after[2], atol=1e-3)
    (out["boxes"].sum() + out["scores"].sum()).backward()
    assert convs[1].conv.weight.grad.abs().sum() > 0


def test_level_trunks_read_each_level_at_its_own_width_without_projection():
    head = _head("bn", "level", "ltrb")
    assert not head.proj
    assert isinstance(head.inter_convs, PerLevel) and len(head.inter_convs) == 3
    assert [convs[0].conv.in_channels for convs in head.inter_convs] == WIDTHS
    assert all(isinstance(m.bn, nn.BatchNorm2d) for convs in head.inter_convs for m in convs)
    for name in ("cls_decomp", "reg_decomp", "tood_cls", "tood_reg", "cls_prob_module", "reg_offset_module"):
        parts = getattr(head, name)
        assert isinstance(parts, PerLevel) and len({id(p) for p in parts}) == 3, name
    # one level's output depends on its own trunk only
    head.eval()
    x = [torch.randn(1, w, s, s) for w, s in zip(WIDTHS, (8, 4, 2))]
    with torch.no_grad():
        before = head(x)[0]
        head.tood_cls[1].bias.add_(1.0)
        after = head(x)[0]
    changed = (after - before).abs().amax(1)[0]  # per anchor
    assert changed[:64].max() == 0 and changed[64:80].min() > 0 and changed[80:].max() == 0


def _dfl_level(head: TOODHead, level: int, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """forward_level of `level`, the tood_reg logits it used (B, 64, H, W) and its anchor points (H*W, 2)."""
    h, w = x.shape[2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
    points = torch.stack((xs, ys), -1).view(-1, 2)  # anchor_offset 0, stride units
    logits = []
    hook = head.tood_reg.register_forward_hook(lambda m, i, o: logits.append(o))
    try:
        out = head.forward_level(x, level, points)
    finally:
        hook.remove()
    return out, logits[0], points


def test_dfl_decode_equals_ultralytics_dfl_and_zero_offsets_leave_boxes_unaligned():
    head = _head("gn", "shared", "dfl")
    with torch.no_grad():
        head.tood_reg.weight.normal_(0, 0.3)  # non-uniform distributions
        nn.init.zeros_(head.reg_offset_module[-1].weight)
        nn.init.zeros_(head.reg_offset_module[-1].bias)
        out, logits, points = _dfl_level(head, 0, torch.randn(2, WIDTHS[0], 6, 7))
    b, _, h, w = logits.shape
    dist = DFL(16)(logits.view(b, 64, h * w)).view(b, 4, h, w)  # Ultralytics' own decode
    p = points.T.reshape(1, 2, h, w)
    expected = torch.cat((p - dist[:, :2], p + dist[:, 2:]), 1)
    torch.testing.assert_close(out["box_raw"], expected)
    torch.testing.assert_close(out["box"], expected)
    # the log-probabilities handed to the loss are those distributions
    probs = out["dist"].exp().view(b, 4, 16, h, w)
    torch.testing.assert_close(probs.sum(2), torch.ones(b, 4, h, w))
    torch.testing.assert_close(probs, logits.view(b, 4, 16, h, w).softmax(2))


def test_dfl_offsets_sample_each_sides_distribution_one_cell_away():
    """An offset of one cell outwards per side: x1 takes the left neighbour's distribution and is measured from the
    left neighbour's point (x1 = p_x - 1 - d_l(left)), y1 from above, x2 from the right, y2 from below."""
    head = _head("gn", "shared", "dfl")
    with torch.no_grad():
        head.tood_reg.weight.normal_(0, 0.3)
        nn.init.zeros_(head.reg_offset_module[-1].weight)
        # O's channels: [dy_x1, dx_x1, dy_y1, dx_y1, dy_x2, dx_x2, dy_y2, dx_y2]
        head.reg_offset_module[-1].bias.copy_(torch.tensor([0.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
        out, logits, points = _dfl_level(head, 0, torch.randn(1, WIDTHS[0], 6, 7))
    _, _, h, w = logits.shape
    probs = logits.view(1, 4, 16, h, w).softmax(2)
    d = (probs * torch.arange(16.0).view(1, 1, 16, 1, 1)).sum(2)[0]  # (4, H, W) each cell's own distances
    box, logp = out["box"][0], out["dist"][0].view(4, 16, h, w)
    i, j = slice(1, h - 1), slice(1, w - 1)  # interior cells: every neighbour exists
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
    torch.testing.assert_close(box[0, i, j], (xs - 1 - d[0].roll(1, 1))[i, j])
    torch.testing.assert_close(box[1, i, j], (ys - 1 - d[1].roll(1, 0))[i, j])
    torch.testing.assert_close(box[2, i, j], (xs + 1 + d[2].roll(-1, 1))[i, j])
    torch.testing.assert_close(box[3, i, j], (ys + 1 + d[3].roll(-1, 0))[i, j])
    torch.testing.assert_close(logp[0, :, i, j].exp(), probs[0, 0].roll(1, 2)[:, i, j])
    torch.testing.assert_close(logp[3, :, i, j].exp(), probs[0, 3].roll(-1, 1)[:, i, j])


def test_dfl_term_is_the_distribution_focal_loss_from_each_sides_sampling_point():
    """TOODLoss.dfl_term against GFL's DFL written out: -(w_l log p[floor t] + w_r log p[floor t + 1]), t the distance
    from the side's sampling point to the GT side, mean over the four sides."""
    from tood_yolo.utils.loss import TOODLoss

    class _Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.ModuleList([_head("gn", "shared", "dfl")])

    loss = TOODLoss(_Model())
    g = torch.Generator().manual_seed(0)
    n = 5
    log_probs = torch.randn(n, 4, 16, generator=g).log_softmax(-1)
    origin = torch.rand(n, 4, generator=g) * 10 + 20  # the sampling points' coordinate per side (x, y, x, y)
    dist = (log_probs.exp() * torch.arange(16.0)).sum(-1)
    boxes = origin + torch.stack((-dist[:, 0], -dist[:, 1], dist[:, 2], dist[:, 3]), 1)
    t = torch.rand(n, 4, generator=g) * 14.5  # target distances, inside the bins
    targets = origin + torch.stack((-t[:, 0], -t[:, 1], t[:, 2], t[:, 3]), 1)
    got = loss.dfl_term(boxes, log_probs.view(n, 64), targets)
    lo = t.floor().long()
    wl, wr = lo + 1 - t, t - lo
    p_lo, p_hi = log_probs.gather(2, lo.unsqueeze(2))[..., 0], log_probs.gather(2, (lo + 1).unsqueeze(2))[..., 0]
    expected = -(wl * p_lo + wr * p_hi).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(norm="ln"), "norm must be one of"),
        (dict(trunk="both"), "trunk must be one of"),
        (dict(reg="gfl"), "reg must be one of"),
        (dict(reg="dfl", anchor_type="anchor_based"), "needs anchor_free"),
        (dict(cls_pred="1x1"), "cls_pred must be one of"),
        (dict(cls_pred="dw", norm="bn"), "per-level BatchNorm trunks"),  # a shared trunk would share its BatchNorm
    ],
)
def test_arguments_outside_the_family_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        TOODHead(nc=3, feat_channels=32, stacked_convs=2, norm_groups=8, ch=(32,) * 3, **args)


def test_bn_variants_fold_into_the_convs_in_ultralytics_fuse():
    """`DetectionModel.fuse()` (what `yolo export`/predict run) reaches the head's BatchNorms through `is_fused`."""
    from tood_yolo import TOODDetectionModel

    model = TOODDetectionModel(_yaml("bn", "shared", "ltrb"), verbose=False).eval()
    _randomise_bn(model.model[-1])
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)[0]
        model.fuse(verbose=False)
        got = model(x)[0]
    assert model.is_fused() and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
