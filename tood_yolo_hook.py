"""Start-up hook that registers TOOD with Ultralytics, and costs Ultralytics' users nothing until they use TOOD.

`tood_yolo_hook.pth` (installed into site-packages with the package) imports this module when Python starts. It
only adds a `sys.meta_path` finder, standard library alone (well under a millisecond). The finder lets three
Ultralytics modules load as usual and then:
- `ultralytics.utils`: adds TOOD's arguments (`TOOD_ARGS`) to Ultralytics' default configuration, before any code can
  check arguments against it. Every entry point then accepts them, for every model: the `yolo` command, `python -m
  ultralytics.cfg.__init__` (the child processes of the tuner and of MultiTrainer, which pass every argument on, TOOD's
  `recipe=None initial_epoch=None` included, to TOOD and Ultralytics models alike), the DDP launcher's script and
  `get_cfg`.
- `ultralytics.models` (the `yolo` command, `ultralytics.YOLO`): calls `tood_yolo.register.register()`, which makes
  `YOLO` turn into TOOD's model class for TOOD's YAMLs and checkpoints, and puts the offline guards and the video
  loader in place (the list: `tood_yolo/register.py`). `import tood_yolo` registers too.
- `ultralytics.cfg`: wraps the `yolo` command's entry point (`ultralytics.cfg.entrypoint`) so that `yolo train
  resume=path/last.pt` resumes that checkpoint (Ultralytics would build its default model, yolo26n.pt, a download,
  before it reads `resume`).

What that costs a process that never uses TOOD: importing `tood_yolo` (its classes load on first use),
`tood_yolo.register`, `tood_yolo.data.offline` and `tood_yolo.data.video`, none of which imports torch, torchvision,
matplotlib or an Ultralytics module that `from ultralytics import YOLO` does not import itself. TOOD's network and
engine (and with them torchvision) are imported when a model is TOOD's: a YAML that names TOOD's modules or loss, a
TOOD config by name, or a checkpoint whose pickle names `tood_yolo.*` (unpickling imports it; tood-yolo 0.1's
module names are aliased on import, `tood_yolo.LEGACY_MODULES`). `benchmarks/startup.py` measures the cost;
`tests/test_startup.py` checks what is imported.

`TOOD_YOLO_HOOK=0` in the environment leaves the hook out at start-up (`import tood_yolo` still registers): the
benchmark's "Ultralytics alone".
"""

from __future__ import annotations

import os
import sys

# The default configuration is in the first, the YOLO class in the second (which finishes loading after its
# submodules), the `yolo` entry point in the third
TARGETS = {"ultralytics.utils", "ultralytics.models", "ultralytics.cfg"}
# TOOD's training arguments and their defaults (None: the model YAML and the recipe decide), e.g. `yolo train
# recipe=mmdet`. Defined here, not in the package, because they must be known while Ultralytics is still loading,
# when the package (which imports Ultralytics) cannot be imported yet.
TOOD_ARGS = {"recipe": None, "initial_epoch": None}


def add_tood_args(utils) -> None:
    """Add `TOOD_ARGS` to the default configuration of `utils` (the module `ultralytics.utils`): `DEFAULT_CFG_DICT`,
    which `check_dict_alignment` checks arguments against (its `DEFAULT_CFG_KEYS` is a view of it), and
    `DEFAULT_CFG`. Values already there are kept (idempotent). Other models never read these keys."""
    for k, v in TOOD_ARGS.items():
        utils.DEFAULT_CFG_DICT.setdefault(k, v)
        if not hasattr(utils.DEFAULT_CFG, k):
            setattr(utils.DEFAULT_CFG, k, v)


def resume_as_model(argv: list[str]) -> None:
    """`yolo train resume=<file>` without `model=`: add `model=<file>` to `argv` (in place: Ultralytics' ARGV is the
    same list), as Ultralytics' own `yolo train resume model=<file>` spells it."""
    resume = next((a.partition("=")[2] for a in argv if a.startswith("resume=")), "")
    if resume.lower() not in {"", "true", "false"} and not any(a.startswith("model=") for a in argv):
        argv.append(f"model={resume}")


def _wrap_entrypoint(entrypoint):
    def tood_entrypoint(debug: str = ""):
        if not debug:
            resume_as_model(sys.argv)
        return entrypoint(debug)

    tood_entrypoint.__doc__ = entrypoint.__doc__
    return tood_entrypoint


class _RegisterAfterLoad:
    """Run the real loader of a target module, then add TOOD's arguments, register TOOD or wrap the `yolo` entry
    point (see the module docstring).

    Duck-typed rather than an `importlib.abc.Loader`: importing importlib.abc alone costs ~15 ms at every start-up.
    """

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if module.__name__ == "ultralytics.utils":
            add_tood_args(module)
            return
        if module.__name__ == "ultralytics.cfg":
            module.entrypoint = _wrap_entrypoint(module.entrypoint)
            return
        package = sys.modules.get("tood_yolo")
        if package is not None and not hasattr(package, "register"):
            return  # tood_yolo is being imported (it imports Ultralytics first) and registers at its end
        from tood_yolo.register import register

        register()


class TOODFinder:
    """Meta-path finder (duck-typed) that wraps the loaders of the target modules, once each."""

    def __init__(self):
        self.pending = set(TARGETS) - set(sys.modules)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        sys.meta_path.remove(self)  # lets the real finders resolve the spec below
        try:
            from importlib.util import find_spec

            spec = find_spec(fullname)
        finally:
            if self.pending:
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Add the finder unless it is already present or every target is already imported."""
    if TARGETS <= set(sys.modules):
        return
    if not any(isinstance(f, TOODFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TOODFinder())


if os.environ.get("TOOD_YOLO_HOOK") != "0":
    install()
