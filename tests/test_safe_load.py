"""Tests of tood_yolo.tools.safe_load: reading a foreign checkpoint runs no code from it, yet mmdet's meta (numpy
arrays, mmengine objects) still reads.

Every crafted file is also loaded once with `torch.load(weights_only=False)`, which must run its payload: that proves
the payload is live, so the marker's absence after `load_untrusted` means the loader stopped it.
"""

from __future__ import annotations

import builtins
import importlib
import os
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from tood_yolo.tools.safe_load import StandIn, load_untrusted

FORMATS = ("zip", "legacy")  # torch.save's default, and the one mmdet's publish_model writes


def save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def checkpoint(meta: dict, **extra) -> dict:
    return {"state_dict": OrderedDict(w=torch.arange(6.0).view(2, 3)), "meta": meta, **extra}


# --------------------------------------------------------------------------------------------------------------------
# Payloads: objects whose unpickling writes the file `marker`
# --------------------------------------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)


class OsSystem(Payload):  # the file
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Eval(Payload):
    def __reduce__(self):
        return builtins.eval, (f"open({self.marker!r}, 'w').close()",)


class Exec(Payload):
    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


class Subprocess(Payload):
    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


class ImportModule(Payload):  # imports `evil_<pid>`, a module the test writes, whose import writes the marker
    def __reduce__(self):
        return importlib.import_module, (f"evil_{os.getpid()}",)


class _Import(Payload):
    def __reduce__(self):
        return importlib.import_module, ("subprocess",)


class _GetCall(Payload):
    def __call__(self):  # pickle wants the REDUCE function callable at save time
        pass

    def __reduce__(self):
        return builtins.getattr, (_Import(self.marker), "call")


class GetattrChain(Payload):  # getattr(importlib.import_module("subprocess"), "call")(["touch", marker])
    def __reduce__(self):
        return _GetCall(self.marker), (["touch", self.marker],)


class SetState(Payload):  # a class of the file's own whose __setstate__ runs code
    def __getstate__(self):
        return {"code": f"open({self.marker!r}, 'w').close()"}

    def __setstate__(self, state):
        eval(state["code"])


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path whose import writes tmp_path/marker (what ImportModule's payload imports)."""
    name = f"evil_{os.getpid()}"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    yield
    sys.modules.pop(name, None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "payload, refused",
    [
        (OsSystem, "names posix.system"),  # torch never allows os/sys/posix/nt, not even as a stand-in
        (Eval, None),
        (Exec, None),
        (Subprocess, None),
        (ImportModule, None),
        (GetattrChain, "unrecognized function <stand-in for builtins.getattr>"),
        (SetState, None),
    ],
)
def test_no_payload_runs(tmp_path, evil_module, payload, refused, fmt):
    marker = tmp_path / "marker"
    file = save(checkpoint({"CLASSES": ("a", "b"), "x": payload(marker)}), tmp_path / "crafted.pth", fmt)
    if refused:
        with pytest.raises(ValueError, match=refused):
            load_untrusted(file)
    else:
        ckpt = load_untrusted(file)
        assert isinstance(ckpt["meta"]["x"], StandIn) and ckpt["meta"]["CLASSES"] == ("a", "b")
        torch.testing.assert_close(ckpt["state_dict"]["w"], torch.arange(6.0).view(2, 3))
    assert not marker.exists(), f"{payload.__name__}'s code ran while loading"
    torch.load(file, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


def test_a_stand_in_is_inert(tmp_path):
    file = save(checkpoint({"x": Eval(tmp_path / "marker")}), tmp_path / "crafted.pth", "zip")
    stand_in = load_untrusted(file)["meta"]["x"]
    cls = type(stand_in)
    assert cls.pickled_name == "builtins.eval" and repr(stand_in) == "<stand-in for builtins.eval>"
    made = cls("open('x', 'w')", globals())  # construction ignores its arguments
    made.__setstate__({"code": 1})  # so does __setstate__
    assert not hasattr(made, "__dict__")
    with pytest.raises(AttributeError):
        made.code = 1  # no state can be set
    with pytest.raises(TypeError):
        made()  # an instance is not callable
    registered = [e[0] if isinstance(e, tuple) else e for e in torch.serialization.get_safe_globals()]
    assert not any(isinstance(g, type) and issubclass(g, StandIn) for g in registered)  # allowed for that load only


def test_a_dict_subclass_fails_with_a_clear_message(tmp_path):
    """torch's restricted unpickler fills only real dicts: a foreign dict subclass cannot be read (and is refused)."""

    class ConfigDict(dict):
        pass

    ConfigDict.__module__, ConfigDict.__qualname__ = __name__, "ConfigDict"
    globals()["ConfigDict"] = ConfigDict
    try:
        file = save(checkpoint({"cfg": ConfigDict(a=1)}), tmp_path / "dict.pth", "zip")
    finally:
        del globals()["ConfigDict"]
    with pytest.raises(ValueError, match=r"without running code from it: Can only SETITEMS? .*StandIn\[.*ConfigDict\]"):
        load_untrusted(file)


# --------------------------------------------------------------------------------------------------------------------
# What real mmdet checkpoints hold
# --------------------------------------------------------------------------------------------------------------------
MMENGINE = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer", "mmengine.logging.message_hub")


def fake_mmengine() -> dict[str, types.ModuleType]:
    """Modules and classes named as mmengine's, with the attributes mmengine 0.x pickles for them."""

    class HistoryBuffer:
        def __init__(self, values):
            self.max_length = 1000000
            self._log_history = np.asarray(values, dtype=np.float64)
            self._count_history = np.ones(len(values), dtype=np.int64)

    class MessageHub:
        def __init__(self, scalars):
            self.instance_name = "mmdet"
            self._log_scalars = OrderedDict(scalars)
            self._runtime_info = OrderedDict(epoch=12, iter=87948)
            self._resumed_keys = OrderedDict(epoch=True)

    modules = {n: types.ModuleType(n) for n in MMENGINE}
    for cls, module in ((HistoryBuffer, MMENGINE[2]), (MessageHub, MMENGINE[3])):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    return modules


def save_mmdet3(state_dict: dict, classes: tuple[str, ...], path: Path, fmt: str) -> Path:
    """Save an mmdet 3.x checkpoint (dataset_meta, config text, mmengine objects in the meta and a message hub state)
    while modules named as mmengine's exist; they are gone when this returns."""
    mm = fake_mmengine()
    sys.modules.update(mm)
    try:
        hb = mm["mmengine.logging.history_buffer"].HistoryBuffer
        scalars = {"train/loss": hb([1.5, 1.25]), "train/lr": hb([0.01])}
        meta = {
            "dataset_meta": {"classes": classes, "palette": [(220, 20, 60)] * len(classes)},
            "cfg": "model = dict(bbox_head=dict(type='TOODHead', anchor_type='anchor_free'))",
            "mmengine_version": "0.10.3",
            "message_hub": mm["mmengine.logging.message_hub"].MessageHub(scalars),
            "hook_msgs": {"best_score": np.float64(0.421), "loss_history": hb([0.5]), "ids": np.arange(3)},
        }
        hub_state = {"log_scalars": OrderedDict(scalars), "runtime_info": OrderedDict(epoch=12), "resumed_keys": {}}
        return save({"state_dict": state_dict, "meta": meta, "message_hub": hub_state}, path, fmt)
    finally:
        for name in MMENGINE:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmengine_objects_and_numpy_in_the_meta(tmp_path, fmt):
    file = save_mmdet3(OrderedDict(w=torch.ones(2)), ("person", "car"), tmp_path / "mmdet3.pth", fmt)
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        torch.load(file, weights_only=False)  # a full unpickle needs mmengine
    ckpt = load_untrusted(file)
    assert "mmengine" not in sys.modules  # nothing was imported by its pickled name
    meta = ckpt["meta"]
    assert meta["dataset_meta"]["classes"] == ("person", "car") and meta["cfg"].startswith("model = dict(")
    assert type(meta["message_hub"]).pickled_name == "mmengine.logging.message_hub.MessageHub"
    assert type(meta["hook_msgs"]["loss_history"]).pickled_name == "mmengine.logging.history_buffer.HistoryBuffer"
    best, ids = meta["hook_msgs"]["best_score"], meta["hook_msgs"]["ids"]
    assert type(best) is np.float64 and best == 0.421
    assert type(ids) is np.ndarray and ids.dtype == np.int64 and ids.tolist() == [0, 1, 2]
    assert isinstance(ckpt["message_hub"]["log_scalars"]["train/loss"], StandIn)


def test_numpy_1_names(tmp_path):
    """numpy 1.x pickles its rebuild functions under numpy.core (numpy 2: numpy._core); both are allowed."""
    meta = {"CLASSES": ("a",), "score": np.float32(0.5), "arr": np.linspace(0, 1, 5)}
    data = save(checkpoint(meta), tmp_path / "np2.pth", "legacy").read_bytes()
    assert b"cnumpy._core.multiarray\n" in data  # the legacy format's pickle is a plain stream: rename in place
    (tmp_path / "np1.pth").write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    ckpt = load_untrusted(tmp_path / "np1.pth")
    assert ckpt["meta"]["score"] == np.float32(0.5) and type(ckpt["meta"]["score"]) is np.float32
    np.testing.assert_array_equal(ckpt["meta"]["arr"], np.linspace(0, 1, 5))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    for name in ("empty.pth", "text.pth"):
        with pytest.raises(ValueError, match=f"{name} is not a PyTorch checkpoint"):
            load_untrusted(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_untrusted(tmp_path / "missing.pth")
