"""Registration of TOOD with Ultralytics: the one place that extends the engine.

How it works (installed packages need no extra import): `tood_yolo_hook.pth` in site-packages imports
`tood_yolo_hook` at interpreter start (standard library only, torch is not imported), which calls `register()` right
after `ultralytics.nn.tasks` is first imported. `import tood_yolo` calls it too. `register()` is idempotent and:

1. wraps `ultralytics.nn.tasks.parse_model` so that model YAMLs may use TOOD's modules (`ResNet`, `FPN`,
   `TOODHead`). Ultralytics' parser tracks channels only for the modules it knows, so TOOD layers are built with the
   input channels measured by a small dummy forward through the layers before them (`_build_tood_layers`);
2. wraps `guess_model_task` so that a TOOD YAML or model is a detection model;
3. exposes the modules in `ultralytics.nn.tasks`, where `parse_model` resolves YAML names;
4. routes TOOD models to TOOD's loss (`DetectionModel.init_criterion`) and trainer (`YOLO.task_map`); a model YAML's
   `loss: tood` / `loss: v8` swaps the losses of `Detect` and `TOODHead` (the ablation's 2x2);
5. adds TOOD's training arguments (`TOOD_ARGS`) to Ultralytics' default configuration, so that `yolo train recipe=...`
   passes Ultralytics' argument check and the values travel with the run's arguments (args.yaml, checkpoints, resume,
   DDP workers);
6. keeps an offline Ultralytics (YOLO_OFFLINE=1) off the network (`tood_yolo.offline`: font, weights, datasets);
7. gives bad label rows, a missing labels folder and damaged video frames clear handling (`tood_yolo.inputs`).

Checkpoints pickle the modules by their path in this package, so a TOOD `.pt` loads wherever it is installed.
"""

from __future__ import annotations

import ast
import inspect
import sys
from copy import deepcopy

import torch
from torch import nn

from . import offline
from .backbone import ResNet
from .head import TOODHead
from .neck import FPN

TOOD_MODULES: dict[str, type[nn.Module]] = {"ResNet": ResNet, "FPN": FPN, "TOODHead": TOODHead}
# Arguments TOOD adds to Ultralytics' (None: decided by the model YAML and the recipe, tood_yolo/recipe.py)
TOOD_ARGS = {"recipe": None, "initial_epoch": None}
PROBE_SIZE = 64  # side of the dummy input that measures channels; any multiple of the largest backbone stride
_done: set[str] = set()  # parts of the registration already applied


def is_tood(model) -> bool:
    """Whether `model` (a model YAML dict or an nn.Module; anything else is not) is a TOOD model: a T-head, or a
    YAML that asks for TOOD's loss (`loss: tood`), either of which trains with `TOODTrainer`."""
    if isinstance(model, dict):
        return model.get("loss") == "tood" or any(row[2] == "TOODHead" for row in model.get("head", ()))
    if isinstance(model, nn.Module):
        return is_tood(getattr(model, "yaml", None) or {}) or any(isinstance(m, TOODHead) for m in model.modules())
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


def _check_module_names(layers: list, known: dict) -> None:
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
            else m in known or m in TOOD_MODULES
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


def _build_tood_layers(model: nn.Sequential, rows: dict[int, tuple[str, list]], ch: int) -> None:
    """Replace the stand-ins at `rows` by TOOD modules built with the input channels of a dummy forward pass."""
    was_training = model.training
    model.eval()  # batch statistics of a 1-image probe are meaningless
    x, y = torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE), []
    last = max(rows)
    with torch.no_grad():
        for i, m in enumerate(model):
            inp = x if m.f == -1 else y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if i in rows:
                name, args = rows[i]
                channels = inp.shape[1] if isinstance(inp, torch.Tensor) else [t.shape[1] for t in inp]
                new = _construct(i, name, args, channels).eval()
                new.i, new.f, new.type, new.np = m.i, m.f, f"tood_yolo.{name}", sum(p.numel() for p in new.parameters())
                model[i] = m = new
            if i == last:
                break
            x = m(inp)
            y.append(x)
    model.train(was_training)


def tood_parse_model(d: dict, ch: int, verbose: bool = True):
    """Ultralytics' `parse_model` extended with TOOD's modules (same signature and return value)."""
    from ultralytics.nn import tasks
    from ultralytics.utils import LOGGER

    layers = d["backbone"] + d["head"]
    _check_module_names(layers, vars(tasks))
    rows = {i: (r[2], _resolve_args(r[3], d)) for i, r in enumerate(layers) if r[2] in TOOD_MODULES}
    if not rows:
        return _ULTRALYTICS_PARSE_MODEL(d, ch, verbose)
    for i in rows:
        if layers[i][1] != 1:
            raise ValueError(f"model YAML layer {i} ({layers[i][2]}): repeats must be 1, got {layers[i][1]}")
    # Stand-ins Ultralytics parses for any `from` (a single index or a list), replaced once channels are known
    stand_in = deepcopy(d)
    for i in rows:
        part, j = ("backbone", i) if i < len(d["backbone"]) else ("head", i - len(d["backbone"]))
        f = stand_in[part][j][0]
        stand_in[part][j] = [f, 1, "nn.Identity", []] if isinstance(f, int) else [f, 1, "Concat", [1]]
    model, save = _ULTRALYTICS_PARSE_MODEL(stand_in, ch, verbose=False)
    _build_tood_layers(model, rows, ch)
    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
        for m, r in zip(model, layers):
            LOGGER.info(f"{m.i:>3}{m.f!s:>20}{r[1]:>3}{m.np:10.0f}  {m.type:<45}{r[3]!s:<30}")
    return model, save


def tood_guess_model_task(model) -> str:
    """Ultralytics' `guess_model_task`, answering 'detect' for TOOD YAMLs and models (no 'detect' in 'TOODHead').

    A YAML dict is checked for unknown module names first: this is the first look Ultralytics takes at a new YAML,
    and without a task it would fail with an unrelated message.
    """
    if isinstance(model, dict) and "backbone" in model and "head" in model:
        from ultralytics.nn import tasks

        _check_module_names(model["backbone"] + model["head"], vars(tasks))
    return "detect" if is_tood(model) else _ULTRALYTICS_GUESS_MODEL_TASK(model)


def tood_init_criterion(self):
    """`DetectionModel.init_criterion`: the loss a YAML names (`loss: tood` / `loss: v8`), else TOOD's for a T-head and
    Ultralytics' otherwise."""
    from .loss import THeadV8Loss, TOODLoss

    thead = isinstance(self.model[-1], TOODHead)
    loss = (getattr(self, "yaml", None) or {}).get("loss", "tood" if thead else "v8")
    if loss not in {"tood", "v8"}:
        raise ValueError(f"model YAML 'loss: {loss}': choose 'tood' (TAL + QFL + GIoU) or 'v8' (Ultralytics' v8 loss)")
    if loss == "tood":
        return TOODLoss(self)
    return THeadV8Loss(self) if thead else _ULTRALYTICS_INIT_CRITERION(self)


def tood_task_map(self) -> dict:
    """`YOLO.task_map` with TOOD's trainer and validator for TOOD models, so that the plain `yolo train` trains them as
    TOOD and `yolo val save_json=True` prints pycocotools' COCO table."""
    task_map = _ULTRALYTICS_TASK_MAP.fget(self)
    if is_tood(getattr(self, "model", None)):
        from .coco import TOODDetectionValidator
        from .trainer import TOODTrainer

        task_map["detect"] = {**task_map["detect"], "trainer": TOODTrainer, "validator": TOODDetectionValidator}
    return task_map


def register() -> None:
    """Make TOOD known to Ultralytics (idempotent; see the module docstring).

    The YOLO class is patched only once `ultralytics.models.yolo.model` is fully loaded: importing it from here while
    Ultralytics is still importing itself would be circular. The start-up hook calls this again when it is.
    """
    from ultralytics.nn import tasks

    global _ULTRALYTICS_PARSE_MODEL, _ULTRALYTICS_GUESS_MODEL_TASK, _ULTRALYTICS_INIT_CRITERION, _ULTRALYTICS_TASK_MAP
    if "tasks" not in _done:
        _done.add("tasks")
        from ultralytics.engine import model as engine_model

        from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT

        for k, v in TOOD_ARGS.items():
            DEFAULT_CFG_DICT.setdefault(k, v)
            setattr(DEFAULT_CFG, k, getattr(DEFAULT_CFG, k, v))
        _ULTRALYTICS_PARSE_MODEL, _ULTRALYTICS_GUESS_MODEL_TASK = tasks.parse_model, tasks.guess_model_task
        _ULTRALYTICS_INIT_CRITERION = tasks.DetectionModel.init_criterion
        vars(tasks).update(TOOD_MODULES)
        tasks.parse_model = tood_parse_model
        tasks.guess_model_task = engine_model.guess_model_task = tood_guess_model_task
        tasks.DetectionModel.init_criterion = tood_init_criterion
        if offline.is_offline():
            offline.ensure_offline_font()
            offline.guard_downloads()
    yolo = getattr(sys.modules.get("ultralytics.models.yolo.model"), "YOLO", None)
    if "yolo" not in _done and yolo is not None:
        _done.add("yolo")
        _ULTRALYTICS_TASK_MAP = yolo.task_map
        yolo.task_map = property(tood_task_map)
        from . import inputs  # imports Ultralytics' data modules: only once Ultralytics has loaded them

        inputs.register()
        if offline.is_offline():
            offline.guard_datasets()
