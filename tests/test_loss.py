"""TOOD's loss functions and TOODLoss against independent computations (the paper, section 3.2;
mmdet 3.3.0 TOODHead.loss_by_feat)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from tood_yolo.engine.assigners import ATSSAssigner, TALAssigner
from tood_yolo.nn.head import TOODHead
from tood_yolo.engine.loss import TOODLoss, centerness_target, focal_loss_with_prob, giou_loss, quality_focal_loss

torch.manual_seed(0)


def mmdet_qfl_with_prob(pred, labels, score, beta=2.0):
    """mmdet's quality_focal_loss_with_prob, transcribed: negatives branch, then positives overwritten."""
    loss = F.binary_cross_entropy(pred, torch.zeros_like(pred), reduction="none") * pred.pow(beta)
    pos = (labels >= 0) & (labels < pred.shape[1])
    idx = pos.nonzero().squeeze(1)
    pl = labels[idx]
    scale = score[idx] - pred[idx, pl]
    loss[idx, pl] = F.binary_cross_entropy(pred[idx, pl], score[idx], reduction="none") * scale.abs().pow(beta)
    return loss


def test_quality_focal_loss_matches_mmdet_branches():
    n, c = 40, 5
    pred = torch.rand(n, c).clamp(1e-4, 1 - 1e-4)
    labels = torch.randint(0, c + 1, (n,))  # c = background
    score = torch.rand(n) * (labels < c)
    target = F.one_hot(labels, c + 1)[:, :c].float() * score[:, None]
    torch.testing.assert_close(quality_focal_loss(pred, target), mmdet_qfl_with_prob(pred, labels, score))


def test_focal_loss_on_probabilities_matches_torchvision_on_logits():
    logits = torch.randn(30, 4, dtype=torch.float64) * 3
    target = F.one_hot(torch.randint(0, 5, (30,)), 5)[:, :4].double()
    expected = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(focal_loss_with_prob(logits.sigmoid(), target), expected)


def test_giou_loss_matches_torchvision():
    p = torch.rand(64, 4, dtype=torch.float64) * 10
    t = torch.rand(64, 4, dtype=torch.float64) * 10
    p[:, 2:] += p[:, :2] + 0.5
    t[:, 2:] += t[:, :2] + 0.5
    torch.testing.assert_close(giou_loss(p, t), generalized_box_iou_loss(p, t, eps=0.0), rtol=1e-6, atol=1e-6)
    # disjoint boxes give a loss above 1 (GIoU < 0), identical boxes 0
    assert giou_loss(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 2, 3, 3]])) > 1
    assert giou_loss(t[:3].float(), t[:3].float()).abs().max() < 1e-6


def test_centerness_target_by_hand():
    points = torch.tensor([[5.0, 5.0], [2.0, 8.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    # point 2: l=2 r=8 t=8 b=2 -> sqrt(2/8 * 2/8) = 0.25
    torch.testing.assert_close(centerness_target(points, boxes), torch.tensor([1.0, 0.25]))


class _Model(nn.Module):
    """Just what TOODLoss reads from a DetectionModel: `.model[-1]` (the head), parameters and `.yaml`."""

    def __init__(self, nc=3, strides=(8.0, 16.0), initial_epoch=None, recipe="mmdet"):
        super().__init__()
        head = TOODHead(nc=nc, feat_channels=32, stacked_convs=1, ch=(8,) * len(strides))
        head.stride = torch.tensor(strides)
        self.model = nn.ModuleList([head])
        self.yaml = {"recipe": recipe} if initial_epoch is None else {"recipe": recipe, "initial_epoch": initial_epoch}


def _inputs(b=2, nc=3, sizes=((8, 8), (4, 4))):
    feats = [torch.zeros(b, 8, h, w) for h, w in sizes]
    a = sum(h * w for h, w in sizes)
    boxes = torch.rand(b, 4, a) * 3
    boxes[:, :2] = -boxes[:, :2]
    points = torch.cat([torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), 0).reshape(2, -1)
                        for h, w in sizes], 1).float()
    boxes = torch.cat((points + boxes[:, :2], points + boxes[:, 2:]), 1)  # xyxy around each anchor point
    scores = torch.rand(b, nc, a).clamp(0.02, 0.98)
    return {"boxes": boxes, "scores": scores, "feats": feats}


def _batch(boxes_px, classes, image_index, imgsz=64):
    xyxy = torch.tensor(boxes_px, dtype=torch.float32).view(-1, 4)
    xywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1) / imgsz
    return {
        "batch_idx": torch.tensor(image_index, dtype=torch.float32),
        "cls": torch.tensor(classes).float().view(-1, 1),
        "bboxes": xywh,
    }


def _expected(preds, batch, warmup, strides=(8.0, 16.0), nc=3):
    """The reference's loss written out per image with the (separately tested) assigners."""
    b, _, a = preds["boxes"].shape
    sizes = [f.shape[2:] for f in preds["feats"]]
    stride = torch.cat([torch.full((h * w, 1), s) for (h, w), s in zip(sizes, strides)])
    points = torch.cat([torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(-1, 2)
                        for h, w in sizes]).float() * stride
    cls_sum = box_sum = cls_factor = box_factor = 0.0
    for i in range(b):
        sel = batch["batch_idx"] == i
        xywh = batch["bboxes"][sel] * 64
        gt = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)[None]
        lab = batch["cls"][sel].view(1, -1, 1)
        mask = torch.ones(1, gt.shape[1], 1, dtype=torch.bool)
        p = preds["scores"][i].T[None]
        bx = preds["boxes"][i].T
        if warmup:
            r = ATSSAssigner(nc)(
                torch.cat((points - 4 * stride, points + 4 * stride), 1), [h * w for h, w in sizes], lab, gt, mask
            )
            t = F.one_hot(r.labels[0], nc + 1)[:, :nc].float()
            cls_sum += sigmoid_focal_loss(torch.logit(p[0].double()), t.double()).sum().item()
            fg = r.fg_mask[0]
            w = centerness_target(points[fg], r.bboxes[0][fg])
            cls_factor += fg.sum().item()
        else:
            r = TALAssigner(nc)(p, (bx * stride)[None], points, lab, gt, mask)
            fg = r.fg_mask[0]
            cls_sum += mmdet_qfl_with_prob(p[0], r.labels[0], r.quality[0]).sum().item()
            w = r.quality[0][fg]
            cls_factor += r.quality[0].sum().item()
        box_sum += (generalized_box_iou_loss(bx[fg].double(), (r.bboxes[0][fg] / stride[fg]).double()) * w).sum().item()
        box_factor += w.sum().item()
    return cls_sum / max(cls_factor, 1.0), 2.0 * box_sum / max(box_factor, 1.0)


BATCH = _batch([[4, 4, 40, 30], [30, 20, 60, 60], [10, 30, 22, 44], [2, 2, 5, 5]], [0, 2, 1, 1], [0, 0, 1, 1])


@pytest.mark.parametrize("epoch,warmup", [(0, True), (3, True), (4, False), (11, False)])
def test_loss_values_match_the_reference_formula_in_warmup_and_tal(epoch, warmup):
    model = _Model()
    loss_fn = TOODLoss(model)
    loss_fn.epoch = epoch
    assert loss_fn.warmup is warmup
    preds = _inputs()
    total, items = loss_fn(preds, BATCH)
    cls, box = _expected(preds, BATCH, warmup)
    assert items["loss_cls"].item() == pytest.approx(cls, rel=1e-4)
    assert items["loss_bbox"].item() == pytest.approx(box, rel=1e-4)
    assert total.item() == pytest.approx(cls + box, rel=1e-5)  # single process: back-propagated as the reference


def test_yaml_sets_the_warmup_length():
    loss_fn = TOODLoss(_Model(initial_epoch=1))
    loss_fn.epoch = 1
    assert not loss_fn.warmup


@pytest.mark.parametrize("epoch", [0, 4])
def test_images_and_batches_without_objects_give_finite_losses_and_gradients(epoch):
    loss_fn = TOODLoss(_Model())
    loss_fn.epoch = epoch
    preds = _inputs()
    preds = {k: (v.requires_grad_() if k != "feats" else v) for k, v in preds.items()}
    empty = _batch([], [], [])
    total, items = loss_fn(preds, empty)
    assert items["loss_bbox"].item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(preds["scores"].grad).all() and preds["scores"].grad.abs().sum() > 0
    # one image with objects, one without; a GT whose ATSS candidates differ in IoU, so warm-up has positives too
    # (a GT inside every candidate anchor ties their IoUs and mean + std rejects them all)
    half = _batch([[0, 0, 64, 64]], [0], [0])
    total, items = loss_fn(_inputs(), half)
    assert torch.isfinite(total) and items["loss_bbox"] > 0
