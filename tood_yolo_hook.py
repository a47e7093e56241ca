"""Start-up hook that registers TOOD with Ultralytics without importing torch at interpreter start.

`tood_yolo_hook.pth` (installed into site-packages with the package) imports this module when Python starts. It
only adds a `sys.meta_path` finder, standard library alone (well under a millisecond). When anything later imports
`ultralytics.nn.tasks` or `ultralytics.models` (the `yolo` command, `ultralytics.YOLO`, a checkpoint load), the finder
lets that module load as usual and then calls `tood_yolo.register.register()`, which makes TOOD's model YAMLs,
checkpoints and trainer known to Ultralytics. `import tood_yolo` registers too.

TOOD's training arguments (`TOOD_ARGS`) join Ultralytics' default configuration as soon as `ultralytics.utils` has
loaded: the `yolo` command checks its arguments against that configuration before it imports any model code.
"""

from __future__ import annotations

import sys

# The model parser lives in the first, the YOLO class (trainer selection) in the second, which finishes loading last;
# the default configuration in the third
TARGETS = {"ultralytics.nn.tasks", "ultralytics.models", "ultralytics.utils"}
# Arguments TOOD adds to Ultralytics' (None: decided by the model YAML and the recipe, tood_yolo/recipe.py), so that
# `yolo train recipe=... initial_epoch=...` passes Ultralytics' argument check and the values travel with the run's
# arguments (args.yaml, checkpoints, resume, DDP workers)
TOOD_ARGS = {"recipe": None, "initial_epoch": None}


def add_args(utils) -> None:
    """Add `TOOD_ARGS` to Ultralytics' default configuration (`ultralytics.utils`), keeping any value already set."""
    for k, v in TOOD_ARGS.items():
        utils.DEFAULT_CFG_DICT.setdefault(k, v)
        if not hasattr(utils.DEFAULT_CFG, k):
            setattr(utils.DEFAULT_CFG, k, v)


class _RegisterAfterLoad:
    """Run the real loader of `ultralytics.nn.tasks`, then register TOOD with it.

    Duck-typed rather than an `importlib.abc.Loader`: importing importlib.abc alone costs ~15 ms at every start-up.
    """

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if module.__name__ == "ultralytics.utils":
            add_args(module)  # standard library only: Ultralytics is still importing itself here
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


install()
