"""`key=value` command lines for train.py and predict.py, parsed exactly as the `yolo` command parses them."""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ultralytics.cfg import (
    DEFAULT_CFG_DICT,
    check_dict_alignment,
    get_save_dir,
    merge_equals_args,
    parse_key_value_pair,
)


def parse_args(argv: list[str], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn `["model=x.yaml", "imgsz=320", ...]` into Ultralytics overrides on top of `defaults`.

    Unknown keys get Ultralytics' own error with close-match suggestions; a bare valid boolean key (e.g. `show`)
    means True, as in `yolo`.
    """
    overrides = {}
    for a in merge_equals_args(list(argv)):
        a = a.removeprefix("--").rstrip(",")
        if "=" in a:
            k, v = parse_key_value_pair(a)
            overrides[k] = v
        elif isinstance(DEFAULT_CFG_DICT.get(a), bool):
            overrides[a] = True
        else:
            check_dict_alignment(DEFAULT_CFG_DICT, {a: ""})
            raise SyntaxError(f"'{a}' needs a value, i.e. '{a}={DEFAULT_CFG_DICT.get(a)}'")
    check_dict_alignment(DEFAULT_CFG_DICT, overrides)
    return {**(defaults or {}), **overrides}


def parse_tool_args(argv: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """`key=value` arguments of a tool (not of an Ultralytics mode) over its `defaults`, which list the valid keys.

    Values are parsed as `yolo` parses them; an unknown key or a key without a value is a SyntaxError with the
    closest valid key as a hint.
    """
    args = dict(defaults)
    for pair in merge_equals_args(list(argv)):  # as `yolo` does, so "imgsz = 320" works too
        k, v = parse_key_value_pair(pair) if "=" in pair else (pair, None)
        if k not in defaults or v is None:
            close = get_close_matches(k, defaults)
            hint = f" Did you mean {close[0]}=...?" if close and close[0] != k else ""
            raise SyntaxError(f"'{pair}' is not a valid key=value argument.{hint} Keys: {', '.join(defaults)}")
        args[k] = v
    return args


def resume_checkpoint(args: dict[str, Any]) -> str:
    """The checkpoint a `resume=` training continues: `resume=<file>`, else a `model=` .pt, else the last.pt of the run
    that `project=` and `name=` name (where Ultralytics' trainer saves it).

    Raises:
        FileNotFoundError: that checkpoint does not exist (Ultralytics would look its name up on GitHub).
    """
    resume, model = args["resume"], str(args.get("model") or "")
    if isinstance(resume, str):
        last = Path(resume)
    elif model.endswith(".pt"):
        last = Path(model)
    else:
        run = SimpleNamespace(project=args.get("project"), name=args.get("name"), task="detect", mode="train",
                              exist_ok=True)
        last = get_save_dir(run) / "weights" / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"resume: no {last.name} in {last.parent}; pass resume=path/to/last.pt, or the "
                                f"project= and name= of the run to resume")
    return str(last)
