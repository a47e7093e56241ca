"""mmdet's input pipeline under `recipe: mmdet` (tood_yolo/data/reference.py) against figures worked out from mmcv's and
mmdet's rules, and the per-image valid anchors of a batch of mixed sizes (mmdet's `valid_flags`)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.utils.tal import make_anchors

from tood_yolo.data.dataset import build_tood_dataset
from tood_yolo.data.reference import (
    AspectRatioBatchSampler,
    fill_batch_padding,
    reference_resize_shape,
    reference_scale,
)
from tood_yolo.nn.backbone import IMAGENET_MEAN
from tood_yolo.utils.assigners import valid_anchor_mask
from tood_yolo.utils.loss import TOODLoss

from test_loss import _Model  # tests/ is on sys.path (pytest's rootdir conftest)

# coco8 train: (h, w) -> mmcv rescale_size to fit (1333, 800): factor min(1333 / 640, 800 / h), int(side * f + 0.5)
#   480 x 640: f = 800 / 480 = 1.6667 -> 800 x int(1067.17) = 1067, padded to 800 x 1088
#   426 x 640: f = 800 / 426 = 1.8779 -> 800 x int(1202.35) = 1202, padded to 800 x 1216
#   428 x 640: f = 800 / 428 = 1.8692 -> 800 x int(1196.76) = 1196, padded to 800 x 1216
#   425 x 640: f = 800 / 425 = 1.8824 -> 800 x int(1205.2) = 1205, padded to 800 x 1216
RESIZED = {"000000000009": (800, 1067), "000000000025": (800, 1202), "000000000030": (800, 1196),
           "000000000034": (800, 1205)}


@pytest.mark.parametrize(
    "hw, scale, resized",
    [
        ((480, 640), (1333, 800), (800, 1067)),
        ((428, 640), (1333, 800), (800, 1196)),
        ((640, 481), (1333, 800), (1064, 800)),  # portrait: f = 800 / 481, int(1064.45 + 0.5) = 1064
        ((480, 640), reference_scale(1000), (600, 800)),  # imgsz=1000: (1000, 600), f = min(1.5625, 1.25)
        ((100, 1000), (1333, 800), (133, 1333)),  # long side caps: f = 1.333
    ],
)
def test_resize_shapes_follow_mmcv_rescale_size(hw, scale, resized):
    assert reference_resize_shape(*hw, scale) == resized
    assert reference_scale(1333) == (1333, 800)


def dataset(root, augment: bool, fliplr: float, scale=(1333, 800)):
    cfg = get_cfg(overrides={"fliplr": fliplr, "imgsz": scale[0]})
    data = {"names": {i: str(i) for i in range(80)}, "nc": 80, "channels": 3}
    return build_tood_dataset(cfg, str(root / "images" / "train"), 2, data, mode="train" if augment else "val",
                              keep_ratio=scale, pad_value=IMAGENET_MEAN)


@pytest.fixture(scope="module")
def coco8(shared_data):
    return shared_data("coco8")


@pytest.mark.parametrize("fliplr", [0.0, 1.0])
def test_items_are_resized_bilinear_and_flipped(coco8, fliplr):
    ds = dataset(coco8, augment=True, fliplr=fliplr)
    for i, file in enumerate(ds.im_files):
        item = ds[i]
        stem = file.rsplit("/", 1)[-1][:-4]
        assert tuple(item["img"].shape[1:]) == RESIZED[stem]
        expected = cv2.resize(cv2.imread(file), RESIZED[stem][::-1], interpolation=cv2.INTER_LINEAR)[..., ::-1]
        expected = expected[:, ::-1] if fliplr else expected
        assert np.array_equal(item["img"].permute(1, 2, 0).numpy(), expected)
        label = np.loadtxt(file.replace("images", "labels")[:-4] + ".txt", ndmin=2)[:, 1:]
        x = 1 - label[:, 0] if fliplr else label[:, 0]
        np.testing.assert_allclose(item["bboxes"][:, 0].numpy(), x, atol=1e-6)
        np.testing.assert_allclose(item["bboxes"][:, 1:].numpy(), label[:, 1:], atol=1e-6)


def test_batches_pad_bottom_right_to_32_with_the_mean(coco8):
    ds = dataset(coco8, augment=False, fliplr=0.0)
    order = sorted(range(len(ds)), key=lambda i: ds.im_files[i])
    items = [ds[order[0]], ds[order[2]]]  # 000000000009 (800 x 1067) and 000000000030 (800 x 1196)
    batch = ds.collate_fn(items)
    assert tuple(batch["img"].shape) == (2, 3, 800, 1216) and batch["img"].dtype == torch.uint8
    assert batch["pad_shape"].tolist() == [[800, 1088], [800, 1216]]
    assert [tuple(s) for s in batch["resized_shape"]] == [(800, 1067), (800, 1196)]
    assert batch["ratio_pad"][0][1] == (0, 0)  # top-left: no offset when the validator maps boxes back
    # boxes keep their pixels: normalised to the 1216-wide tensor instead of the 1067-wide image
    n0 = len(items[0]["bboxes"])
    np.testing.assert_allclose(batch["bboxes"][:n0, 0] * 1216, items[0]["bboxes"][:, 0] * 1067, rtol=1e-6)
    np.testing.assert_allclose(batch["bboxes"][:n0, 1] * 800, items[0]["bboxes"][:, 1] * 800, rtol=1e-6)
    assert batch["img"][0, :, :, 1067:].eq(0).all() and batch["img"][0, :, :800, :1067].equal(items[0]["img"])
    batch["img"] = batch["img"].float() / 255
    fill_batch_padding(batch)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    assert batch["img"][0, :, :, 1067:].reshape(3, -1).eq(mean).all()  # 0 after the ResNet's normalisation
    assert batch["img"][1, :, :, 1196:].reshape(3, -1).eq(mean).all()
    assert batch["img"][1, :, :, :1196].mul(255).round().to(torch.uint8).equal(items[1]["img"])


def test_aspect_ratio_batches_as_mmdet():
    """mmdet's AspectRatioBatchSampler, worked by hand: landscape (L) and portrait (P) indices each fill their own
    batch in the sampler's order; the left-overs go out portrait first, in batches of the batch size."""
    portrait = [False, True, False, True, True, False, False]  # 0 L, 1 P, 2 L, 3 P, 4 P, 5 L, 6 L
    batches = list(AspectRatioBatchSampler([6, 1, 0, 3, 5, 4, 2], portrait, 2))
    assert batches == [[6, 0], [1, 3], [5, 2], [4]]  # L fills first (6, 0), then P (1, 3), then L (5, 2); 4 is left
    assert len(AspectRatioBatchSampler(range(7), portrait, 2)) == 4 == len(batches)
    # batch 4: P 0, 1, 2 wait for a fourth (6); L 3, 4, 5 are left over (mmdet 3.3.0 gives the same, run by hand)
    assert list(AspectRatioBatchSampler(range(7), [True, True, True, False, False, False, True], 4)) == [
        [0, 1, 2, 6], [3, 4, 5]]


def test_valid_anchors_are_those_inside_each_images_padded_shape():
    """The issue's figure: in an 800 x 1216 batch the 800 x 1067 image, padded to 800 x 1088, has 2,133 anchors
    outside it; the mask against anchor points computed independently (top-left anchors, TOOD's offset 0)."""
    strides = [8, 16, 32, 64, 128]
    shapes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]  # mmdet's FPN on 800 x 1216 (P6, P7: ceil / 2)
    pads = torch.tensor([[800, 1088], [800, 1216]])
    mask = valid_anchor_mask(pads, shapes, strides)
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    points, stride = make_anchors(feats, torch.tensor(strides, dtype=torch.float32), 0.0)
    px = points * stride
    for i, (h, w) in enumerate(pads.tolist()):
        assert torch.equal(mask[i], (px[:, 0] < w) & (px[:, 1] < h))
    assert int((~mask[0]).sum()) == 2133 and bool(mask[1].all())


@pytest.mark.parametrize("epoch", [0, 4])  # ATSS warm-up, then TAL
def test_loss_with_padded_shape_equals_the_loss_of_the_image_alone(epoch):
    """A batch tensor larger than the image's padded shape: the loss over the valid anchors equals the loss of the
    same predictions with the feature maps cut to the padded shape (mmdet's `valid_flags` anchors only)."""
    torch.manual_seed(0)
    full, cut, strides = ((8, 8), (4, 4)), ((5, 7), (3, 4)), (8.0, 16.0)  # pad (40, 56): ceil(40 / s), ceil(56 / s)
    a = sum(h * w for h, w in full)
    points = torch.cat([torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), 0).reshape(2, -1)
                        for h, w in full], 1).float()
    boxes = torch.rand(1, 4, a) * 3
    boxes = torch.cat((points - boxes[:, :2], points + boxes[:, 2:]), 1)
    scores = torch.rand(1, 3, a).clamp(0.02, 0.98)
    keep = valid_anchor_mask(torch.tensor([[40, 56]]), full, strides)[0]
    gts = torch.tensor([[4.0, 4.0, 30.0, 26.0], [20.0, 10.0, 54.0, 38.0]])  # xyxy px inside 40 x 56

    def batch(h, w):
        xywh = torch.cat(((gts[:, :2] + gts[:, 2:]) / 2, gts[:, 2:] - gts[:, :2]), 1) / torch.tensor([w, h, w, h])
        return {"batch_idx": torch.zeros(2), "cls": torch.tensor([[0.0], [2.0]]), "bboxes": xywh}

    fn = TOODLoss(_Model())
    fn.epoch = epoch
    masked = fn({"boxes": boxes, "scores": scores, "feats": [torch.zeros(1, 8, h, w) for h, w in full]},
                {**batch(64, 64), "pad_shape": torch.tensor([[40, 56]])})[1]
    alone = fn({"boxes": boxes[..., keep], "scores": scores[..., keep],
                "feats": [torch.zeros(1, 8, h, w) for h, w in cut]}, batch(40, 56))[1]
    unmasked = fn({"boxes": boxes, "scores": scores, "feats": [torch.zeros(1, 8, h, w) for h, w in full]},
                  batch(64, 64))[1]
    for k in ("loss_cls", "loss_bbox"):
        torch.testing.assert_close(masked[k], alone[k])
    assert not torch.isclose(unmasked["loss_cls"], alone["loss_cls"])  # the padding's anchors counted otherwise
