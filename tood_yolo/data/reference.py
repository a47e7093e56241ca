"""mmdetection's input pipeline for the paper's models, inside Ultralytics' dataset and dataloader (`recipe: mmdet`).

The reference (`tood_r50_fpn_1x_coco`, mmdet 3.3.0) trains and tests on:

- `Resize(scale=(1333, 800), keep_ratio=True)`: mmcv's `rescale_size`, factor = min(1333 / long, 800 / short), new
  size int(side * factor + 0.5), bilinear (cv2 INTER_LINEAR) on the uint8 BGR image (`reference_resize_shape`,
  `resize_keep_ratio`; `TOODDataset.load_image` uses them in place of Ultralytics' long-side resize);
- `RandomFlip(prob=0.5)`, horizontal, in training only (Ultralytics' `RandomFlip` with `fliplr`);
- `DetDataPreprocessor(pad_size_divisor=32)`: every image of a batch padded bottom-right, after normalisation, with 0,
  to the batch's largest height and width rounded up to 32 (`collate_padded` pads, `fill_padding` paints the padding
  with the colour that normalises to 0 once the batch is float); each image's own padded shape (`pad_shape`, its
  resized shape rounded up to 32) decides which anchors take part in its targets and loss
  (`tood_yolo.utils.assigners.valid_anchor_mask`);
- `AspectRatioBatchSampler`: batches of images that are all landscape (width >= height) or all portrait.

`imgsz` is the long side of the scale: the recipe sets 1333, and `imgsz=N` fits images into (N, round(N * 800 / 1333)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Sampler
from ultralytics.data.build import InfiniteDataLoader, _RepeatSampler

SCALE = (1333, 800)  # mmdet Resize scale (long, short), keep_ratio=True
SIZE_DIVISOR = 32  # DetDataPreprocessor pad_size_divisor


def reference_scale(imgsz: int | Sequence[int]) -> tuple[int, int]:
    """The (long, short) scale an `imgsz` stands for: the reference's (1333, 800) at 1333, the same 5:3 shape else."""
    long = max(imgsz) if isinstance(imgsz, (list, tuple)) else int(imgsz)
    return long, round(long * SCALE[1] / SCALE[0])


def reference_resize_shape(h: int, w: int, scale: tuple[int, int] = SCALE) -> tuple[int, int]:
    """(new_h, new_w) of mmcv's keep-ratio rescale: factor min(long_max / long, short_max / short), rounded half up."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def padded_shape(h: int, w: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(H, W) after padding bottom/right to multiples of `divisor`."""
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def resize_keep_ratio(img: np.ndarray, scale: tuple[int, int] = SCALE) -> np.ndarray:
    """`img` (H, W[, C]) resized as mmcv's `imrescale(img, scale, interpolation='bilinear')` with the cv2 backend."""
    h, w = img.shape[:2]
    nh, nw = reference_resize_shape(h, w, scale)
    return img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)


def collate_padded(batch: list[dict], collate, pad_value: Sequence[float]) -> dict:
    """`collate` (Ultralytics' `YOLODataset.collate_fn`) of images of different sizes, as the reference batches them.

    Each CHW image goes to the top left of a zero tensor of the batch's largest padded height and width; its normalised
    boxes are rescaled to that tensor; `pad_shape` (B, 2) holds each image's own padded (h, w) and `resized_shape` its
    resized one, for `fill_padding` (with `pad_value`, RGB in [0, 1], kept as "pad_value") and the loss's valid
    anchors (`tood_yolo.utils.assigners.valid_anchor_mask`). The padding is painted once the batch is float: uint8
    cannot hold the mean colour.
    """
    shapes = [tuple(b["img"].shape[1:]) for b in batch]
    pads = [padded_shape(h, w) for h, w in shapes]
    size = (max(p[0] for p in pads), max(p[1] for p in pads))
    out = []
    for b, (h, w), pad in zip(batch, shapes, pads):
        img = b["img"].new_zeros((b["img"].shape[0], *size))
        img[:, :h, :w] = b["img"]
        gain = torch.tensor([w / size[1], h / size[0]] * 2, dtype=b["bboxes"].dtype)
        out.append({**b, "img": img, "bboxes": b["bboxes"] * gain})
    batch = collate(out)
    batch["pad_shape"], batch["pad_value"] = torch.tensor(pads), tuple(pad_value)
    return batch


def fill_batch_padding(batch: dict) -> dict:
    """`fill_padding` of a float batch that `collate_padded` made (any other batch is left as it is)."""
    if "pad_shape" in batch:
        fill_padding(batch["img"], batch["resized_shape"], batch["pad_value"])
    return batch


def fill_padding(img: torch.Tensor, resized_shapes, value: Sequence[float]) -> torch.Tensor:
    """Paint, in place, every pixel of a float (B, C, H, W) batch outside each image's resized (h, w) with `value`
    (per channel): the colour that the model's input normalisation takes to 0, as the reference pads after it."""
    fill = torch.tensor(value, dtype=img.dtype, device=img.device).view(-1, 1, 1)
    for x, (h, w) in zip(img, resized_shapes):
        x[:, int(h):, :] = fill
        x[:, : int(h), int(w):] = fill
    return img


class AspectRatioBatchSampler(Sampler):
    """mmdet's `AspectRatioBatchSampler`: batches of `batch_size` indices from `sampler` whose images are all landscape
    (width >= height) or all portrait, in the order the sampler gives them; what is left over at the end (less than a
    batch of each) goes out, portrait indices then landscape ones, in batches of `batch_size` (the last may be
    smaller: mmdet's `drop_last=False`).

    Args:
        sampler (Sampler): The index sampler (random for training, distributed under DDP).
        portrait (Sequence[bool]): Per dataset index, whether the image is taller than wide.
        batch_size (int): Images per batch.
    """

    def __init__(self, sampler: Sampler, portrait: Sequence[bool], batch_size: int):
        super().__init__()
        self.sampler, self.portrait, self.batch_size = sampler, list(portrait), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buckets: tuple[list[int], list[int]] = ([], [])
        for i in self.sampler:
            bucket = buckets[0 if self.portrait[i] else 1]  # mmdet: bucket 0 if width < height
            bucket.append(i)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        left = buckets[0] + buckets[1]
        for start in range(0, len(left), self.batch_size):
            yield left[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


def group_by_aspect_ratio(loader: InfiniteDataLoader, portrait: Sequence[bool]) -> InfiniteDataLoader:
    """Ultralytics' training loader (`build_dataloader`) with its batches drawn by `AspectRatioBatchSampler` over the
    loader's own index sampler (random, or distributed with its `set_epoch` under DDP), before its workers start.
    The loader keeps its repeating wrapper, as `InfiniteDataLoader` installs it."""
    batches = loader.batch_sampler.sampler  # InfiniteDataLoader: _RepeatSampler(torch's BatchSampler)
    grouped = AspectRatioBatchSampler(batches.sampler, portrait, batches.batch_size)
    object.__setattr__(loader, "batch_sampler", _RepeatSampler(grouped))  # DataLoader forbids a plain setattr
    return loader
