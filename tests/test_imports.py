"""Imports point down only: utils and data <- nn (the model) <- engine <- tools <- registration (`register.py` and the
start-up hook) <- the package's face (`tood_yolo/__init__.py`). Every import of the project's own modules is read from
its source (`ast`), those inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tood_yolo"
# Each room and its floor: a module may import its own room and rooms on lower floors, never another room on its floor
# or one above. `utils` and `data` are both ground floor and import neither each other.
FLOORS = {"utils": 0, "data": 0, "nn": 1, "engine": 2, "tools": 3, "registration": 4, "tood_yolo": 5}
# register.py and the start-up hook are one room: the hook calls register(), which adds the hook's TOOD_ARGS
REGISTRATION = {"tood_yolo.register", "tood_yolo_hook"}


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of a source file of the package, or of the hook beside it."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The room of a module ("nn", "engine", "registration", ...; "tood_yolo" for the package itself)."""
    if module in REGISTRATION:
        return "registration"
    parts = module.split(".")
    return parts[1] if parts[0] == "tood_yolo" and len(parts) > 1 else parts[0]


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of the project's own modules (the package, the hook) in a file."""
    module, found = module_name(path, root), []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            # `from . import inputs` counts as an import of the package's own room: a submodule named here does not
            # change the room
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
    return [(line, name) for line, name in found if name.split(".")[0] in {"tood_yolo", "tood_yolo_hook"}]


def upward_imports(root: Path = ROOT) -> list[str]:
    """Each import of a module in another room on the same floor or above, as 'file:line (room) imports name (room)'."""
    upward = []
    for path in [*sorted((root / "tood_yolo").rglob("*.py")), root / "tood_yolo_hook.py"]:
        here = room(module_name(path, root))
        for line, name in imports(path, root):
            there = room(name)
            if there != here and FLOORS[there] >= FLOORS[here]:
                upward.append(f"{path.relative_to(root)}:{line} ({here}) imports {name} ({there})")
    return upward


def test_every_module_lives_in_a_room_of_the_order():
    rooms = {room(module_name(p)) for p in [*PACKAGE.rglob("*.py"), ROOT / "tood_yolo_hook.py"]}
    assert rooms == set(FLOORS)


def test_imports_point_down_only():
    upward = upward_imports()
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    from ..engine import trainer\n",
         ["tood_yolo/nn/model.py:2 (nn) imports tood_yolo.engine (engine)"]),
        ("import tood_yolo.register\n", ["tood_yolo/nn/model.py:1 (nn) imports tood_yolo.register (registration)"]),
        ("from . import head\nfrom ..data import inputs\nfrom ..utils.loss import TOODLoss\n", []),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, expected):
    """A copy of the package with one module rewritten: the check names an upward import (inside a function, relative
    or absolute) and lets a downward one pass."""
    for path in [*PACKAGE.rglob("*.py"), ROOT / "tood_yolo_hook.py"]:
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    (tmp_path / "tood_yolo/nn/model.py").write_text(source)
    assert upward_imports(tmp_path) == expected
