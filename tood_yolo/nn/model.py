"""`TOODDetectionModel`: Ultralytics' `DetectionModel` for YAMLs that name TOOD's modules, with the loss the YAML picks.

Ultralytics' `parse_model` tracks input channels only for the modules it knows, and `DetectionModel.__init__` calls it
as a module global, so no argument or subclass hook can hand it TOOD's modules. `TOODDetectionModel` builds its layers
itself, with Ultralytics' own, unmodified `parse_model` doing all the work it can: every TOOD row of the YAML is given
to it as a stand-in (`nn.Identity`, or `Concat` for several inputs), and the stand-ins are then replaced by TOOD
modules built with the input channels a dummy forward pass measures (`parse_tood_model`). The same pass gives the
head's strides. Everything else is `DetectionModel`'s: forward, fuse, load, info, its loss for an Ultralytics head,
and its test-time augmentation, which `_predict_augment` opens to the T-head.
"""

from __future__ import annotations

import ast
import inspect
from copy import deepcopy

import torch
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules import Detect
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import initialize_weights, scale_img

from ..utils.loss import THeadV8Loss, TOODLoss
from ..utils.recipe import Recipe
from .backbone import ResNet
from .configs import is_tood_config, read_config
from .head import TOODHead
from .neck import FPN

TOOD_MODULES: dict[str, type[nn.Module]] = {"ResNet": ResNet, "FPN": FPN, "TOODHead": TOODHead}
# Side of the dummy input that measures channels and strides: Ultralytics' 256 (`DetectionModel`), a multiple of every
# stride up to P7's 128 that leaves P7 a 2x2 map
PROBE_SIZE = 256
LOSSES = ("tood", "v8")
TAL_KEYS = ("topk", "alpha", "beta")  # what a YAML's `tal:` may set (TOODLoss' arguments)
# DetectionModel._predict_augment's passes: full size, 0.83 flipped left-right (dim 3), 0.67
TTA_SCALES, TTA_FLIPS = (1, 0.83, 0.67), (None, 3, None)


def is_tood(model) -> bool:
    """Whether `model` (a model YAML dict or an nn.Module; anything else is not) is built and trained by TOOD: its
    YAML names a TOOD module or asks for TOOD's loss (`loss: tood`), or it holds a T-head."""
    if isinstance(model, dict):
        return is_tood_config(model)
    if isinstance(model, nn.Module):
        yaml = getattr(model, "yaml", None) or {}
        return is_tood_config(yaml) or any(isinstance(m, TOODHead) for m in model.modules())
    return False


def _resolve_args(args: list, d: dict) -> list:
    """YAML arguments as Ultralytics resolves them: 'nc' is the model's class count, other strings literal-eval."""
    out = []
    for a in args:
        if a == "nc":
            a = d["nc"]
        elif isinstance(a, str):
            try:
                a = ast.literal_eval(a)
            except (ValueError, SyntaxError):
                pass  # a plain string argument, e.g. anchor_type
        out.append(a)
    return out


def check_module_names(layers: list) -> None:
    """Raise a clear error for a YAML layer whose module name neither Ultralytics nor TOOD knows."""
    import torchvision

    for i, row in enumerate(layers):
        if not (isinstance(row, (list, tuple)) and len(row) == 4):
            raise ValueError(f"model YAML layer {i}: expected [from, repeats, module, args], got {row!r}")
        m = row[2]
        ok = (
            hasattr(torch.nn, m[3:])
            if m.startswith("nn.")
            else hasattr(torchvision.ops, m[16:])
            if m.startswith("torchvision.ops.")
            else m in vars(tasks) or m in TOOD_MODULES
        )
        if not ok:
            raise ValueError(
                f"model YAML layer {i}: unknown module '{m}'. TOOD modules: {', '.join(TOOD_MODULES)}; "
                f"otherwise any module of ultralytics.nn.modules, nn.* or torchvision.ops.*"
            )


def _construct(i: int, name: str, args: list, ch) -> nn.Module:
    """Build TOOD module `name` of YAML layer `i`, turning a bad argument list into an error that names the layer."""
    cls = TOOD_MODULES[name]
    try:
        return cls(*args, ch=ch)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"model YAML layer {i} ({name}, args {args}, input channels {ch}): {e}\n"
            f"{name} takes {inspect.signature(cls)} (ch is filled in by the parser)"
        ) from e


def _build_tood_layers(model: nn.Sequential, rows: dict[int, tuple[str, list]], ch: int) -> torch.Tensor:
    """Replace the stand-ins at `rows` by TOOD modules built with the input channels of a dummy forward pass, which
    runs on to the last layer's inputs; returns their strides (PROBE_SIZE / map height), as `DetectionModel` measures
    them (an empty tensor when the last layer takes no maps)."""
    was_training = model.training
    model.eval()  # batch statistics of a 1-image probe are meaningless
    x, y = torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE), []
    with torch.no_grad():
        for i, m in enumerate(model):
            inp = x if m.f == -1 else y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if i in rows:
                name, args = rows[i]
                channels = inp.shape[1] if isinstance(inp, torch.Tensor) else [t.shape[1] for t in inp]
                new = _construct(i, name, args, channels).eval()
                new.i, new.f, new.type, new.np = m.i, m.f, f"tood_yolo.{name}", sum(p.numel() for p in new.parameters())
                model[i] = m = new
            if i == len(model) - 1:
                break
            x = m(inp)
            y.append(x)
    model.train(was_training)
    maps = [inp] if isinstance(inp, torch.Tensor) else inp
    return torch.tensor([PROBE_SIZE / t.shape[-2] for t in maps if isinstance(t, torch.Tensor) and t.ndim == 4])


def parse_tood_model(d: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int], torch.Tensor]:
    """Ultralytics' `parse_model` (same arguments; it returns the layers and the save list) for YAMLs that may name
    TOOD's modules; also returns the last layer's input strides (see `_build_tood_layers`)."""
    layers = d["backbone"] + d["head"]
    check_module_names(layers)
    rows = {i: (r[2], _resolve_args(r[3], d)) for i, r in enumerate(layers) if r[2] in TOOD_MODULES}
    for i in rows:
        if layers[i][1] != 1:
            raise ValueError(f"model YAML layer {i} ({layers[i][2]}): repeats must be 1, got {layers[i][1]}")
    # Stand-ins Ultralytics parses for any `from` (a single index or a list), replaced once channels are known
    stand_in = deepcopy(d)
    for i in rows:
        part, j = ("backbone", i) if i < len(d["backbone"]) else ("head", i - len(d["backbone"]))
        f = stand_in[part][j][0]
        stand_in[part][j] = [f, 1, "nn.Identity", []] if isinstance(f, int) else [f, 1, "Concat", [1]]
    model, save = tasks.parse_model(stand_in, ch, verbose=verbose and not rows)
    strides = _build_tood_layers(model, rows, ch)
    if verbose and rows:
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
        for m, r in zip(model, layers):
            LOGGER.info(f"{m.i:>3}{m.f!s:>20}{r[1]:>3}{m.np:10.0f}  {m.type:<45}{r[3]!s:<30}")
    return model, save, strides


class TOODDetectionModel(tasks.DetectionModel):
    """A detection model whose YAML may name TOOD's modules (`ResNet`, `FPN`, `TOODHead`) and its loss (`loss:`).

    Built as `DetectionModel` builds itself (YAML, nc override, layers, names, strides, bias and weight init), with
    `parse_tood_model` for the layers. The loss: the YAML's `loss: tood` (TAL + QFL + GIoU) or `loss: v8` (Ultralytics'
    v8 loss), else TOOD's for a T-head and Ultralytics' for any other head; the two crossed cells are the ablation's.

    Args:
        cfg (str | dict): Model YAML path, the name of a shipped TOOD config (`tood-r50.yaml`), or a dict.
        ch (int): Input channels.
        nc (int, optional): Class count overriding the YAML's.
        verbose (bool): Print the layer table and the model summary.
    """

    def __init__(self, cfg: str | dict = "tood-r50.yaml", ch: int = 3, nc: int | None = None, verbose: bool = True):
        # not DetectionModel's, whose parser is a module global that knows no TOOD module
        tasks.BaseModel.__init__(self)
        self.yaml = cfg if isinstance(cfg, dict) else read_config(cfg)
        self.yaml["channels"] = ch
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.model, self.save, strides = parse_tood_model(deepcopy(self.yaml), ch=ch, verbose=verbose)
        self.names = {i: f"{i}" for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)
        head = self.model[-1]
        if isinstance(head, Detect):
            head.inplace, head.stride = self.inplace, strides
            self.stride = strides
            head.bias_init()
        else:
            self.stride = torch.Tensor([32])  # DetectionModel's default for heads without maps
        initialize_weights(self)
        if verbose:
            self.info()
            LOGGER.info("")

    def is_fused(self) -> bool:
        """Ultralytics' check, plus the BatchNorms of a T-head variant (`fuse()` folds them via `TOODHead.fuse`)."""
        head = self.model[-1]
        return super().is_fused() and not (isinstance(head, TOODHead) and not head.is_fused())

    def _predict_augment(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Ultralytics' test-time augmentation (`augment=True`) for a T-head too: `DetectionModel._predict_augment`
        runs it only for a head whose type is exactly `Detect`, and a single pass for any other.

        The merge reads only what the T-head's inference output shares with Detect's: (B, 4 + nc, A) with xywh boxes
        in input pixels (`_descale_pred` undoes the scale and the flip) and the anchors level by level from the finest,
        each level a quarter of the one before (`_clip_augmented` drops the coarsest level of the full-size pass and
        the finest of the smallest pass). Scales, flips and padding are DetectionModel's.

        Args:
            x (torch.Tensor): (B, C, H, W) images, H and W multiples of the largest stride.

        Returns:
            (tuple): (B, 4 + nc, A') predictions of the three passes, and None (no training output).
        """
        if not isinstance(self.model[-1], TOODHead):
            return super()._predict_augment(x)
        img_size = x.shape[-2:]
        y = []
        for scale, flip in zip(TTA_SCALES, TTA_FLIPS):
            xi = scale_img(x.flip(flip) if flip else x, scale, gs=int(self.stride.max()))
            y.append(self._descale_pred(self._predict_once(xi)[0], flip, scale, img_size))
        return torch.cat(self._clip_augmented(y), -1), None

    def tal_args(self) -> dict:
        """Task alignment learning's hyper-parameters from the YAML's `tal:` mapping (`topk`, `alpha`, `beta`; absent
        keys keep TOOD's 13, 1.0 and 6.0), e.g. `tal: {topk: 10, alpha: 0.5}` for Ultralytics' values."""
        tal = self.yaml.get("tal") or {}
        if not isinstance(tal, dict) or set(tal) - set(TAL_KEYS):
            raise ValueError(f"model YAML 'tal: {tal}': a mapping of {', '.join(TAL_KEYS)}")
        return dict(tal)

    def init_criterion(self, recipe: Recipe | None = None):
        """The loss the YAML names (`loss: tood` / `loss: v8`), else TOOD's for a T-head and Ultralytics' otherwise.

        Args:
            recipe (Recipe, optional): The run's recipe, for TOOD's loss (`TOODTrainer` hands it over); None: the loss
                works it out from the model's `args` and YAML (as when Ultralytics builds the loss on first use).
        """
        thead = isinstance(self.model[-1], TOODHead)
        loss = self.yaml.get("loss", "tood" if thead else "v8")
        if loss not in LOSSES:
            raise ValueError(
                f"model YAML 'loss: {loss}': choose 'tood' (TAL + QFL + GIoU) or 'v8' (Ultralytics' v8 loss)"
            )
        if loss == "tood":
            return TOODLoss(self, recipe, **self.tal_args())
        return THeadV8Loss(self) if thead else super().init_criterion()
