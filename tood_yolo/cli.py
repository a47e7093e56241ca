"""`key=value` command lines for train.py and predict.py, parsed exactly as the `yolo` command parses them."""

from __future__ import annotations

from typing import Any

from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment, merge_equals_args, parse_key_value_pair


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
