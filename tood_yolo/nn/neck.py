"""Feature pyramid network giving P3-P7 as the TOOD reference configures mmdet's FPN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """FPN with extra stride-2 levels taken from the last output (mmdet `add_extra_convs='on_output'`).

    1x1 lateral convs, top-down nearest-neighbour upsampling and summation, 3x3 output convs, then
    `num_outs - len(inputs)` extra 3x3 stride-2 convs, the first on the last output map, without ReLU between them
    (`relu_before_extra_convs=False`). Convs have biases and Xavier-uniform init, as the reference.

    YAML: `[[C3, C4, C5], 1, FPN, [out_channels, num_outs]]` (or `[backbone, 1, FPN, ...]` when the backbone returns
    the list); the input channels are filled in by the model parser. The paper's R-50 model uses `[256, 5]`.

    Returns:
        (list[torch.Tensor]): `num_outs` maps of `out_channels`, strides doubling from the first input's.
    """

    def __init__(self, out_channels: int = 256, num_outs: int = 5, ch: list[int] | tuple[int, ...] = ()):
        super().__init__()
        if isinstance(ch, int) or len(ch) < 2:
            raise ValueError(f"FPN needs a list of at least 2 input maps, got input channels {ch}")
        if num_outs < len(ch):
            raise ValueError(f"FPN num_outs={num_outs} is fewer than its {len(ch)} inputs")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in ch)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in ch)
        self.fpn_convs.extend(nn.Conv2d(out_channels, out_channels, 3, 2, 1) for _ in range(num_outs - len(ch)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(xi) for conv, xi in zip(self.lateral_convs, x)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        n = len(laterals)
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs[:n], laterals)]
        for conv in self.fpn_convs[n:]:
            outs.append(conv(outs[-1]))
        return outs
