"""TOOD's task-aligned head (T-head) as an Ultralytics `Detect` subclass.

Faithful to mmdetection 3.3.0's `TOODHead` (mmdet/models/dense_heads/tood_head.py) and the paper (arXiv:2108.07755,
section 3.1): task-interactive features, layer attention, the classification alignment map M and the localisation
alignment map O. Outputs keep Ultralytics' inference layout so that its validator, predictor, NMS and exporter work
unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Detect
from ultralytics.utils.tal import make_anchors

from .ops import ConvGNReLU, ModulatedDeformConv, Scale, align_boxes, delta2bbox, sigmoid_geometric_mean

PRIOR_PROB = 0.01  # the reference's initial foreground probability (bias -4.595)


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias of a sigmoid classifier whose initial output is `prior_prob`."""
    return -math.log((1 - prior_prob) / prior_prob)


class TaskDecomposition(nn.Module):
    """Layer attention over the stacked inter-conv features, then a 1x1 reduction to one task's features.

    The attention gives one weight per inter layer per image (sigmoid), which scales the matching input-channel block
    of the reduction conv's weight (the reference's memory-saving form of "scale each layer, then 1x1 conv").
    """

    def __init__(self, feat_channels: int, stacked_convs: int, la_down_rate: int = 8, norm_groups: int = 32):
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
        self.gn = nn.GroupNorm(norm_groups, feat_channels)
        self.act = nn.ReLU(inplace=True)

    def attention(self, avg_feat: torch.Tensor) -> torch.Tensor:
        """(B, stacked_convs*C, 1, 1) pooled features -> (B, stacked_convs) layer weights."""
        return self.layer_attention(avg_feat).flatten(1)

    def scaled_weight(self, attention: torch.Tensor) -> torch.Tensor:
        """(B, stacked_convs) layer weights -> (B, C, stacked_convs*C) per-image reduction weights."""
        b = attention.shape[0]
        weight = attention.view(b, 1, self.stacked_convs, 1)
        conv_weight = weight * self.reduction_conv.weight.view(1, self.feat_channels, self.stacked_convs, -1)
        return conv_weight.view(b, self.feat_channels, self.in_channels)

    def forward(self, feat: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """(B, stacked_convs*C, H, W) features and their (B, stacked_convs) layer weights -> (B, C, H, W)."""
        b, _, h, w = feat.shape
        out = torch.bmm(self.scaled_weight(attention), feat.view(b, self.in_channels, -1))
        return self.act(self.gn(out.view(b, self.feat_channels, h, w)))


class TOODHead(Detect):
    """TOOD's T-head: shared task-interactive features, task decomposition and the alignment maps M and O.

    YAML: `[[P3, P4, ...], 1, TOODHead, [nc, feat_channels, stacked_convs, num_dcn, anchor_type, anchor_offset,
    norm_groups]]` like Ultralytics' `Detect` (any number of levels, any widths), or `[FPN, 1, TOODHead, [...]]` on an
    FPN layer that returns the list of levels; the paper's defaults are `[nc, 256, 6, 0, "anchor_free", 0.0, 32]` and
    the input channels are filled in by the model parser. In training `forward` returns a dict: "boxes" (B, 4, A) xyxy
    in stride units after box alignment (the reference's `bbox_pred`), "scores" (B, nc, A) aligned probabilities
    sqrt(P * M), "feats" the input maps. In eval it returns Ultralytics' (B, 4 + nc, A) tensor of xywh pixel boxes and
    scores (and the dict, unless exporting).

    The inter convs are shared by all levels (one set of weights, as the paper's head), so all levels must reach them
    with one width. An FPN's levels already have it and feed the first inter conv directly, as the reference. Levels of
    unequal widths (a YOLO neck's P3-P5) are each projected to `feat_channels` by a 1x1 conv + GroupNorm + ReLU: the 1x1
    conv is the cheapest such map (an FPN's lateral conv), and its norm gives the shared convs comparably scaled inputs
    from levels whose statistics differ (deep P5 vs shallow P3), as the reference's FPN outputs are on one scale.
    """

    # Ultralytics' `BaseModel.load`/`is_fused` read Detect's box/cls branch lists; the T-head has none
    cv2, cv3 = (), None
    # `anchor_grid`'s cache: the (level sizes, device, dtype) its anchor points were computed for
    _anchor_key, _anchor_points = None, None

    def __init__(
        self,
        nc: int = 80,
        feat_channels: int = 256,
        stacked_convs: int = 6,
        num_dcn: int = 0,
        anchor_type: str = "anchor_free",
        anchor_offset: float = 0.0,
        norm_groups: int = 32,
        ch: tuple[int, ...] = (),
    ):
        nn.Module.__init__(self)  # Detect's own convs are not built: the T-head replaces them
        if anchor_type not in {"anchor_free", "anchor_based"}:
            raise ValueError(f"TOODHead anchor_type must be 'anchor_free' or 'anchor_based', got {anchor_type!r}")
        if stacked_convs < 1:
            raise ValueError(f"TOODHead stacked_convs={stacked_convs} must be >= 1 (task decomposition needs them)")
        if not 0 <= num_dcn <= stacked_convs:
            raise ValueError(f"TOODHead num_dcn={num_dcn} must lie in [0, stacked_convs={stacked_convs}]")
        if norm_groups < 1 or feat_channels % norm_groups:
            raise ValueError(
                f"TOODHead feat_channels={feat_channels} must be a multiple of {norm_groups} (GroupNorm groups, "
                f"norm_groups={norm_groups})"
            )
        if isinstance(ch, int) or not ch:
            raise ValueError(f"TOODHead needs a list of input maps (P3, P4, ...), got input channels {ch}")
        self.nc, self.nl, self.reg_max, self.no = nc, len(ch), 1, nc + 4
        self.stride = torch.zeros(self.nl)
        self.feat_channels, self.stacked_convs, self.num_dcn = feat_channels, stacked_convs, num_dcn
        self.anchor_type, self.anchor_offset = anchor_type, float(anchor_offset)
        self.dfl = nn.Identity()
        c, g = feat_channels, norm_groups
        equal = len(set(ch)) == 1  # see the class docstring: unequal widths are projected to c
        self.proj = nn.ModuleList() if equal else nn.ModuleList(ConvGNReLU(ci, c, groups=g, k=1) for ci in ch)
        self.inter_convs = nn.ModuleList(
            ConvGNReLU(ch[0] if i == 0 and equal else c, c, dcn=i < num_dcn, groups=g) for i in range(stacked_convs)
        )
        self.cls_decomp = TaskDecomposition(c, stacked_convs, stacked_convs * 8, g)
        self.reg_decomp = TaskDecomposition(c, stacked_convs, stacked_convs * 8, g)
        self.tood_cls = nn.Conv2d(c, nc, 3, padding=1)
        self.tood_reg = nn.Conv2d(c, 4, 3, padding=1)
        cc = c * stacked_convs
        self.cls_prob_module = nn.Sequential(
            nn.Conv2d(cc, c // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(c // 4, 1, 3, padding=1)
        )
        self.reg_offset_module = nn.Sequential(
            nn.Conv2d(cc, c // 4, 1), nn.ReLU(inplace=True), nn.Conv2d(c // 4, 8, 3, padding=1)
        )
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(self.nl))
        self.init_weights()

    def __setstate__(self, state: dict) -> None:
        """Unpickle; checkpoints saved before the multi-input form have no `proj` (their levels had one width)."""
        super().__setstate__(state)
        self._modules.setdefault("proj", nn.ModuleList())

    @property
    def one2many(self) -> dict:
        """The T-head has no separate box/cls branches to hand to `forward_head`."""
        return {}

    def init_weights(self) -> None:
        """The reference's initialisation (normal std 0.01 / 0.001, prior-probability biases)."""
        bias_cls = bias_init_with_prob(PRIOR_PROB)

        def normal(m: nn.Module, std: float, bias: float = 0.0) -> None:
            nn.init.normal_(m.weight, 0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, bias)

        for m in (*self.proj, *self.inter_convs):
            normal(m.conv.conv if isinstance(m.conv, ModulatedDeformConv) else m.conv, 0.01)
        for m in self.cls_prob_module:
            if isinstance(m, nn.Conv2d):
                normal(m, 0.01)
        normal(self.cls_prob_module[-1], 0.01, bias_cls)
        for m in self.reg_offset_module:
            if isinstance(m, nn.Conv2d):
                normal(m, 0.001)
        for decomp in (self.cls_decomp, self.reg_decomp):
            for m in decomp.layer_attention:
                if isinstance(m, nn.Conv2d):
                    normal(m, 0.001)
            normal(decomp.reduction_conv, 0.01)
        normal(self.tood_cls, 0.01, bias_cls)
        normal(self.tood_reg, 0.01)

    def bias_init(self) -> None:
        """Ultralytics calls this after computing strides; the reference's init already set every bias."""

    def forward_level(self, x: torch.Tensor, i: int, anchor_points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the T-head on one FPN level.

        Args:
            x (torch.Tensor): (B, C_in, H, W) input map of level i.
            i (int): Level index (selects the projection, if any, and the Scale).
            anchor_points (torch.Tensor): (H*W, 2) anchor centres (x, y) of this level in stride units.

        Returns:
            (dict): "cls_logits" (B, nc, H, W) class logits (P before its sigmoid), "m_logits" (B, 1, H, W) logits of
                the alignment map M, "score" (B, nc, H, W) aligned scores sqrt(P * M), "box_raw" (B, 4, H, W) xyxy
                before alignment, "offset" (B, 8, H, W) O, "box" (B, 4, H, W) xyxy after alignment (stride units),
                "cls_attn"/"reg_attn" (B, stacked_convs) layer weights.
        """
        b, _, h, w = x.shape
        if self.proj:
            x = self.proj[i](x)
        inter_feats = []
        for conv in self.inter_convs:
            x = conv(x)
            inter_feats.append(x)
        feat = torch.cat(inter_feats, 1)
        avg_feat = F.adaptive_avg_pool2d(feat, (1, 1))
        cls_attn, reg_attn = self.cls_decomp.attention(avg_feat), self.reg_decomp.attention(avg_feat)
        cls_feat, reg_feat, m_hidden, offset_hidden = self.read_feat(feat, cls_attn, reg_attn)
        cls_logits = self.tood_cls(cls_feat)
        m_logits = self.cls_prob_module[2](m_hidden)  # mmdet's name for M's branch, kept for its checkpoints
        score = sigmoid_geometric_mean(cls_logits, m_logits)

        reg = self.tood_reg(reg_feat)
        points = anchor_points.view(1, h, w, 2).permute(0, 3, 1, 2).float()  # (1, 2, H, W)
        if self.anchor_type == "anchor_free":  # ltrb distances: Scale after exp, no ReLU, as the reference
            dist = self.scales[i](reg.exp()).float()
            box_raw = torch.cat((points - dist[:, :2], points + dist[:, 2:]), 1)
        else:  # deltas against one square anchor of 8 strides per location
            deltas = self.scales[i](reg).float().permute(0, 2, 3, 1)
            anchors = torch.cat((points - 4, points + 4), 1).permute(0, 2, 3, 1)
            box_raw = delta2bbox(anchors, deltas).permute(0, 3, 1, 2)
        offset = self.reg_offset_module[2](offset_hidden).float()
        return {
            "cls_logits": cls_logits,
            "m_logits": m_logits,
            "score": score,
            "box_raw": box_raw,
            "offset": offset,
            "box": align_boxes(box_raw, offset),
            "cls_attn": cls_attn,
            "reg_attn": reg_attn,
        }

    def read_feat(
        self, feat: torch.Tensor, cls_attn: torch.Tensor, reg_attn: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four ops that read the (B, stacked_convs*C, H, W) inter features, fused into two passes over them.

        Both task decompositions are one bmm (their per-image weights stacked) and the first 1x1 convs of M and O are
        one conv (their weights stacked). Output channels are computed independently, so the values are those of the
        separate ops (tests/test_yolo_neck.py), but the largest tensor of the head is read twice instead of four times:
        about 5% of yolo11n-tood's ONNX Runtime time at 640.

        Returns:
            (tuple): (B, C, H, W) classification and regression features (decomposition, GN, ReLU), and the
                (B, C/4, H, W) hidden maps of M and O (after ReLU).
        """
        b, _, h, w = feat.shape
        c = self.feat_channels
        weight = torch.cat((self.cls_decomp.scaled_weight(cls_attn), self.reg_decomp.scaled_weight(reg_attn)), 1)
        cls_feat, reg_feat = torch.bmm(weight, feat.view(b, weight.shape[2], -1)).view(b, 2 * c, h, w).split(c, 1)
        cls_feat = self.cls_decomp.act(self.cls_decomp.gn(cls_feat))
        reg_feat = self.reg_decomp.act(self.reg_decomp.gn(reg_feat))
        m, o = self.cls_prob_module[0], self.reg_offset_module[0]
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
        if key != self._anchor_key:
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
        """Concatenate the levels' aligned boxes (B, 4, A) and scores (B, nc, A); A = sum of H*W over levels."""
        levels, bs = self.forward_levels(x), x[0].shape[0]
        boxes = torch.cat([o["box"].view(bs, 4, -1) for o in levels], -1)
        scores = torch.cat([o["score"].view(bs, self.nc, -1) for o in levels], -1)
        return {"boxes": boxes, "scores": scores, "feats": x}

    def _inference(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 4 + nc, A): boxes in pixels (xywh, or xyxy for end-to-end/xyxy exports) and the aligned scores."""
        shape = x["feats"][0].shape
        if self.dynamic or self.shape != shape:
            self.strides = make_anchors(x["feats"], self.stride, self.anchor_offset)[1].transpose(0, 1)
            self.shape = shape
        boxes = x["boxes"] * self.strides
        if not (self.end2end or self.xyxy):
            boxes = torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]), 1)
        return torch.cat((boxes, x["scores"]), 1)
