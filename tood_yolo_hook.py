"""Start-up hook that registers TOOD with Ultralytics without importing torch at interpreter start.

`tood_yolo_hook.pth` (installed into site-packages with the package) imports this module when Python starts. It
only adds a `sys.meta_path` finder, standard library alone (about a millisecond). When anything later imports
`ultralytics.nn.tasks` (the `yolo` command, `ultralytics.YOLO`, a checkpoint load), the finder lets that module load
as usual and then calls `tood_yolo.register.register()`, which makes TOOD's model YAMLs, checkpoints and trainer
known to Ultralytics. `import tood_yolo` registers too. Set TOOD_YOLO_NO_HOOK=1 to switch the hook off.
"""

from __future__ import annotations

import os
import sys

TARGET = "ultralytics.nn.tasks"


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
        if "tood_yolo" in sys.modules:  # being imported (it imports Ultralytics first) or done: its __init__ registers
            return
        from tood_yolo.register import register

        register()


class TOODFinder:
    """Meta-path finder (duck-typed) that wraps the loader of `ultralytics.nn.tasks` once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot, and lets the real finders resolve the spec below
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Add the finder unless it is switched off, already present, or the target is already imported."""
    if os.environ.get("TOOD_YOLO_NO_HOOK") or TARGET in sys.modules:
        return
    if not any(isinstance(f, TOODFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TOODFinder())


install()
