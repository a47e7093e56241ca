"""ResNet / ResNeXt backbone for model YAMLs, in torchvision's layout so ImageNet weights load by name."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models import resnet as tv_resnet
from ultralytics.utils import LOGGER, is_online

from .ops import ModulatedDeformConv

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # mmdet's (123.675, 116.28, 103.53) / 255, RGB
IMAGENET_STD = (0.229, 0.224, 0.225)  # mmdet's (58.395, 57.12, 57.375) / 255
ULTRALYTICS_PAD = 114 / 255  # Ultralytics' letterbox grey

ARCHS = {  # depth -> (block, blocks per stage)
    18: (tv_resnet.BasicBlock, (2, 2, 2, 2)),
    34: (tv_resnet.BasicBlock, (3, 4, 6, 3)),
    50: (tv_resnet.Bottleneck, (3, 4, 6, 3)),
    101: (tv_resnet.Bottleneck, (3, 4, 23, 3)),
    152: (tv_resnet.Bottleneck, (3, 8, 36, 3)),
}


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics (mmdet's `norm_eval=True`).

    Its affine weight and bias still train, as in the reference (`norm_cfg=dict(type='BN', requires_grad=True)`).
    A subclass, so Ultralytics' `initialize_weights` (which retunes plain `nn.BatchNorm2d` eps) leaves it alone.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freeze(module: nn.Module) -> None:
    """Turn every parameter of `module` into a buffer of the same name.

    Ultralytics' trainer sets `requires_grad=True` on every floating-point parameter outside its `freeze` list, so
    `requires_grad=False` alone would not keep the reference's frozen stages frozen. State-dict keys are unchanged.
    """
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            delattr(m, name)
            m.register_buffer(name, p.detach())


def resnet_arch(depth: int, groups: int = 1, width_per_group: int = 64) -> str:
    """torchvision's name of a ResNet / ResNeXt, e.g. 'resnet50', 'resnext101_64x4d'."""
    return f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{width_per_group}d"


def imagenet_archs(model_yaml: dict) -> list[str]:
    """The archs of a model YAML's ResNets that ask for ImageNet weights (`weights: imagenet`)."""
    return [resnet_arch(*row[3][:3]) for row in resnet_rows(model_yaml) if len(row[3]) > 5 and row[3][5] == "imagenet"]


def torchvision_cache_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet (IMAGENET1K_V1) checkpoint of `arch`, e.g. 'resnet50', once downloaded."""
    url = get_model_weights(arch).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def fetch_imagenet(arch: str) -> Path:
    """The ImageNet checkpoint of `arch` in torch hub's cache, downloaded there first by torchvision's weights API
    (`IMAGENET1K_V1.get_state_dict`, as mmdet's `torchvision://` checkpoints) when it is missing and the machine is
    online. Offline (`YOLO_OFFLINE=1` or no network) a missing file is a `FileNotFoundError` naming it and how to
    get it: a training run must not silently start the paper's recipe from random weights."""
    file = torchvision_cache_file(arch)
    if file.exists():
        return file
    weights = get_model_weights(arch).IMAGENET1K_V1
    if not is_online():
        raise FileNotFoundError(
            f"ImageNet weights for {arch} not found at {file}, and offline (YOLO_OFFLINE=1 or no network) they cannot "
            f"be downloaded. Download {weights.url} into {file.parent} (or run once online: torchvision fetches it "
            f"there), or train from random init with pretrained=False."
        )
    LOGGER.info(f"Downloading ImageNet weights for {arch} into {file.parent} (torchvision {weights})")
    weights.get_state_dict(progress=True)
    return file


def resnet_rows(model_yaml: dict) -> list[list]:
    """The `ResNet` rows of a model YAML dict (its args: depth, groups, width, frozen, dcn stages, weights)."""
    return [row for row in model_yaml.get("backbone", []) + model_yaml.get("head", []) if row[2] == "ResNet"]


def without_backbone_weights(model_yaml: dict) -> dict:
    """A copy of a model YAML dict whose ResNets ask for no weights (random init): for a model whose weights come
    from a checkpoint, or a run asked to start from random init (`pretrained=False`)."""
    d = deepcopy(model_yaml)
    for row in resnet_rows(d):
        if len(row[3]) > 5:
            row[3] = [*row[3][:5], None, *row[3][6:]]
    return d


def input_pad_value(model: nn.Module) -> tuple[float, ...]:
    """Padding colour in [0, 1] RGB as the reference pads (0 after its normalisation): the ImageNet mean for models
    with a ResNet (which normalises inside), Ultralytics' grey for the others (which take [0, 1] as it is)."""
    if any(isinstance(m, ResNet) for m in model.modules()):
        return tuple(IMAGENET_MEAN)
    return (ULTRALYTICS_PAD,) * 3


class ResNet(tv_resnet.ResNet):
    """ResNet / ResNeXt (torchvision v1.5 layout, mmdet `style='pytorch'`) returning C3, C4 and C5.

    Takes RGB in [0, 1] (Ultralytics' input) and normalises it with ImageNet mean/std inside, as the reference's data
    pre-processor does. BatchNorm runs on its running statistics; the stem and the first `frozen_stages` stages are
    frozen, as the reference's `frozen_stages=1, norm_eval=True`.

    YAML: `[-1, 1, ResNet, [depth, groups, width_per_group, frozen_stages, dcn_stages, weights]]`, e.g. `[50]`
    (R-50), `[101, 64, 4]` (X-101-64x4d), `[101, 1, 64, 1, [2, 3, 4]]` (R-101 with DCNv2 in stages 2-4).
    `weights`: None (random init), "imagenet" (torchvision's ImageNet checkpoint from the local torch hub cache; a
    warning and random init if it is not there: building a model downloads nothing; `TOODTrainer` fetches the file,
    or stops, before it builds a model to train, `fetch_imagenet`), or the path of a torchvision-layout state dict
    (missing file: an error).

    Returns:
        (list[torch.Tensor]): [C3 (B, c, H/8, W/8), C4 (B, 2c, H/16, W/16), C5 (B, 4c, H/32, W/32)], c = 512 for
            R-50/101 and ResNeXt, 128 for R-18/34.
    """

    def __init__(
        self,
        depth: int = 50,
        groups: int = 1,
        width_per_group: int = 64,
        frozen_stages: int = 1,
        dcn_stages: tuple[int, ...] | list[int] = (),
        weights: str | None = None,
        ch: int = 3,
    ):
        if depth not in ARCHS:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCHS)}, got {depth}")
        if ch != 3:
            raise ValueError(f"ResNet takes a 3-channel RGB image, got {ch} input channels")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"ResNet frozen_stages must lie in [0, 4], got {frozen_stages}")
        if not set(dcn_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"ResNet dcn_stages must be stage numbers in 1..4, got {list(dcn_stages)}")
        block, layers = ARCHS[depth]
        super().__init__(
            block, list(layers), groups=groups, width_per_group=width_per_group, norm_layer=EvalBatchNorm2d
        )
        del self.fc, self.avgpool
        self.arch = resnet_arch(depth, groups, width_per_group)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if dcn_stages:
            self._add_dcn(dcn_stages)
        if weights:
            self.load_weights(weights)
        if frozen_stages:
            freeze(
                nn.ModuleList(
                    [self.conv1, self.bn1, *(getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1))]
                )
            )

    def _add_dcn(self, stages) -> None:
        """Replace the 3x3 conv of every block in `stages` by a modulated deformable conv (mmdet DCNv2, 1 group)."""
        for s in stages:
            for blk in getattr(self, f"layer{s}"):
                conv = blk.conv2
                blk.conv2 = ModulatedDeformConv(
                    conv.in_channels, conv.out_channels, 3, conv.stride[0], deform_groups=1, groups=conv.groups
                )

    def load_weights(self, weights: str | Path) -> None:
        """Load a torchvision-layout ImageNet state dict (the classifier `fc.*` is dropped); see the class doc."""
        if weights == "imagenet":
            file = torchvision_cache_file(self.arch)
            if not file.exists():
                LOGGER.warning(
                    f"ImageNet weights for {self.arch} not found at {file}; the backbone starts from random init. "
                    f"The paper's recipe starts from them: copy torchvision's {file.name} there (it is never "
                    f"downloaded at run time) or pass a weights path in the model YAML."
                )
                return
        else:
            file = Path(weights)
            if not file.exists():
                raise FileNotFoundError(f"ResNet weights file '{file}' does not exist")
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        dcn = {n for n, m in self.named_modules() if isinstance(m, ModulatedDeformConv)}
        # a DCN stage keeps torchvision's 3x3 weight one level down, beside its own offset conv
        state = {(f"{k.rpartition('.')[0]}.conv.{k.rpartition('.')[2]}" if k.rpartition(".")[0] in dcn else k): v
                 for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        # DCN offset convs are zero-initialised, not in ImageNet
        missing = [k for k in missing if "conv_offset" not in k]
        if missing or unexpected:
            raise ValueError(f"{file} does not match {self.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        LOGGER.info(f"Loaded {self.arch} ImageNet weights from {file}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]
