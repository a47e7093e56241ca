"""The one module that replaces names inside Ultralytics. docs/architecture.md lists each one, with the reason no
supported extension point can do its job.

`register()` is idempotent. `import tood_yolo` calls it, and so does the start-up hook of an installed package
(`tood_yolo_hook`) once Ultralytics' model classes have loaded. It applies, process-wide:

1. `YOLO.__init__`: a TOOD YAML or checkpoint becomes a `TOOD` model, whose own task map holds TOOD's model, trainer
   and validator. Ultralytics' `YOLO` does the same to become a `YOLOWorld`, `YOLOE` or `RTDETR`. TOOD's shipped
   configs are found by name (`model=tood-r50.yaml`, `tood_yolo.nn.configs`), and a YAML name that is neither a file
   nor a config of TOOD or Ultralytics gets one line naming what exists. Any other model is Ultralytics' own,
   untouched: its class, parser, loss, trainer, validator and NMS.
2. Ultralytics' default configuration gains TOOD's training arguments (`tood_yolo_hook.TOOD_ARGS`), so that `yolo
   train recipe=...` passes Ultralytics' argument check. The values then travel with the run's arguments: args.yaml,
   checkpoints, resume, DDP workers and the tuner's child processes. The start-up hook adds them as soon as
   `ultralytics.utils` loads, in every process; this call covers a package imported without the hook installed.
3. With YOLO_OFFLINE=1, no weights, datasets, fonts or HEIF plug-ins are fetched (`tood_yolo.data.offline`).
4. Damaged video frames are skipped and logged (`tood_yolo.data.video`). (Bad label rows and a missing labels folder
   need no replacement: TOOD's trainer and validator build `tood_yolo.data.dataset.TOODDataset`.)

One replacement lives below, beside what it replaces for: Ultralytics' AMP check, swapped for TOOD's during
`TOODTrainer`'s set-up only (`tood_yolo.engine.amp.check_amp_replaced`).

Registering runs in every process that imports Ultralytics' models, so it imports only `data.offline` and
`data.video`: every replacement wraps a module Ultralytics has already imported, and TOOD's network and engine (torch's
and torchvision's modules that Ultralytics defers) load only once a model is TOOD's (docs/architecture.md, "What
registration costs a process that never uses TOOD").
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import tood_yolo_hook

from .data import offline

_done: set[str] = set()  # the parts of the registration already applied


def _is_tood_yaml(model) -> bool:
    """Whether `model` is the path of a model YAML that is TOOD's (`is_tood_config`)."""
    from .nn.configs import YAML_SUFFIXES, is_tood_config, read_config, unknown_config_message

    if not isinstance(model, (str, Path)) or Path(model).suffix.lower() not in YAML_SUFFIXES:
        return False
    try:
        return is_tood_config(read_config(model))
    except FileNotFoundError:
        if Path(model).name == str(model):  # a bare name that Ultralytics does not know either
            raise FileNotFoundError(unknown_config_message(model)) from None
        raise


def _holds_tood(model) -> bool:
    """Whether the model Ultralytics' own `__init__` built or loaded is TOOD's (`nn.model.is_tood`).

    Its YAML says so for every model TOOD builds. A T-head can only be in it if unpickling the checkpoint imported
    `tood_yolo.nn.head` (by that name or a legacy one): only then is TOOD's network (torch, torchvision) imported to
    look for one, so an Ultralytics model costs no import of it."""
    if "tood_yolo.nn.head" in sys.modules:
        from .nn.model import is_tood

        return is_tood(model)
    from .nn.configs import is_tood_config

    yaml = getattr(model, "yaml", None)
    return isinstance(yaml, dict) and is_tood_config(yaml)


def _route_tood_models(init):
    """`YOLO.__init__` that turns into a `TOOD` for a TOOD YAML (which Ultralytics' parser cannot build) or a TOOD
    checkpoint (which Ultralytics would train with its own loss), and is Ultralytics' own for everything else.

    TOOD's model class (and with it torch's and torchvision's modules that Ultralytics defers) is imported only for a
    TOOD model; deciding costs a file-name look-up, and for a YAML, reading it as Ultralytics would."""

    @functools.wraps(init)
    def __init__(self, model="yolo26n.pt", task=None, verbose=False):
        from .nn.configs import find_config

        model = find_config(model) or model  # TOOD's configs by name, before Ultralytics looks among its own
        if not _is_tood_yaml(model):
            init(self, model, task, verbose)
            if not _holds_tood(getattr(self, "model", None)):
                return
            model = self  # a TOOD checkpoint Ultralytics loaded: TOOD adopts it
        from .engine.model import TOOD

        tood = TOOD(model, verbose=verbose)
        self.__class__, self.__dict__ = type(tood), tood.__dict__

    return __init__


def _guard_offline() -> None:
    """Ultralytics' download and dataset look-ups, and Pillow's open, in their offline forms (`tood_yolo.data.offline`).

    `check_det_dataset` is replaced in `ultralytics.data.utils`, which later imports read, and in the trainer and
    validator modules, which imported it by name already; `attempt_download_asset` only in `downloads`, which
    `tasks.torch_safe_load` imports at each call.
    """
    from PIL import Image
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer, validator
    from ultralytics.utils import downloads, patches

    offline.ensure_offline_font()
    downloads.attempt_download_asset = offline.local_asset(downloads.attempt_download_asset)
    if offline.without_heif():
        Image.open = patches._image_open  # Pillow's own, without Ultralytics' pi-heif fallback (a pip install)
    check_local_dataset = offline.local_dataset(data_utils.check_det_dataset)
    for module in (data_utils, trainer, validator):
        module.check_det_dataset = check_local_dataset


def _skip_damaged_video_frames() -> None:
    """Ultralytics' predict loader with `tood_yolo.data.video`'s, which skips (and logs) undecodable video frames.

    The loader class is read as a module global by `load_inference_source`, by name: no argument takes another class.
    """
    from ultralytics.data import build

    from .data import video

    build.LoadImagesAndVideos = video.SkippingLoader


def register() -> None:
    """Make TOOD known to Ultralytics (idempotent; see the module docstring).

    The YOLO class is wrapped only once `ultralytics.models.yolo.model` has fully loaded: importing it from here while
    Ultralytics is still importing itself would be circular. The start-up hook calls this again when it has.
    """
    if "config" not in _done:
        from ultralytics import utils

        _done.add("config")
        tood_yolo_hook.add_tood_args(utils)
        if offline.is_offline():
            _guard_offline()
    yolo = getattr(sys.modules.get("ultralytics.models.yolo.model"), "YOLO", None)
    if "yolo" not in _done and yolo is not None:
        _done.add("yolo")
        yolo.__init__ = _route_tood_models(yolo.__init__)
        _skip_damaged_video_frames()  # imports Ultralytics' data modules: only once Ultralytics has loaded them
