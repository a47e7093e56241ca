"""`python -m tood_yolo.tools.coco`: score a predictions.json of `yolo val save_json=True` against any COCO annotation
file with pycocotools (`tood_yolo.utils.coco.coco_eval`), offline:

    $ python -m tood_yolo.tools.coco predictions=runs/detect/val/predictions.json annotations=instances_val2017.json

Ultralytics writes image ids as the file stem (an int when numeric) and category ids as class index + 1 (COCO's 91
ids only for COCO val2017 itself). Images are matched by id, else by file name; categories by id when every
predicted id is a category of the annotation file, else class index + 1 -> the annotation file's i-th category in
sorted order (COCO's 80 of 91 ids for a COCO-class model). `classmap=index|none` forces either.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ultralytics.utils import LOGGER

from ..utils.coco import coco_eval, read_json


def match_predictions(
    predictions: list[dict], gt: dict, classmap: str = "auto"
) -> tuple[list[dict], dict[str, int]]:
    """Map a predictions.json of `yolo val` onto a COCO annotation dict: image ids (by id, else file name) and
    category ids (`classmap`: "auto", "index" = class index + 1 -> i-th sorted category id, or "none").

    Returns the mapped detections and counts of what was left out (`unknown_image`, `unknown_category`).
    """
    if classmap not in {"auto", "index", "none"}:
        raise ValueError(f"classmap must be auto, index or none, got {classmap!r}")
    ids = {img["id"] for img in gt.get("images", [])}
    by_file = {Path(str(img["file_name"])).name: img["id"] for img in gt.get("images", []) if "file_name" in img}
    by_stem = {Path(str(img["file_name"])).stem: img["id"] for img in gt.get("images", []) if "file_name" in img}
    cats = sorted(c["id"] for c in gt.get("categories", []))
    pred_cats = {d["category_id"] for d in predictions}
    if classmap == "auto":
        if pred_cats <= set(cats):
            classmap = "none"
            if cats != list(range(1, len(cats) + 1)) and pred_cats <= set(range(1, len(cats) + 1)):
                LOGGER.warning(
                    "predicted category ids fit both the annotation ids and class index + 1: taken as annotation ids "
                    "(pass classmap=index if the predictions come from a non-COCO-val2017 `yolo val`)"
                )
        elif pred_cats <= set(range(1, len(cats) + 1)):
            classmap = "index"
        else:
            raise ValueError(
                f"predicted category ids {sorted(pred_cats - set(cats))[:10]} are neither categories of the annotation "
                f"file nor class indices + 1 of its {len(cats)} categories"
            )
    out, left = [], {"unknown_image": 0, "unknown_category": 0}
    for d in predictions:
        image_id = d["image_id"]
        if image_id not in ids:
            name = Path(str(d.get("file_name", ""))).name
            image_id = by_file.get(name, by_stem.get(str(d["image_id"])))
        if image_id is None:
            left["unknown_image"] += 1
            continue
        c = d["category_id"]
        if classmap == "index":
            c = cats[c - 1] if 1 <= c <= len(cats) else None
        if c is None or c not in cats:
            left["unknown_category"] += 1
            continue
        out.append({**d, "image_id": image_id, "category_id": c})
    return out, left


def main(argv: list[str] | None = None) -> dict[str, float]:
    """`python -m tood_yolo.tools.coco predictions=... annotations=... [classmap=auto|index|none]`:
    print COCO's table."""
    args = {"classmap": "auto"}
    for a in sys.argv[1:] if argv is None else argv:
        k, sep, v = a.partition("=")
        if not sep or k not in {"predictions", "annotations", "classmap"}:
            raise SyntaxError(f"'{a}': use predictions=<predictions.json> annotations=<instances.json> "
                              f"[classmap=auto|index|none]")
        args[k] = v
    if "predictions" not in args or "annotations" not in args:
        raise SyntaxError("give predictions=<predictions.json of yolo val save_json=True> annotations=<COCO json>")
    gt = read_json(args["annotations"])
    dets, left = match_predictions(read_json(args["predictions"]), gt, args["classmap"])
    for k, n in left.items():
        if n:
            LOGGER.warning(f"{n} detections left out: {k.replace('_', ' ')} in {args['annotations']}")
    print(f"{args['predictions']}: {len(dets)} detections; {args['annotations']}: {len(gt.get('images', []))} images, "
          f"{len(gt.get('annotations', []))} instances")
    return coco_eval(dets, gt, print_fn=print)


if __name__ == "__main__":
    try:
        main()
    except (SyntaxError, ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
