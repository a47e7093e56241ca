"""TOOD's task-aligned head (T-head) as an Ultralytics `Detect` subclass, and its family of YOLO-regime variants.

Faithful to mmdetection 3.3.0's `TOODHead` (mmdet/models/dense_heads/tood_head.py) and the paper (arXiv:2108.07755,
section 3.1): task-interactive features, layer attention, the classification alignment map M and the localisation
alignment map O. Outputs keep Ultralytics' inference layout so that its validator, predictor, NMS and exporter work
unchanged. Arguments after the paper's choose the variants (`TOODHead`'s docstring); their defaults are the paper's.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv, Detect, DWConv
from ultralytics.nn.modules.block import DFL
from ultralytics.utils.tal import make_anchors
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from .ops import (
    ConvBNAct,
    ConvGNReLU,  # noqa: F401  (checkpoints of 0.1 pickle it as tood_yolo.head.ConvGNReLU, an alias of this module)
    ModulatedDeformConv,
    PerLevel,
    Scale,
    align_boxes,
    at,
    bn_layer,
    conv_norm_act,
    deform_sampling,
    delta2bbox,
    every,
    fuse_conv_bn,
    inverted,
    select,
    sigmoid_geometric_mean,
)

PRIOR_PROB = 0.01  # the reference's initial foreground probability (bias -4.595)
TRUNKS = ("shared", "level")  # one trunk for all levels (the paper's), or a trunk per level
REGS = ("ltrb", "dfl")  # the paper's exp(ltrb) distances, or DFL distributions (GFL, Ultralytics' Detect)
CLS_PREDS = ("conv", "dw")  # the paper's 3x3 class predictor, or YOLO11's depthwise 3x3 + 1x1
DFL_BINS = 16  # Ultralytics' reg_max: distances of 0-15 strides


def changed(key, cached) -> bool:
    """Whether a cache key of input sizes differs from the cached one. While an export traces the model the sizes are
    traced values and the comparison warns (TracerWarning) that it becomes a constant: that is what a static export
    wants (its dry run filled the cache at the export size; dynamic exports recompute instead), so it is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return key != cached


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias of a sigmoid classifier whose initial output is `prior_prob`."""
    return -math.log((1 - prior_prob) / prior_prob)


class TaskDecomposition(nn.Module):
    """Layer attention over the stacked inter-conv features, then a 1x1 reduction to one task's features + norm + act.

    The attention gives one weight per inter layer per image (sigmoid), which scales the matching input-channel block
    of the reduction conv's weight (the reference's memory-saving form of "scale each layer, then 1x1 conv"). The norm
    is the paper's GroupNorm + ReLU (`norm="gn"`) or BatchNorm + SiLU, one BatchNorm per level when `levels` > 1
    (`norm="bn"`); `fuse` folds BatchNorm into the reduction (one weight and bias per level).
    """

    def __init__(
        self,
        feat_channels: int,
        stacked_convs: int,
        la_down_rate: int = 8,
        norm_groups: int = 32,
        norm: str = "gn",
        levels: int = 1,
    ):
        super().__init__()
        self.feat_channels, self.stacked_convs = feat_channels, stacked_convs
        self.in_channels = feat_channels * stacked_convs
        self.layer_attention = nn.Sequential(
            nn.Conv2d(self.in_channels, self.in_channels // la_down_rate, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.in_channels // la_down_rate, stacked_convs, 1),
            nn.Sigmoid(),
        )
        self.reduction_conv = nn.Conv2d(self.in_channels, feat_channels, 1, bias=False)
        if norm == "gn":
            self.gn, self.act = nn.GroupNorm(norm_groups, feat_channels), nn.ReLU(inplace=True)
        else:
            self.bn, self.act = bn_layer(feat_channels, levels), nn.SiLU(inplace=True)

    def attention(self, avg_feat: torch.Tensor) -> torch.Tensor:
        """(B, stacked_convs*C, 1, 1) pooled features -> (B, stacked_convs) layer weights."""
        return self.layer_attention(avg_feat).flatten(1)

    def scaled_weight(self, attention: torch.Tensor, level: int = 0) -> torch.Tensor:
        """(B, stacked_convs) layer weights -> (B, C, stacked_convs*C) per-image reduction weights of `level`."""
        b = attention.shape[0]
        weight = attention.view(b, 1, self.stacked_convs, 1)
        reduction = at(self.reduction_conv, level).weight
        conv_weight = weight * reduction.view(1, self.feat_channels, self.stacked_convs, -1)
        return conv_weight.view(b, self.feat_channels, self.in_channels)

    def norm_act(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Norm and activation of the (B, C, H, W) reduced features of `level` (the fused bias, once fused)."""
        if hasattr(self, "gn"):
            return self.act(self.gn(x))
        if hasattr(self, "bn"):
            return self.act(at(self.bn, level)(x))
        return self.act(x + at(self.reduction_conv, level).bias.view(1, -1, 1, 1))

    def forward(self, feat: torch.Tensor, attention: torch.Tensor, level: int = 0) -> torch.Tensor:
        """(B, stacked_convs*C, H, W) features and their (B, stacked_convs) layer weights -> (B, C, H, W)."""
        b, _, h, w = feat.shape
        out = torch.bmm(self.scaled_weight(attention, level), feat.view(b, self.in_channels, -1))
        return self.norm_act(out.view(b, self.feat_channels, h, w), level)

    def fuse(self) -> None:
        """Fold the BatchNorm(s) into the reduction conv, one biased copy per level: the attention scales the conv's
        input-channel blocks, so the per-output-channel BatchNorm affine still folds into it."""
        if hasattr(self, "bn"):
            convs = [fuse_conv_bn(copy.deepcopy(self.reduction_conv), bn) for bn in every(self.bn)]
            self.reduction_conv = PerLevel(convs) if isinstance(self.bn, PerLevel) else convs[0]
            del self.bn


class TOODHead(Detect):
    """TOOD's T-head: task-interactive features, task decomposition and the alignment maps M and O.

    YAML: `[[P3, P4, ...], 1, TOODHead, [nc, feat_channels, stacked_convs, num_dcn, anchor_type, anchor_offset,
    norm_groups, norm, trunk, reg, cls_pred]]` like Ultralytics' `Detect` (any number of levels, any widths), or
    `[FPN, 1, TOODHead, [...]]` on an FPN layer that returns the list of levels; the paper's head is `[nc, 256, 6,
    0, "anchor_free", 0.0, 32, "gn", "shared", "ltrb", "conv"]` (trailing arguments may be left out) and the input
    channels are filled in by the model parser. In training `forward` returns a dict: "boxes" (B, 4, A) xyxy in
    stride units after box alignment (the reference's `bbox_pred`), "scores" (B, nc, A) aligned probabilities
    sqrt(P * M), "feats" the input maps, and with `reg="dfl"` "dists" (B, 4 * 16, A), the log-probabilities of the
    aligned distance distributions. In eval it returns Ultralytics' (B, 4 + nc, A) tensor of xywh pixel boxes and scores
    (and the dict, unless exporting).

    The family, chosen by the last four arguments (defaults: the paper's):
    - `norm`: "gn", GroupNorm + ReLU (the paper's); or "bn", BatchNorm + SiLU as YOLO heads, one BatchNorm per level
      (on a shared trunk that is RTMDet's SepBN: shared conv weights, per-level statistics). BatchNorm folds into the
      convs in Ultralytics' `fuse()` and so at export; GroupNorm cannot.
    - `trunk`: "shared", one set of layers for all levels (the paper's); or "level", a trunk per level, like `Detect`'s
      branches, whose first conv reads the level at its own width (no projection).
    - `reg`: "ltrb", exp distances times a learnt per-level scale (the paper's); or "dfl", a distribution of 16 bins per
      side (GFL, Ultralytics' `DFL`) from the paper's 3x3 predictor: O samples each side's distribution at that
      side's offset, and TOOD's loss adds Ultralytics' DFL term.
    - `cls_pred`: "conv", the paper's 3x3 conv to the class logits; or "dw" (per-level trunks only), YOLO11's
      depthwise 3x3 + BatchNorm + SiLU, then a 1x1 conv to the logits: at 80 classes the 3x3 conv at P3 was the
      head's largest single cost in ONNX Runtime (`benchmarks/ort_profile.py`).

    With a shared trunk all levels must reach it with one width. An FPN's levels already have it and feed the first
    inter conv directly, as the reference. Levels of unequal widths (a YOLO neck's P3-P5) are each projected to
    `feat_channels` by a 1x1 conv + norm + act: the 1x1 conv is the cheapest such map (an FPN's lateral conv), and its
    norm gives the shared convs comparably scaled inputs from levels whose statistics differ (deep P5 vs shallow P3),
    as the reference's FPN outputs are on one scale.
    """

    # Ultralytics' `BaseModel.load`/`is_fused` read Detect's box/cls branch lists; the T-head has none
    cv2, cv3 = (), None
    # `anchor_grid`'s cache: the (level sizes, device, dtype) its anchor points were computed for
    _anchor_key, _anchor_points = None, None
    # Training outputs are decoded (xyxy boxes, probabilities), not Detect's distances and logits: what the losses
    # below the network (`tood_yolo.utils.loss`) read, so that they need not import the head
    decoded = True

    def __init__(
        self,
        nc: int = 80,
        feat_channels: int = 256,
        stacked_convs: int = 6,
        num_dcn: int = 0,
        anchor_type: str = "anchor_free",
        anchor_offset: float = 0.0,
        norm_groups: int = 32,
        norm: str = "gn",
        trunk: str = "shared",
        reg: str = "ltrb",
        cls_pred: str = "conv",
        ch: tuple[int, ...] = (),
    ):
        nn.Module.__init__(self)  # Detect's own convs are not built: the T-head replaces them
        self._check_args(c=feat_channels, stacked_convs=stacked_convs, num_dcn=num_dcn, anchor_type=anchor_type,
                         norm_groups=norm_groups, norm=norm, trunk=trunk, reg=reg, cls_pred=cls_pred, ch=ch)
        self.nc, self.nl, self.reg_max, self.no = nc, len(ch), 1, nc + 4  # reg_max 1: the head outputs boxes
        self.stride = torch.zeros(self.nl)
        self.feat_channels, self.stacked_convs, self.num_dcn = feat_channels, stacked_convs, num_dcn
        self.anchor_type, self.anchor_offset = anchor_type, float(anchor_offset)
        self.norm, self.trunk, self.reg, self.cls_pred = norm, trunk, reg, cls_pred
        self.dfl = DFL(DFL_BINS) if reg == "dfl" else nn.Identity()
        c, g = feat_channels, norm_groups
        if trunk == "shared":
            equal = len(set(ch)) == 1  # see the class docstring: unequal widths are projected to c
            proj = () if equal else (conv_norm_act(norm, ci, c, 1, groups=g) for ci in ch)
            self.proj = nn.ModuleList(proj)
            layers = self._task_layers(ch[0] if equal else c, nc, g, self.nl)
        else:
            self.proj = nn.ModuleList()
            per_level = [self._task_layers(ci, nc, g, 1) for ci in ch]
            layers = {name: PerLevel(lv[name] for lv in per_level) for name in per_level[0]}
        for name, module in layers.items():
            setattr(self, name, module)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(self.nl) if reg == "ltrb")  # DFL bins are in strides
        self.init_weights()

    def _check_args(self, c, stacked_convs, num_dcn, anchor_type, norm_groups, norm, trunk, reg, cls_pred, ch) -> None:
        """A clear error for each argument outside the family."""
        choices = {"anchor_type": (anchor_type, ("anchor_free", "anchor_based")), "norm": (norm, ("gn", "bn")),
                   "trunk": (trunk, TRUNKS), "reg": (reg, REGS), "cls_pred": (cls_pred, CLS_PREDS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"TOODHead {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if cls_pred == "dw" and (trunk, norm) != ("level", "bn"):
            raise ValueError("TOODHead cls_pred='dw' is built for per-level BatchNorm trunks (trunk='level', "
                             "norm='bn'): its BatchNorm would be shared by the levels of a shared trunk")
        if reg == "dfl" and anchor_type != "anchor_free":
            raise ValueError("TOODHead reg='dfl' predicts distances from anchor points: it needs anchor_free")
        if stacked_convs < 1:
            raise ValueError(f"TOODHead stacked_convs={stacked_convs} must be >= 1 (task decomposition needs them)")
        if not 0 <= num_dcn <= stacked_convs:
            raise ValueError(f"TOODHead num_dcn={num_dcn} must lie in [0, stacked_convs={stacked_convs}]")
        if norm == "gn" and (norm_groups < 1 or c % norm_groups):
            raise ValueError(
                f"TOODHead feat_channels={c} must be a multiple of {norm_groups} (GroupNorm groups, "
                f"norm_groups={norm_groups})"
            )
        if isinstance(ch, int) or not ch:
            raise ValueError(f"TOODHead needs a list of input maps (P3, P4, ...), got input channels {ch}")

    def _task_layers(self, c1: int, nc: int, g: int, levels: int) -> dict[str, nn.Module]:
        """The layers of one trunk, in the reference's order: inter convs (the first reads `c1` channels), the two
        task decompositions, the predictors of P and boxes, and M's and O's branches. `g`: GroupNorm groups;
        `levels`: how many levels share the layers (each gets its own BatchNorm)."""
        c, s, norm = self.feat_channels, self.stacked_convs, self.norm
        return {
            "inter_convs": nn.ModuleList(
                conv_norm_act(norm, c1 if i == 0 else c, c, dcn=i < self.num_dcn, groups=g, levels=levels)
                for i in range(s)
            ),
            "cls_decomp": TaskDecomposition(c, s, s * 8, g, norm, levels),
            "reg_decomp": TaskDecomposition(c, s, s * 8, g, norm, levels),
            "tood_cls": (nn.Sequential(DWConv(c, c, 3), nn.Conv2d(c, nc, 1)) if self.cls_pred == "dw"
                         else nn.Conv2d(c, nc, 3, padding=1)),
            # 3x3, as the paper's: cheaper DFL predictors (a 1x1 conv, or a depthwise 3x3 + 1x1) lost 6-15 points of
            # mAP50-95 on bccd val (docs/results.md)
            "tood_reg": nn.Conv2d(c, 4 * DFL_BINS if self.reg == "dfl" else 4, 3, padding=1),
            # mmdet's names for M's and O's branches, kept for its checkpoints
            "cls_prob_module": nn.Sequential(
                nn.Conv2d(c * s, c // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(c // 4, 1, 3, padding=1)
            ),
            "reg_offset_module": nn.Sequential(
                nn.Conv2d(c * s, c // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(c // 4, 8, 3, padding=1)
            ),
        }

    def __setstate__(self, state: dict) -> None:
        """Unpickle; older checkpoints lack the family's choices (they hold the paper's head) and, before the
        multi-input form, `proj` (their levels had one width)."""
        super().__setstate__(state)
        self._modules.setdefault("proj", nn.ModuleList())
        for k, v in (("norm", "gn"), ("trunk", "shared"), ("reg", "ltrb"), ("cls_pred", "conv")):
            self.__dict__.setdefault(k, v)

    @property
    def one2many(self) -> dict:
        """The T-head has no separate box/cls branches to hand to `forward_head`."""
        return {}

    def init_weights(self) -> None:
        """The reference's initialisation (normal std 0.01 / 0.001, prior-probability biases), level by level for
        per-level trunks."""
        bias_cls = bias_init_with_prob(PRIOR_PROB)

        def normal(m: nn.Module, std: float, bias: float = 0.0) -> None:
            nn.init.normal_(m.weight, 0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, bias)

        for m in (*self.proj, *(conv for convs in every(self.inter_convs) for conv in convs)):
            normal(m.conv.conv if isinstance(m.conv, ModulatedDeformConv) else m.conv, 0.01)
        for cls_prob in every(self.cls_prob_module):
            for m in cls_prob:
                if isinstance(m, nn.Conv2d):
                    normal(m, 0.01)
            normal(cls_prob[-1], 0.01, bias_cls)
        for reg_offset in every(self.reg_offset_module):
            for m in reg_offset:
                if isinstance(m, nn.Conv2d):
                    normal(m, 0.001)
        for decomp in (*every(self.cls_decomp), *every(self.reg_decomp)):
            for m in decomp.layer_attention:
                if isinstance(m, nn.Conv2d):
                    normal(m, 0.001)
            normal(decomp.reduction_conv, 0.01)
        for m in every(self.tood_cls):
            normal(m[-1] if isinstance(m, nn.Sequential) else m, 0.01, bias_cls)  # "dw": DWConv keeps its own init
        for m in every(self.tood_reg):
            normal(m, 0.01)

    def bias_init(self) -> None:
        """Ultralytics calls this after computing strides; the reference's init already set every bias."""

    def forward_level(self, x: torch.Tensor, i: int, anchor_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the T-head on one pyramid level.

        Args:
            x (torch.Tensor): (B, C_in, H, W) input map of level i.
            i (int): Level index (selects the projection, per-level layers or BatchNorms, and the Scale).
            anchor_points (torch.Tensor): (H*W, 2) anchor centres (x, y) of this level in stride units.

        Returns:
            (dict): "cls_logits" (B, nc, H, W) class logits (P before its sigmoid), "m_logits" (B, 1, H, W) logits of
                the alignment map M, "score" (B, nc, H, W) aligned scores sqrt(P * M), "box_raw" (B, 4, H, W) xyxy
                before alignment, "offset" (B, 8, H, W) O, "box" (B, 4, H, W) xyxy after alignment (stride units),
                "cls_attn"/"reg_attn" (B, stacked_convs) layer weights; with `reg="dfl"`, unless exporting, "dist"
                (B, 4 * 16, H, W) log-probabilities of the distributions behind "box".
        """
        b, _, h, w = x.shape
        if self.proj:
            x = self.proj[i](x)
        inter_feats = []
        for conv in at(self.inter_convs, i):
            x = conv(x, i)
            inter_feats.append(x)
        feat = torch.cat(inter_feats, 1)
        avg_feat = F.adaptive_avg_pool2d(feat, (1, 1))
        cls_attn, reg_attn = at(self.cls_decomp, i).attention(avg_feat), at(self.reg_decomp, i).attention(avg_feat)
        cls_feat, reg_feat, m_hidden, offset_hidden = self.read_feat(feat, cls_attn, reg_attn, i)
        cls_logits = at(self.tood_cls, i)(cls_feat)
        m_logits = at(self.cls_prob_module, i)[2](m_hidden)
        score = sigmoid_geometric_mean(cls_logits, m_logits)

        reg = at(self.tood_reg, i)(reg_feat)
        offset = at(self.reg_offset_module, i)[2](offset_hidden).float()
        points = anchor_points.view(1, h, w, 2).permute(0, 3, 1, 2).float()  # (1, 2, H, W)
        out = {"cls_logits": cls_logits, "m_logits": m_logits, "score": score, "offset": offset}
        if self.reg == "dfl":
            out.update(self.align_dfl(reg.float(), offset, points))
        else:
            if self.anchor_type == "anchor_free":  # ltrb distances: Scale after exp, no ReLU, as the reference
                dist = self.scales[i](reg.exp()).float()
                box_raw = torch.cat((points - dist[:, :2], points + dist[:, 2:]), 1)
            else:  # deltas against one square anchor of 8 strides per location
                deltas = self.scales[i](reg).float().permute(0, 2, 3, 1)
                anchors = torch.cat((points - 4, points + 4), 1).permute(0, 2, 3, 1)
                box_raw = delta2bbox(anchors, deltas).permute(0, 3, 1, 2)
            out.update(box_raw=box_raw, box=align_boxes(box_raw, offset))
        return {**out, "cls_attn": cls_attn, "reg_attn": reg_attn}

    def align_dfl(self, logits: torch.Tensor, offset: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Box alignment for DFL distances: each side's distribution is sampled at that side's offset.

        The sampled side is the box's side as predicted from the sampling point p + o (x1 = p_x + o_x - d_l, ...), as
        the paper samples box coordinates. The boxes come from Ultralytics' `DFL` expectation, sampled bilinearly,
        which equals the expectation of the bilinearly sampled distribution (the expectation is linear); edges are
        sampled with border padding, so that a sample is a distribution. Where alignment leaves x1 > x2 or y1 > y2,
        the unaligned box and distributions are kept, as `align_boxes` does.

        Args:
            logits (torch.Tensor): (B, 4 * 16, H, W) distribution logits, side-major (l, t, r, b).
            offset (torch.Tensor): (B, 8, H, W) O, as `align_boxes` reads it.
            points (torch.Tensor): (1, 2, H, W) anchor points (x, y), stride units.

        Returns:
            (dict): "box_raw", "box" (B, 4, H, W) xyxy before / after alignment, and, unless exporting, "dist"
                (B, 4 * 16, H, W) the log-probabilities of the distributions behind "box".
        """
        b, _, h, w = logits.shape
        r = self.dfl.c1
        sign = logits.new_tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1)
        origin = torch.cat((points, points), 1)  # (x, y, x, y); slices and cats only, for NCNN (no index layer)
        dist_raw = self.dfl(logits.view(b, 4 * r, h * w)).view(b, 4, h, w)
        box_raw = origin + sign * dist_raw
        # x1 and x2 move with their dx, y1 and y2 with their dy: channels dx_x1, dy_y1 (1, 2), dx_x2, dy_y2 (5, 6) of O
        shift = torch.cat((offset[:, 1:3], offset[:, 5:7]), 1)
        box = origin + shift + sign * deform_sampling(dist_raw, offset, "border")
        invalid = inverted(box)
        out = {"box_raw": box_raw, "box": select(invalid, box_raw, box)}
        if not self.export:
            probs = logits.view(b, 4, r, h, w).softmax(2)
            # the r bins of a side share the side's offset: one sampler of r channels per side
            sampled = deform_sampling(probs.view(b, 4 * r, h, w), offset, "border", group=r).view(b, 4, r, h, w)
            dist = select(invalid.unsqueeze(2), probs, sampled)
            out["dist"] = dist.clamp(min=torch.finfo(dist.dtype).tiny).log().view(b, 4 * r, h, w)
        return out

    def read_feat(
        self, feat: torch.Tensor, cls_attn: torch.Tensor, reg_attn: torch.Tensor, level: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four ops that read the (B, stacked_convs*C, H, W) inter features of `level`, fused into two passes.

        Both task decompositions are one bmm (their per-image weights stacked) and the first 1x1 convs of M and O are
        one conv (their weights stacked). Output channels are computed independently, so the values are those of the
        separate ops (tests/test_yolo_neck.py), but the largest tensor of the head is read twice instead of four times:
        about 5% of yolo11n-tood's ONNX Runtime time at 640.

        Returns:
            (tuple): (B, C, H, W) classification and regression features (decomposition, norm, act), and the
                (B, C/4, H, W) hidden maps of M and O (after ReLU).
        """
        b, _, h, w = feat.shape
        c = self.feat_channels
        cls_decomp, reg_decomp = at(self.cls_decomp, level), at(self.reg_decomp, level)
        weight = torch.cat((cls_decomp.scaled_weight(cls_attn, level), reg_decomp.scaled_weight(reg_attn, level)), 1)
        cls_feat, reg_feat = torch.bmm(weight, feat.view(b, weight.shape[2], -1)).view(b, 2 * c, h, w).split(c, 1)
        cls_feat, reg_feat = cls_decomp.norm_act(cls_feat, level), reg_decomp.norm_act(reg_feat, level)
        m, o = at(self.cls_prob_module, level)[0], at(self.reg_offset_module, level)[0]
        hidden = F.relu(F.conv2d(feat, torch.cat((m.weight, o.weight)), torch.cat((m.bias, o.bias))))
        m_hidden, offset_hidden = hidden.split(m.out_channels, 1)
        return cls_feat, reg_feat, m_hidden, offset_hidden

    def anchor_grid(self, x: list[torch.Tensor]) -> torch.Tensor:
        """(A, 2) anchor centres (x, y) in stride units of the levels `x`, level by level (`make_anchors`).

        In training and for dynamic exports they are computed in the graph. Otherwise they are kept per input size,
        device and dtype and reused, as `Detect` keeps its anchors: a static export (the exporter's dry run fills
        the cache) then traces them as a constant, since pnnx (NCNN) cannot convert `make_anchors`' meshgrid.
        """
        if self.training or self.dynamic:
            return make_anchors(x, torch.ones(self.nl), self.anchor_offset)[0]
        key = (tuple(xi.shape[2:] for xi in x), x[0].device, x[0].dtype)
        if changed(key, self._anchor_key):
            self._anchor_points = make_anchors(x, torch.ones(self.nl), self.anchor_offset)[0]
            self._anchor_key = key
        return self._anchor_points

    def forward_levels(self, x: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """`forward_level` on every level: the per-level maps (`tood_yolo.tools.maps` draws them)."""
        anchor_points = self.anchor_grid(x)
        out, start = [], 0
        for i, xi in enumerate(x):
            n = xi.shape[2] * xi.shape[3]
            out.append(self.forward_level(xi, i, anchor_points[start : start + n]))
            start += n
        return out

    def forward_head(self, x: list[torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        """Concatenate the levels' aligned boxes (B, 4, A) and scores (B, nc, A), and with DFL the distributions
        (B, 4 * 16, A); A = sum of H*W over levels."""
        levels, bs = self.forward_levels(x), x[0].shape[0]
        out = {key: torch.cat([o[k].view(bs, o[k].shape[1], -1) for o in levels], -1)
               for key, k in (("boxes", "box"), ("scores", "score"), ("dists", "dist")) if k in levels[0]}
        return {**out, "feats": x}

    def _inference(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 4 + nc, A): boxes in pixels (xywh, or xyxy for end-to-end/xyxy exports) and the aligned scores."""
        shape = x["feats"][0].shape
        if self.dynamic or changed(shape, self.shape):
            self.strides = make_anchors(x["feats"], self.stride, self.anchor_offset)[1].transpose(0, 1)
            self.shape = shape
        boxes = x["boxes"] * self.strides
        if not (self.end2end or self.xyxy):
            boxes = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1)
        return torch.cat((boxes, x["scores"]), 1)

    def fuse(self) -> None:
        """Fold every BatchNorm of the head into its conv; Ultralytics' `fuse()` calls this for its `Detect` heads."""
        for m in list(self.modules()):
            if isinstance(m, (ConvBNAct, TaskDecomposition)):
                m.fuse()
            elif isinstance(m, Conv) and hasattr(m, "bn"):  # the "dw" class predictor, folded as Ultralytics folds it
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse

    def is_fused(self) -> bool:
        """Whether `fuse` has nothing left to fold."""
        return not any(isinstance(m, (ConvBNAct, TaskDecomposition, Conv)) and hasattr(m, "bn") for m in self.modules())
