"""Bad inputs that Ultralytics reads without saying what is wrong: label rows and a missing labels folder.

`tood_yolo.register` puts these in place of Ultralytics' own:

- label rows: a row with the wrong number of values (numpy's "inhomogeneous shape" when other rows have 5) or a
  `nan`/`inf` value (reported as an empty list of out-of-bounds coordinates) makes Ultralytics skip the image with an
  unhelpful reason. `verify_labels` wraps Ultralytics' `verify_image_label` so that it names the label file, the
  line and the fault first, then defers to Ultralytics' own checks;
- no labels folder: Ultralytics scans, finds nothing and fails on a `.cache` file that was never written.
  `get_label_files` wraps `YOLODataset.get_label_files`, which then says "no labels folder at ..." (an error for a
  training set, a warning for validation, as Ultralytics treats unlabelled validation sets).

Damaged video frames have their own module, `tood_yolo.data.video`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import get_split_fraction
from ultralytics.utils import LOGGER, IterableSimpleNamespace, colorstr

BOX_COLUMNS = 5  # class x_center y_center width height


def label_row_error(lb_file: str, keypoint: bool, kpt_values: int = 0) -> str | None:
    """The first fault of a label file's rows that Ultralytics would report unclearly, or None.

    A row must have 5 values (a box), an odd number above 6 (class and a polygon, segment labels) or, for a dataset
    with `kpt_shape`, 5 + `kpt_values` (a pose row, whose box a detection task keeps); a pose task's rows are left to
    Ultralytics, which checks their length against `kpt_shape`. Every value must be a finite number.
    """
    try:
        with open(lb_file, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None  # a missing, unreadable or binary label file: Ultralytics' own handling
    for n, line in enumerate(lines, 1):
        values = line.split()
        if not values:
            continue
        n_ok = len(values) in {BOX_COLUMNS, BOX_COLUMNS + kpt_values} or len(values) >= 7 and len(values) % 2
        if not keypoint and not n_ok:
            return f"{lb_file} line {n}: {len(values)} values, expected {BOX_COLUMNS} columns (class x y w h)"
        try:
            bad = next((v for v in values if not math.isfinite(float(v))), None)
        except ValueError as e:
            return f"{lb_file} line {n}: {e}"
        if bad is not None:
            return f"{lb_file} line {n}: value '{bad}' is not a finite number"
    return None


def verify_labels(verify_image_label):
    """Ultralytics' `verify_image_label` (same arguments and result) that names a bad label row first."""

    @functools.wraps(verify_image_label)
    def verify(args: tuple) -> tuple | list:
        im_file, lb_file, prefix, keypoint, _, nkpt, ndim = args[:7]
        error = label_row_error(lb_file, keypoint, nkpt * ndim)
        if error is None:
            return verify_image_label(args)
        # Ultralytics' result for a corrupt pair: nothing kept, counted as found (nf) and corrupt (nc)
        return [None, None, None, None, None, 0, 1, 0, 1, f"{prefix}{im_file}: ignoring corrupt image/label: {error}"]

    return verify


class TOODDataset(YOLODataset):
    """Ultralytics' detection dataset whose label scan names bad label rows and a missing labels folder (see the module
    docstring); everything else is `YOLODataset`'s."""

    def get_label_files(self) -> list[str]:
        """`YOLODataset.get_label_files`, which says so when the labels folder of the images does not exist."""
        files = super().get_label_files()
        folders = sorted({str(Path(f).parent) for f in files})
        if files and not any(Path(d).is_dir() for d in folders):
            more = f" (and {len(folders) - 1} more)" if len(folders) > 1 else ""
            msg = (f"{self.prefix}no labels folder at {folders[0]}{more}: labels are read from the 'labels' folder "
                   f"beside 'images', one <image name>.txt per image")
            if self.augment:  # training needs labels; Ultralytics also only warns for unlabelled validation sets
                raise FileNotFoundError(msg)
            LOGGER.warning(msg)
        return files

    def verify_args(self) -> tuple:
        """`YOLODataset.verify_args` with its verification function wrapped by `verify_labels`."""
        verify, iterable = super().verify_args()
        return verify_labels(verify), iterable


def build_tood_dataset(
    cfg: IterableSimpleNamespace,
    img_path: str | list[str],
    batch: int | None,
    data: dict,
    mode: str = "train",
    rect: bool = False,
    stride: int = 32,
    fraction: float | None = None,
) -> TOODDataset:
    """A `TOODDataset` built as Ultralytics' `build_yolo_dataset` builds a detection `YOLODataset`, same arguments and
    same values (its depth, semantic and multi-modal branches are other tasks)."""
    if data.get("complete"):
        fraction = 1.0  # already limited during dataset download
    elif fraction is None:
        fraction = get_split_fraction(cfg.fraction, "train" if mode == "train" else cfg.split)
    return TOODDataset(
        img_path=img_path,
        imgsz=cfg.imgsz,
        batch_size=batch,
        augment=mode == "train",
        hyp=cfg,
        rect=cfg.rect or rect,
        cache=cfg.cache or None,
        single_cls=cfg.single_cls or False,
        stride=stride,
        pad=0.0 if mode == "train" else 0.5,
        prefix=colorstr(f"{mode}: "),
        task=cfg.task,
        classes=cfg.classes,
        data=data,
        fraction=fraction,
    )
