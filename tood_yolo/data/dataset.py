"""Bad inputs that Ultralytics reads without saying what is wrong: label rows and a missing labels folder.

`tood_yolo.register` puts these in place of Ultralytics' own:

- label rows: a row with the wrong number of values (numpy's "inhomogeneous shape" when other rows have 5) or a
  `nan`/`inf` value (reported as an empty list of out-of-bounds coordinates) makes Ultralytics skip the image with an
  unhelpful reason. `verify_labels` wraps Ultralytics' `verify_image_label` so that it names the label file, the
  line and the fault first, then defers to Ultralytics' own checks;
- no labels folder: Ultralytics scans, finds nothing and fails on a `.cache` file that was never written.
  `get_label_files` wraps `YOLODataset.get_label_files`, which then says "no labels folder at ..." (an error for a
  training set, a warning for validation, as Ultralytics treats unlabelled validation sets).

Under `recipe: mmdet`, `TOODDataset` also runs the reference's input pipeline (`tood_yolo.data.reference`). Damaged
video frames have their own module, `tood_yolo.data.video`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from ultralytics.data.augment import Compose, RandomFlip
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import get_split_fraction
from ultralytics.utils import LOGGER, IterableSimpleNamespace, colorstr
from ultralytics.utils.patches import imread

from .reference import collate_padded, resize_keep_ratio

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
    docstring); everything else is `YOLODataset`'s, unless `keep_ratio` is given: then it is mmdet's pipeline
    (`tood_yolo.data.reference`): keep-ratio resize to fit the (long, short) scale `keep_ratio`, horizontal flip with
    `fliplr` in training, images left at their own size for `collate_padded` to pad batch by batch.

    Args:
        keep_ratio (tuple[int, int] | None): The reference's resize scale (long, short); None: Ultralytics' pipeline.
        pad_value (tuple[float, ...]): Under `keep_ratio`, the padding's RGB colour in [0, 1] (the model's input mean:
            0 after its normalisation).
    """

    def __init__(self, *args, keep_ratio: tuple[int, int] | None = None, pad_value: tuple[float, ...] = (0.0,) * 3,
                 **kwargs):
        self.keep_ratio = keep_ratio  # before YOLODataset builds its transforms (and caches images) with it
        super().__init__(*args, **kwargs)
        if keep_ratio:
            self.collate_fn = functools.partial(collate_padded, collate=YOLODataset.collate_fn, pad_value=pad_value)

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """Ultralytics' image loading, or under `keep_ratio` the original image resized as mmcv's keep-ratio `Resize`
        (RAM caching keeps the resized image as Ultralytics' does). Returns the image, its original and its resized
        (h, w)."""
        if not self.keep_ratio:
            return super().load_image(i, rect_mode, resize_short)
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = imread(self.im_files[i], flags=self.cv2_flag)
        if im is None:
            raise FileNotFoundError(f"Image Not Found {self.im_files[i]}")
        h0, w0 = im.shape[:2]
        im = resize_keep_ratio(im, self.keep_ratio)
        return (im if im.ndim == 3 else im[..., None]), (h0, w0), im.shape[:2]

    def build_transforms(self, hyp: IterableSimpleNamespace) -> Compose:
        """Ultralytics' transforms, or under `keep_ratio` the reference's: a horizontal flip with probability `fliplr`
        in training, then Ultralytics' `Format` (the resize happened in `load_image`, the padding comes per batch)."""
        if not self.keep_ratio:
            return super().build_transforms(hyp)
        flip = [RandomFlip(direction="horizontal", p=hyp.fliplr)] if self.augment else []
        return Compose([*flip, top_left, *super().build_transforms(hyp).transforms[-1:]])

    def aspect_ratio_flags(self) -> list[bool]:
        """Per image, whether it is taller than wide (mmdet's aspect-ratio groups, from the original size)."""
        return [lb["shape"][0] > lb["shape"][1] for lb in self.labels]

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


def top_left(labels: dict) -> dict:
    """The image sits at the top left of its batch tensor: no padding offset for the validator's box rescaling
    (Ultralytics' `LetterBox` would otherwise say where it centred the image)."""
    labels["ratio_pad"] = (labels["ratio_pad"], (0, 0))
    return labels


def build_tood_dataset(
    cfg: IterableSimpleNamespace,
    img_path: str | list[str],
    batch: int | None,
    data: dict,
    mode: str = "train",
    rect: bool = False,
    stride: int = 32,
    fraction: float | None = None,
    keep_ratio: tuple[int, int] | None = None,
    pad_value: tuple[float, ...] = (0.0,) * 3,
) -> TOODDataset:
    """A `TOODDataset` built as Ultralytics' `build_yolo_dataset` builds a detection `YOLODataset`, same arguments and
    same values (its depth, semantic and multi-modal branches are other tasks); `keep_ratio`: mmdet's pipeline at that
    scale, padded with `pad_value` (no rectangular batches: the batches are padded as the reference's)."""
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
        rect=(cfg.rect or rect) and not keep_ratio,
        cache=cfg.cache or None,
        single_cls=cfg.single_cls or False,
        stride=stride,
        pad=0.0 if mode == "train" else 0.5,
        prefix=colorstr(f"{mode}: "),
        task=cfg.task,
        classes=cfg.classes,
        data=data,
        fraction=fraction,
        keep_ratio=keep_ratio,
        pad_value=pad_value,
    )
