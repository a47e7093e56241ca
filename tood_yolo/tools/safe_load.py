"""Read a checkpoint this package did not write (an mmdet `.pth` from the internet) without running code from it.

`torch.load(weights_only=True)` never imports anything: its unpickler looks every pickled global up by name in an
allowlist (tensors, storages, OrderedDict, numbers, strings, and what `torch.serialization.safe_globals` adds) and
refuses any other. mmdet checkpoints need a little more: numpy arrays and scalars in the meta, and in mmdet 3.x
mmengine objects (`mmengine.logging.history_buffer.HistoryBuffer`, `...message_hub.MessageHub`) that this environment
may not have. `load_untrusted` therefore lists the globals a file names, statically from its pickle opcodes (nothing is
imported or called), and for that one load adds to torch's allowlist:

- numpy's array, scalar and dtype rebuilders, under the names numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) pickle
  them with; they build plain arrays from the pickled bytes;
- for every other name, a fresh `StandIn` class registered under that name: creating it and its `__setstate__` ignore
  their arguments and it holds no state. torch's unpickler calls (REDUCE) only allowlisted objects, so the stand-in
  class itself at most, never an instance; mmengine's objects come back as stand-ins. The tensors, class names and
  config text the converter reads are plain data.

So nothing outside the allowlist is imported or run: a global never resolves to the real callable of its name. A file
fails with a `ValueError` when it names a global of `os`, `sys`, `posix` or `nt` (torch refuses those modules even when
allowlisted; a checkpoint has no use for them), or when its pickle needs an operation torch's restricted unpickler does
not perform: filling an object of a foreign dict or list subclass (a stand-in is neither), calling what a stand-in
returned.

torch's public scan, `torch.serialization.get_unsafe_globals_in_checkpoint`, reads only the zip format; mmdet publishes
its checkpoints in the legacy one, whose pickles go through the same scanner (`torch._weights_only_unpickler`).

Why not a `pickle.Unpickler` subclass: torch's weights_only unpickler already resolves globals by name without
importing, restricts REDUCE / NEWOBJ / BUILD to allowlisted types and rebuilds storages; `safe_globals` with
(object, "module.name") entries is its documented way to extend the allowlist, which is all the stand-ins need.
"""

from __future__ import annotations

import pickle
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import _weights_only_unpickler as restricted  # the unpickler of torch.load(weights_only=True)

# One load at a time: `safe_globals` edits a process-wide set. The stand-ins leave it when their load ends; meanwhile a
# weights_only load in another thread would also get (inert) stand-ins for those names instead of an error.
_LOCK = threading.Lock()
# The legacy format (mmdet's published checkpoints: `_use_new_zipfile_serialization=False`) holds four pickles ahead of
# the storage bytes: magic number, protocol version, system info, then the object
_LEGACY_PICKLES = 4


class StandIn:
    """Inert placeholder for a pickled global outside the allowlist (see the module docstring).

    Subclassed once per pickled name (`pickled_name`); construction and `__setstate__` ignore their arguments and no
    attribute can be set (`__slots__ = ()`), so an instance carries nothing of the file.
    """

    __slots__ = ()
    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        """NEWOBJ and REDUCE create the stand-in without looking at the pickled arguments."""
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        """REDUCE calls the class with the pickled arguments: they are dropped."""

    def __setstate__(self, state) -> None:
        """BUILD hands the pickled state: it is dropped."""

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


def _stand_in(name: str) -> type[StandIn]:
    """A `StandIn` subclass that names the global it replaces (only strings of the file go into it)."""
    namespace = {"__slots__": (), "pickled_name": name, "__module__": __name__, "__qualname__": f"StandIn[{name}]"}
    return type("StandIn", (StandIn,), namespace)


def _numpy_globals() -> dict[str, Any]:
    """Pickled name -> numpy object, for arrays, scalars and dtypes as numpy 1.x and 2.x pickle them.

    The rebuild functions are taken from numpy's own `__reduce__`, so no module is imported by a pickled name.
    """
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct (numpy._core in numpy 2)
    scalar = np.float64(0).__reduce__()[0]
    found = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for core in ("numpy.core", "numpy._core"):
        found[f"{core}.multiarray._reconstruct"] = reconstruct
        found[f"{core}.multiarray.scalar"] = scalar
    return found


def _dtype_classes() -> list[type]:
    """`np.dtype(...)` returns instances of per-type subclasses (numpy.dtypes.Float64DType, ...), which the pickle
    never names but which torch's unpickler must know to apply the pickled dtype state (BUILD)."""
    return sorted({type(np.dtype(c)) for c in np.typecodes["All"]}, key=lambda t: t.__qualname__)


def _unsafe_globals(path: Path) -> set[str]:
    """Names of the globals `path`'s pickles name that torch's weights_only unpickler does not already allow.

    A static scan of the opcodes. `torch.serialization.get_unsafe_globals_in_checkpoint` reads only the zip format;
    the legacy format's pickles go through the same scanner here.

    Raises:
        ValueError: when the file is neither a torch.save zip nor a sequence of pickles.
    """
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:  # not torch.save's zip format
        pass
    except RuntimeError as e:  # a damaged zip
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    found = set()
    try:
        with open(path, "rb") as f:
            for _ in range(_LEGACY_PICKLES):
                found |= restricted.get_globals_in_pkl(f)
    except (pickle.UnpicklingError, EOFError, IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    return found - set(restricted._get_allowed_globals()) - set(restricted._get_user_allowed_globals())


def _allowlist(names: set[str]) -> list[tuple[Any, str]]:
    """(object, pickled name) entries for `torch.serialization.safe_globals`: numpy for its names, else stand-ins."""
    numpy_globals = _numpy_globals()
    entries = [(numpy_globals[n], n) if n in numpy_globals else (_stand_in(n), n) for n in sorted(names)]
    if "numpy.dtype" in names:
        entries += [(t, f"{t.__module__}.{t.__qualname__}") for t in _dtype_classes()]
    return entries


def _blocked(names: set[str]) -> list[str]:
    """The names whose module torch's weights_only unpickler refuses even when allowlisted (os, sys, posix, nt)."""
    return sorted(n for n in names if n.rpartition(".")[0] in restricted._blocklisted_modules)


def _reason(error: pickle.UnpicklingError) -> str:
    """The restricted unpickler's own words, without torch's advice to retry with weights_only=False."""
    text = str(error).split("\n\nCheck the documentation of torch.load")[0]
    return text.rsplit("WeightsUnpickler error:", 1)[-1].rsplit("\n\n", 1)[-1].strip()


def load_untrusted(path: str | Path) -> Any:
    """Load a `torch.save` file (zip or legacy format) on the CPU without importing or running anything it names.

    Args:
        path (str | Path): the checkpoint file, e.g. an mmdet `.pth` downloaded from a model zoo.

    Returns:
        (Any): the pickled object (an mmdet checkpoint: {'state_dict': {name: Tensor}, 'meta': {...}}); globals
            outside the allowlist appear as `StandIn` instances.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when the file is not a PyTorch checkpoint, or cannot be read without running code from it (the
            message names the global or operation).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    with _LOCK:  # scan and load under one lock: another load's stand-ins must not count as allowed here
        names = _unsafe_globals(path)
        if blocked := _blocked(names):
            raise ValueError(
                f"{path} names {', '.join(blocked)}: a checkpoint has no use for these and they are never loaded "
                f"(the file was likely made to run code when unpickled)"
            )
        try:
            with torch.serialization.safe_globals(_allowlist(names)):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} cannot be read without running code from it: {_reason(e)}") from None
        except (EOFError, RuntimeError) as e:  # empty, truncated, not a torch.save file
            raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
