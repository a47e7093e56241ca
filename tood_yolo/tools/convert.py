"""Convert an mmdetection TOOD checkpoint into an Ultralytics checkpoint.

Usage:
    python -m tood_yolo.tools.convert tood_r50_fpn_1x_coco.pth tood-r50.pt --cfg tood-r50.yaml [--half]

The result loads wherever this package is installed: `yolo val model=tood-r50.pt`, `yolo predict`, `yolo export`,
`ultralytics.YOLO("tood-r50.pt")`. For the paper's COCO protocol use `python -m tood_yolo.tools.evaluate` (800x1333
keep-ratio input, mmdet's test settings).

Which YAML for which reference checkpoint (mmdet 3.x names; mmdet 2.x / fcjian/TOOD spell them with underscores):

    tood_r50_fpn_1x_coco, tood_r50_fpn_ms-2x_coco          -> cfg/tood-r50.yaml
    tood_r50-fpn-anchor-based_1x_coco                      -> cfg/tood-r50-anchor.yaml
    tood_r101_fpn_ms-2x_coco                               -> cfg/tood-r101.yaml
    tood_r101-dconv-c3-c5_fpn_ms-2x_coco                   -> cfg/tood-r101-dcn.yaml
    tood_x101-64x4d_fpn_ms-2x_coco                         -> cfg/tood-x101.yaml
    tood_x101-64x4d-dconv-c4-c5_fpn_ms-2x_coco             -> cfg/tood-x101-dcn.yaml

The authors' own release (fcjian/TOOD, mmdet 2.14; the only source of the X-101-DCNv2 model, which the mmdet model
zoo lacks) names a few head layers differently: `{cls,reg}_decomp.la_conv{1,2}`, `cls_prob_conv{1,2}`,
`reg_offset_conv{1,2}`. They are renamed to mmdet's names first (`AUTHOR_ALIASES`); that code base also lacks the
invalid-box fallback of mmdet 3.x (PR #7567), which this model applies.

Key mapping. The backbone is torchvision's ResNet layout, as mmdet's (`backbone.conv1`, `backbone.bn1`,
`backbone.layerS.B.{conv,bn}{1,2,3}`, `backbone.layerS.0.downsample.{0,1}`), so its names carry over; the neck and the
head differ by mmcv's `ConvModule` nesting, and DCNv2 convs by where the weight sits:

    ours (model.<i>.<name>)                       mmdet
    ResNet ...                                    backbone....
    <dcn>.conv.weight                             <dcn>.weight              (ModulatedDeformConv2dPack)
    <dcn>.conv_offset.{weight,bias}               <dcn>.conv_offset.{weight,bias}
    FPN lateral_convs.i.{weight,bias}             neck.lateral_convs.i.conv.{weight,bias}
    FPN fpn_convs.i.{weight,bias}                 neck.fpn_convs.i.conv.{weight,bias}   (i >= 3: extra convs)
    TOODHead inter_convs.i.conv.weight            bbox_head.inter_convs.i.conv.weight
    TOODHead inter_convs.i.gn.{weight,bias}       bbox_head.inter_convs.i.gn.{weight,bias}
    TOODHead {cls,reg}_decomp.reduction_conv.weight   bbox_head.{cls,reg}_decomp.reduction_conv.conv.weight
    TOODHead {cls,reg}_decomp.gn.{weight,bias}    bbox_head.{cls,reg}_decomp.reduction_conv.gn.{weight,bias}
    TOODHead everything else                      bbox_head.<same name> (layer_attention, tood_cls, tood_reg,
                                                  cls_prob_module, reg_offset_module, scales.i.scale)

A checkpoint key that is not consumed, a model key without a source, or a shape that differs raise a `ValueError`
naming every offending key (`num_batches_tracked` may be absent: it is never used in eval mode). The number of classes
is read from `bbox_head.tood_cls.weight`; the anchor type cannot be read from the weights (both variants have the same
tensors), so it comes from the YAML, checked against the config text stored in the checkpoint's meta when present.

Reading: the `.pth` is loaded by `tood_yolo.tools.safe_load.load_untrusted`, which imports and runs nothing the file
names (torch's weights_only unpickler, numpy arrays allowed, other objects replaced by inert stand-ins); a file that
needs more fails with a `ValueError` naming what it asked for.

Inputs: the reference normalises BGR->RGB pixels with mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375);
the converted model takes Ultralytics' RGB input in [0, 1] and applies the same normalisation inside the ResNet.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

# importing the package registers TOOD's YAML modules with Ultralytics
from ..nn.backbone import ResNet, without_backbone_weights
from ..nn.configs import find_config, read_config
from ..nn.head import TOODHead
from ..nn.neck import FPN
from ..nn.ops import ModulatedDeformConv
from .safe_load import load_untrusted

# A shipped config's name, found from any folder as `yolo` finds it (`tood_yolo.nn.configs.find_config`)
DEFAULT_CFG = "tood-r50.yaml"
ROLES = ((ResNet, "backbone"), (FPN, "neck"), (TOODHead, "bbox_head"))
AUTHOR_ALIASES = (  # fcjian/TOOD key pattern -> mmdet's
    (r"^bbox_head\.(cls|reg)_decomp\.la_conv1\.", r"bbox_head.\1_decomp.layer_attention.0."),
    (r"^bbox_head\.(cls|reg)_decomp\.la_conv2\.", r"bbox_head.\1_decomp.layer_attention.2."),
    (r"^bbox_head\.(cls_prob|reg_offset)_conv1\.", r"bbox_head.\1_module.0."),
    (r"^bbox_head\.(cls_prob|reg_offset)_conv2\.", r"bbox_head.\1_module.2."),
)
# The imgsz stored in the checkpoint (what `yolo predict/val` use unless told otherwise): a multiple of the largest
# stride (128), which Ultralytics requires, that letterboxes a 640x480 COCO image to 1024x768, close to the reference's
# 1067x800. The paper's protocol itself: tood_yolo.tools.evaluate.
PREDICT_IMGSZ = 1024


# ----------------------------------------------------------------------------------------------------------------------
# Reading mmdet checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def read_mmdet_checkpoint(checkpoint: str | Path | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state_dict, meta) of an mmdet checkpoint file or an already loaded checkpoint / state dict.

    Files are read by `load_untrusted`, which imports and runs nothing the file names: the tensors, class names and
    config text are plain data; objects of other classes in the meta (mmengine's message hub in mmdet 3.x) come back
    as inert stand-ins.
    """
    ckpt = load_untrusted(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(ckpt, dict):
        raise TypeError(f"an mmdet checkpoint is a dict with 'state_dict', got {type(ckpt).__name__}")
    meta = ckpt.get("meta") or {}
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise TypeError(f"an mmdet checkpoint's 'state_dict' is a dict of tensors, got {type(state).__name__}")
    state = {_mmdet_alias(k.removeprefix("module.")): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError("the mmdet checkpoint holds no tensors")
    return state, meta if isinstance(meta, dict) else {}


def _mmdet_alias(key: str) -> str:
    """mmdet's name for a key of the authors' release (fcjian/TOOD); other keys unchanged."""
    for pattern, repl in AUTHOR_ALIASES:
        key = re.sub(pattern, repl, key)
    return key


def class_names(meta: dict, nc: int) -> dict[int, str]:
    """Class names from mmdet's meta ('dataset_meta'['classes'] in 3.x, 'CLASSES' in 2.x), else COCO's when nc == 80.

    Only a list or tuple of `nc` strings counts (a meta entry can be a stand-in for an object of a foreign class).
    """
    dataset_meta = meta.get("dataset_meta")
    names = (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None) or meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and len(names) == nc and all(isinstance(n, str) for n in names):
        return {i: str(n) for i, n in enumerate(names)}
    if nc == 80:
        from ultralytics.utils import ROOT, YAML

        return dict(YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"])
    return {i: f"class{i}" for i in range(nc)}


def _meta_config_text(meta: dict) -> str:
    """The config text mmdet stores in the meta ('cfg' in mmdet 3.x, 'config' in 2.x), or ''."""
    for key in ("cfg", "config"):
        text = meta.get(key)
        if isinstance(text, str):
            return text
    return ""


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------------------
def _tood_parts(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """role ('backbone', 'neck', 'bbox_head') -> (state-dict prefix, module) of a ResNet + FPN + TOODHead model."""
    layers = model.model if hasattr(model, "model") else model
    parts = {}
    for i, m in enumerate(layers):
        for cls, role in ROLES:
            if isinstance(m, cls):
                if role in parts:
                    raise ValueError(f"the model has more than one {cls.__name__}; a TOOD reference model has one")
                parts[role] = (f"model.{i}.", m)
    missing = [cls.__name__ for cls, role in ROLES if role not in parts]
    if missing:
        raise ValueError(
            f"mmdet TOOD checkpoints convert into ResNet + FPN + TOODHead models; this model has no "
            f"{', '.join(missing)} (use one of cfg/tood-r50*.yaml, tood-r101*.yaml, tood-x101*.yaml)"
        )
    return parts


def _mmdet_name(role: str, name: str, dcn: set[str]) -> str:
    """mmdet's key for our parameter/buffer `name` of the `role` module (see the module docstring's table)."""
    head, _, leaf = name.rpartition(".")
    if head.endswith(".conv") and head[: -len(".conv")] in dcn:  # ModulatedDeformConv2dPack holds its weight itself
        name = f"{head[: -len('.conv')]}.{leaf}"
    if role == "neck":
        name = re.sub(r"^(lateral_convs|fpn_convs)\.(\d+)\.", r"\1.\2.conv.", name)
    elif role == "bbox_head":
        name = re.sub(r"^(cls|reg)_decomp\.reduction_conv\.", r"\1_decomp.reduction_conv.conv.", name)
        name = re.sub(r"^(cls|reg)_decomp\.gn\.", r"\1_decomp.reduction_conv.gn.", name)
    return f"{role}.{name}"


def mmdet_key_map(model: nn.Module) -> dict[str, str]:
    """Map every state-dict key of a TOOD `DetectionModel` (ResNet + FPN + TOODHead) to its mmdet checkpoint key."""
    mapping = {}
    for role, (prefix, module) in _tood_parts(model).items():
        dcn = {n for n, m in module.named_modules() if isinstance(m, ModulatedDeformConv)}
        for name in module.state_dict():
            mapping[prefix + name] = _mmdet_name(role, name, dcn)
    return mapping


def _summarise(keys: list, n: int = 12) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(str(k) for k in keys[:n]) + more


# ----------------------------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------------------------
def _model_yaml(cfg: str | Path | dict) -> dict:
    """The model YAML as a dict (a path, a shipped config's name from any folder, or a dict), with the ResNet `weights`
    argument cleared (the checkpoint supplies every weight)."""
    return without_backbone_weights(cfg if isinstance(cfg, dict) else read_config(cfg))


def _check_anchor_type(meta: dict, head: TOODHead) -> None:
    """Refuse an anchor-free YAML for an anchor-based checkpoint (or the reverse) when the meta's config tells."""
    found = re.findall(r"anchor_type\s*=\s*['\"](anchor_free|anchor_based)['\"]", _meta_config_text(meta))
    if found and found[-1] != head.anchor_type:
        raise ValueError(
            f"the checkpoint was trained with anchor_type='{found[-1]}' but the YAML's TOODHead uses "
            f"'{head.anchor_type}': use cfg/tood-r50-anchor.yaml for anchor-based checkpoints, cfg/tood-r50.yaml "
            f"otherwise"
        )


def load_mmdet_checkpoint(checkpoint: str | Path | dict, cfg: str | Path | dict | nn.Module = DEFAULT_CFG):
    """Build the TOOD model of `cfg` and load an mmdet TOOD checkpoint into it.

    Args:
        checkpoint (str | Path | dict): mmdet `.pth` file, or a loaded checkpoint ({'state_dict', 'meta'}) or a
            state dict.
        cfg (str | Path | dict | nn.Module): model YAML (path or dict) matching the checkpoint's architecture, or an
            already built TOOD `DetectionModel` to load into (in place).

    Returns:
        (DetectionModel): the model in eval mode, float32, with `names` set; `model(x)[0]` for RGB `x` in [0, 1] is
            (B, 4 + nc, A): xywh boxes in input pixels and the aligned scores, levels P3..P7 row-major.

    Raises:
        ValueError: naming every checkpoint key the model does not use, every model key the checkpoint lacks, and every
            tensor whose shape differs; or when the architecture is not ResNet + FPN + TOODHead.
    """
    from ..nn.model import TOODDetectionModel

    state, meta = read_mmdet_checkpoint(checkpoint)
    nc = state["bbox_head.tood_cls.weight"].shape[0] if "bbox_head.tood_cls.weight" in state else None
    if isinstance(cfg, nn.Module):
        model = cfg
    else:
        d = _model_yaml(cfg)
        model = TOODDetectionModel(d, nc=nc if nc is not None and nc != d.get("nc") else None, verbose=False)
    mapping = mmdet_key_map(model)
    _check_anchor_type(meta, _tood_parts(model)["bbox_head"][1])

    ours = model.state_dict()
    by_mmdet = {v: k for k, v in mapping.items()}
    optional = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    missing = [k for k in by_mmdet if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in by_mmdet and not optional(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} (model {tuple(ours[by_mmdet[k]].shape)})"
        for k in state
        if k in by_mmdet and state[k].shape != ours[by_mmdet[k]].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing from the checkpoint: {_summarise(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} not used by the model: {_summarise(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} with a different shape: {_summarise(mismatched)}")
        raise ValueError(
            "the mmdet checkpoint does not match the model YAML "
            f"({model.yaml.get('yaml_file', 'model')}):\n  " + "\n  ".join(problems)
        )
    new = {by_mmdet[k]: v.to(ours[by_mmdet[k]].dtype) for k, v in state.items() if k in by_mmdet}
    model.load_state_dict({**ours, **new}, strict=True)
    model.float().eval()
    model.yaml = _model_yaml(model.yaml)  # a saved checkpoint must not ask for ImageNet weights when rebuilt
    model.names = class_names(meta, model.model[-1].nc)
    return model


def ultralytics_checkpoint(
    model: nn.Module, cfg: str | Path | dict | None = None, half: bool = False, source: str | None = None
) -> dict:
    """A checkpoint dict as Ultralytics saves one after training (what `yolo val/predict/export` load)."""
    from copy import deepcopy

    from ultralytics import __version__
    from ultralytics.cfg import DEFAULT_CFG_DICT

    model = deepcopy(model).float().eval()
    for p in model.parameters():
        p.requires_grad = False
    if half:
        model.half()
    nc = model.model[-1].nc
    train_args = {
        **DEFAULT_CFG_DICT,
        "task": "detect",
        "model": str(cfg if isinstance(cfg, (str, Path)) else model.yaml.get("yaml_file", "")),
        "data": "coco.yaml" if nc == 80 else None,
        "imgsz": PREDICT_IMGSZ,
    }
    model.args = train_args
    return {
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "train_metrics": {},
        "converted_from": {"source": str(source) if source is not None else None, "format": "mmdetection TOOD"},
    }


def convert(src: str | Path, dst: str | Path, cfg: str | Path = DEFAULT_CFG, half: bool = False) -> Path:
    """Convert mmdet checkpoint `src` into Ultralytics checkpoint `dst` (float32 unless `half`); returns `dst`."""
    model = load_mmdet_checkpoint(src, cfg)
    dst = Path(dst)
    if dst.suffix != ".pt":
        raise ValueError(f"Ultralytics loads checkpoints named *.pt, got '{dst}'")
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ultralytics_checkpoint(model, cfg, half=half, source=Path(src).name), dst)
    return dst


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m tood_yolo.tools.convert", description="Convert an mmdetection TOOD checkpoint to Ultralytics."
    )
    parser.add_argument("src", help="mmdet checkpoint (.pth), e.g. tood_r50_fpn_1x_coco_20211210_103425-20e20746.pth")
    parser.add_argument("dst", help="Ultralytics checkpoint to write (.pt)")
    parser.add_argument("--cfg", default=DEFAULT_CFG,
                        help="model YAML of the same architecture: a shipped config's name (tood-r50.yaml) or a path")
    parser.add_argument("--half", action="store_true", help="store FP16 weights (as Ultralytics' trainer does)")
    args = parser.parse_args(argv)
    if not Path(args.cfg).is_file() and find_config(args.cfg) is None:
        parser.error(f"model YAML {args.cfg} not found: pass --cfg tood-r50.yaml (a shipped config's name) or a path")
    dst = convert(args.src, args.dst, args.cfg, half=args.half)
    print(f"Converted {args.src} -> {dst} ({args.cfg}{', fp16' if args.half else ''})")
    return dst


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
