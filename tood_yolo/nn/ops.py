"""The T-head's building blocks: the aligned score, offset sampling, the anchor-based box decode, deformable convs,
and the norm factory of the head family (GroupNorm as the paper, or BatchNorm per level that fuses into its conv).

Each is checked against an independent computation in tests/test_head.py (torchvision's ops, mmdet's formulas).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import DeformConv2d

DELTA_STDS = (0.1, 0.1, 0.2, 0.2)  # DeltaXYWHBBoxCoder target_stds of the anchor-based reference (means are 0)
WH_RATIO_CLIP = 16 / 1000  # mmdet's delta2bbox default clamp of dw, dh
NORMS = ("gn", "bn")  # the paper's GroupNorm + ReLU, or YOLO's BatchNorm + SiLU (one BatchNorm per level)


class SigmoidGeometricMean(torch.autograd.Function):
    """z = sqrt(sigmoid(x) * sigmoid(y)) with an analytic backward.

    Autograd through `sqrt` of a product that underflows to 0 gives inf * 0 = NaN gradients (mmdet PR #7090); the
    closed form dz/dx = z * (1 - sigmoid(x)) / 2 is finite everywhere.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_sigmoid, y_sigmoid = x.sigmoid(), y.sigmoid()
        z = (x_sigmoid * y_sigmoid).sqrt()
        ctx.save_for_backward(x_sigmoid, y_sigmoid, z)
        return z

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_sigmoid, y_sigmoid, z = ctx.saved_tensors
        return grad_output * z * (1 - x_sigmoid) / 2, grad_output * z * (1 - y_sigmoid) / 2


def sigmoid_geometric_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Aligned score sqrt(sigmoid(x) * sigmoid(y)); x (B, C, H, W) class logits, y (B, 1, H, W) M logits.

    The custom autograd function is used only when a gradient is needed: tracing and ONNX export see plain ops.
    Under autocast the score is formed in fp32 (the logits are cast; sigmoid, mul and sqrt then stay fp32): fp16
    rounds sigmoid to exactly 1.0 from logit ~8.4 (bf16 from ~6), where the loss's gradient in probability space is
    unbounded and overflows fp16 on the way back, and the backward's 1 - sigmoid is 0: NaN. fp32 runs are unchanged.
    """
    if torch.is_autocast_enabled(x.device.type):
        x, y = x.float(), y.float()
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return SigmoidGeometricMean.apply(x, y)
    # M repeated over the classes explicitly (same values as broadcasting): OpenCV 5's DNN engine fails on a
    # (B, C, H, W) x (B, 1, H, W) Mul whose result is then reshaped ("C0 <= 1 in function 'toLayout'"). A repeat
    # (Tile), not expand_as (Broadcast): OpenVINO moves a Broadcast that feeds a Mul behind it and renames the Mul,
    # which then leaves the head's scope that Ultralytics' int8 export keeps in float, so nncf quantised both
    # probabilities (tests/test_postprocess.py); and pnnx (NCNN) cannot convert a Broadcast before the sigmoid
    return (x.sigmoid() * y.sigmoid().repeat(1, x.shape[1], 1, 1)).sqrt()


def deform_sampling(
    feat: torch.Tensor, offset: torch.Tensor, padding_mode: str = "zeros", group: int = 1
) -> torch.Tensor:
    """Bilinearly sample each channel of `feat` at its own offset location, zeros outside the map.

    Equivalent to mmdet's 1x1 depthwise `deform_conv2d` with unit weight (channel k sampled at (i + dy_k, j + dx_k)),
    written with `grid_sample` so that it exports to ONNX (GridSample, opset >= 16). `align_corners=False` with the
    matching pixel-centre normalisation also keeps the 1-pixel-wide maps of P7 exact. Traced for an export, it runs one
    `grid_sample` per channel on the batch as it is (the values of one call on B*C single-channel maps, bit for bit):
    NCNN has no batch axis, so it cannot run a sampler whose batch is B*C; eager code keeps the one call.

    With `group` > 1, each run of `group` consecutive channels shares one offset (a deform conv of C / group offset
    groups) and is sampled by one sampler of `group` channels: the values of sampling each channel alone at a copy of
    its offset, bit for bit (grid_sample weighs every channel alike), and gradients equal up to float rounding (the
    offset's sum over the group's channels), at a fraction of the cost (tests/test_head.py).

    Args:
        feat (torch.Tensor): (B, C, H, W) maps to sample.
        offset (torch.Tensor): (B, 2C / group, H, W) offsets in pixels, channels [dy_0, dx_0, dy_1, dx_1, ...].
        padding_mode (str): `grid_sample`'s: "zeros" (the reference's deform conv) or "border" (the edge's values,
            so that sampled distributions stay distributions).
        group (int): Channels per offset; it divides C.

    Returns:
        (torch.Tensor): (B, C, H, W) sampled maps.
    """
    b, c, h, w = feat.shape
    g = c if group == 1 else c // group  # no shape arithmetic in traced exports, which sample channel by channel
    # checked in eager code only: an export traces sizes as values, and a Python test of them would be frozen
    if not torch.jit.is_tracing() and (g * group != c or offset.shape[1] != 2 * g):
        raise ValueError(f"deform_sampling: {offset.shape[1]} offset channels for {c} maps in groups of {group}")
    dy, dx = offset.view(b, g, 2, h, w).unbind(2)
    ys = torch.arange(h, device=feat.device, dtype=offset.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=feat.device, dtype=offset.dtype).view(1, 1, 1, w)
    gx = (2 * (xs + dx) + 1) / w - 1  # pixel -> [-1, 1] with align_corners=False
    gy = (2 * (ys + dy) + 1) / h - 1
    grid = torch.stack((gx, gy), -1).to(feat.dtype)  # (B, G, H, W, 2)
    if torch.jit.is_tracing():  # an export: one sampler per channel on the batch as it is (NCNN has no batch axis)
        return torch.cat(
            [F.grid_sample(feat[:, k : k + 1], grid[:, k // group], align_corners=False, padding_mode=padding_mode)
             for k in range(c)], 1
        )
    out = F.grid_sample(
        feat.reshape(b * g, group, h, w), grid.view(b * g, h, w, 2), align_corners=False, padding_mode=padding_mode
    )
    return out.view(b, c, h, w)


def align_boxes(box: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Box alignment with the offset map O: each coordinate map sampled at its own offset (`deform_sampling`).

    Where sampling leaves x1 > x2 or y1 > y2 the unsampled box is kept, as mmdet 3.x does (PR #7567): such boxes made
    the GIoU loss negative. The choice is written with arithmetic alone (the values and gradients of `torch.where` for
    finite boxes) so that NCNN, which has no comparison or select layer, runs it: ceil(clamp(d, 0, 1)) is 1 exactly
    where d > 0 and 0 elsewhere, and a * 1 + b * 0 is exactly a.

    Args:
        box (torch.Tensor): (B, 4, H, W) xyxy boxes before alignment.
        offset (torch.Tensor): (B, 8, H, W) offsets [dy_x1, dx_x1, dy_y1, dx_y1, dy_x2, dx_x2, dy_y2, dx_y2].

    Returns:
        (torch.Tensor): (B, 4, H, W) aligned xyxy boxes.
    """
    sampled = deform_sampling(box.contiguous(), offset.contiguous())
    return select(inverted(sampled), box, sampled)


def inverted(box: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a (B, 4, H, W) xyxy box has x1 > x2 or y1 > y2, else 0.0, with arithmetic alone (for
    NCNN): ceil(clamp(d, 0, 1)) is exactly 1 where d > 0 and 0 elsewhere."""
    x1y1, x2y2 = box.split(2, 1)
    return (x1y1 - x2y2).clamp(0, 1).ceil().amax(1, keepdim=True)


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch.where(mask, a, b)` for a 0/1 float `mask` that broadcasts, with arithmetic alone (NCNN has no select
    layer): a * 1 + b * 0 is exactly a, and the gradients are where's for finite values."""
    return a * mask + b * (1 - mask)


def delta2bbox(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Decode (dx, dy, dw, dh) deltas against xyxy anchors, as mmdet's DeltaXYWHBBoxCoder (means 0, stds 0.1/0.2).

    Args:
        anchors (torch.Tensor): (..., 4) xyxy anchors.
        deltas (torch.Tensor): (..., 4) raw regression outputs.

    Returns:
        (torch.Tensor): (..., 4) xyxy boxes in the anchors' units (the decode is scale-equivariant).
    """
    deltas = deltas * deltas.new_tensor(DELTA_STDS)
    max_ratio = abs(math.log(WH_RATIO_CLIP))
    dxy, dwh = deltas[..., :2], deltas[..., 2:].clamp(-max_ratio, max_ratio)
    pxy, pwh = (anchors[..., :2] + anchors[..., 2:]) / 2, anchors[..., 2:] - anchors[..., :2]
    gxy, gwh = pxy + pwh * dxy, pwh * dwh.exp()
    return torch.cat((gxy - gwh / 2, gxy + gwh / 2), -1)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level, initialised to 1)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class PerLevel(nn.ModuleList):
    """One module per pyramid level where the paper's head has one shared by all levels; `at` picks a level's."""


def at(module: nn.Module, level: int) -> nn.Module:
    """The module that serves pyramid level `level`: its own if `module` is `PerLevel`, else the shared one."""
    return module[level] if isinstance(module, PerLevel) else module


def every(module: nn.Module) -> list[nn.Module]:
    """The modules of all levels: each of a `PerLevel`, else the shared one."""
    return list(module) if isinstance(module, PerLevel) else [module]


def _conv(c1: int, c2: int, k: int, dcn: bool, deform_groups: int) -> nn.Module:
    """Bias-free kxk conv, or a 3x3 modulated deformable conv (DCNv2)."""
    if dcn:
        return ModulatedDeformConv(c1, c2, 3, 1, deform_groups=deform_groups)
    return nn.Conv2d(c1, c2, k, padding=k // 2, bias=False)


class ConvGNReLU(nn.Sequential):
    """Bias-free kxk conv (or 3x3 modulated deformable conv) + GroupNorm + ReLU, mmcv's ConvModule layout.

    GroupNorm has no statistics per level, so one module serves every level; `forward` takes the level only to be
    called as `ConvBNAct` is.
    """

    def __init__(self, c1: int, c2: int, dcn: bool = False, deform_groups: int = 4, groups: int = 32, k: int = 3):
        super().__init__()
        self.conv, self.gn, self.act = _conv(c1, c2, k, dcn, deform_groups), nn.GroupNorm(groups, c2), nn.ReLU(True)

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        return self.act(self.gn(self.conv(x)))


def fuse_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """`conv` (a conv or `ModulatedDeformConv`) with `bn` folded into its weight and bias, in place, frozen."""
    target = conv.conv if isinstance(conv, ModulatedDeformConv) else conv
    target.weight, target.bias = fuse_conv_bn_weights(
        target.weight, target.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    return conv.requires_grad_(False)


class ConvBNAct(nn.Module):
    """Bias-free kxk conv (or 3x3 DCNv2) + BatchNorm + SiLU, as Ultralytics' `Conv`, for levels that may share it.

    With `levels` > 1 one conv serves every level and each level has its own BatchNorm (RTMDet's SepBN): levels differ
    in their statistics, and one BatchNorm shared by them trains badly (mmdetection #6515). `fuse` folds each level's
    BatchNorm into its own copy of the conv, so an exported graph has no BatchNormalization node.
    """

    def __init__(self, c1: int, c2: int, k: int = 3, dcn: bool = False, deform_groups: int = 4, levels: int = 1):
        super().__init__()
        self.conv = _conv(c1, c2, k, dcn, deform_groups)
        self.bn = bn_layer(c2, levels)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        """(B, c1, H, W) map of pyramid level `level` -> (B, c2, H, W)."""
        if hasattr(self, "bn"):
            return self.act(at(self.bn, level)(self.conv(x)))
        return self.act(at(self.conv, level)(x))  # fused

    def fuse(self) -> None:
        """Fold the BatchNorm(s) into the conv: one fused copy of the conv per level."""
        if hasattr(self, "bn"):
            bns = every(self.bn)
            convs = [fuse_conv_bn(copy.deepcopy(self.conv) if len(bns) > 1 else self.conv, bn) for bn in bns]
            self.conv = PerLevel(convs) if isinstance(self.bn, PerLevel) else convs[0]
            del self.bn


def bn_layer(c: int, levels: int = 1) -> nn.Module:
    """A BatchNorm of `c` channels, or one per level (`PerLevel`) when `levels` > 1."""
    return nn.BatchNorm2d(c) if levels == 1 else PerLevel(nn.BatchNorm2d(c) for _ in range(levels))


def conv_norm_act(
    norm: str, c1: int, c2: int, k: int = 3, dcn: bool = False, groups: int = 32, levels: int = 1
) -> nn.Module:
    """The norm factory's conv unit: `ConvGNReLU` ("gn", the paper's) or `ConvBNAct` ("bn", a BatchNorm per level)."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: choose 'gn' (GroupNorm, the paper's) or 'bn' (BatchNorm per level)")
    return ConvGNReLU(c1, c2, dcn=dcn, groups=groups, k=k) if norm == "gn" else ConvBNAct(c1, c2, k, dcn, levels=levels)


def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """`torchvision.ops.deform_conv2d` (with mask) written with `grid_sample` and a matmul, for ONNX export only.

    torchvision's op has no ONNX symbolic (as mmcv's: mmdetection #8201); each kernel tap is sampled bilinearly at
    its offset location (zeros outside), scaled by its mask, then the taps are contracted with the weight.

    Args:
        x (torch.Tensor): (B, C, H, W) input.
        offset (torch.Tensor): (B, 2 * dg * kh * kw, Ho, Wo) offsets, (dy, dx) pairs per deform group and tap.
        mask (torch.Tensor): (B, dg * kh * kw, Ho, Wo) modulation.
        weight (torch.Tensor): (C_out, C / groups, kh, kw) conv weight.

    Returns:
        (torch.Tensor): (B, C_out, Ho, Wo) output.
    """
    b, c, h, w = x.shape
    co, cg, kh, kw = weight.shape
    groups, k = c // cg, kh * kw
    ho, wo = offset.shape[-2:]
    dg = offset.shape[1] // (2 * k)
    ky, kx = torch.meshgrid(
        torch.arange(kh, device=x.device) * dilation, torch.arange(kw, device=x.device) * dilation, indexing="ij"
    )
    base_y = (torch.arange(ho, device=x.device) * stride - padding).view(1, 1, 1, ho, 1) + ky.reshape(1, 1, k, 1, 1)
    base_x = (torch.arange(wo, device=x.device) * stride - padding).view(1, 1, 1, 1, wo) + kx.reshape(1, 1, k, 1, 1)
    off = offset.view(b, dg, k, 2, ho, wo)
    py, px = base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), -1).view(b * dg, k * ho, wo, 2)
    cols = F.grid_sample(x.reshape(b * dg, c // dg, h, w), grid.to(x.dtype), padding_mode="zeros", align_corners=False)
    cols = (cols.view(b, dg, c // dg, k, ho, wo) * mask.view(b, dg, 1, k, ho, wo)).reshape(b, groups, cg * k, ho * wo)
    out = torch.matmul(weight.view(groups, co // groups, cg * k), cols).view(b, co, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class ModulatedDeformConv(nn.Module):
    """Modulated deformable conv (DCNv2) with its own offset/mask predictor, as mmcv's ModulatedDeformConv2dPack.

    The offset conv predicts (o1, o2, mask) in 3 chunks; offsets are cat(o1, o2), the mask is sigmoid(mask), and it is
    zero-initialised so training starts from a plain convolution. Uses `torchvision.ops.DeformConv2d`, and
    `modulated_deform_conv2d` when exporting to ONNX.
    """

    def __init__(
        self, c1: int, c2: int, k: int = 3, s: int = 1, deform_groups: int = 1, groups: int = 1, bias: bool = False
    ):
        super().__init__()
        self.conv = DeformConv2d(c1, c2, k, s, padding=k // 2, groups=groups, bias=bias)
        self.conv_offset = nn.Conv2d(c1, deform_groups * 3 * k * k, k, s, padding=k // 2, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1, o2, mask = self.conv_offset(x).chunk(3, dim=1)
        offset, mask = torch.cat((o1, o2), 1), mask.sigmoid()
        if torch.onnx.is_in_onnx_export():
            c = self.conv
            return modulated_deform_conv2d(x, offset, mask, c.weight, c.bias, c.stride[0], c.padding[0], c.dilation[0])
        # torchvision's CPU kernel turns a non-finite or huge offset into an out-of-bounds read (floor(NaN) -> INT_MIN)
        # and kills the process: Ultralytics' FLOPs count feeds the model an uninitialised tensor (torch.empty) when
        # it loads a checkpoint.
        # Any offset beyond the map's extent samples zeros, so the clamp changes no finite result.
        limit = float(sum(x.shape[-2:]) + self.conv.weight.shape[-1])
        return self.conv(x, offset.nan_to_num(0.0, limit, -limit).clamp(-limit, limit), mask)
