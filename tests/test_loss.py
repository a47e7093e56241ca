"""TOOD's loss functions and TOODLoss against independent computations (the paper, section 3.2;
mmdet 3.3.0 TOODHead.loss_by_feat)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from tood_yolo.utils.assigners import ATSSAssigner, TALAssigner
from tood_yolo.utils.loss import TOODLoss, centerness_target, focal_loss_with_prob, giou_loss, quality_focal_loss
from tood_yolo.utils.recipe import RECIPES
from tood_yolo.nn.head import TOODHead

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


def fcos_centerness(points, boxes):
    """FCOS centreness of points (N, 2) in boxes (N, 4 xyxy), as mmdet's TOODHead.centerness_target writes it."""
    l, t = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    r, b = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    return ((torch.min(l, r) / torch.max(l, r)) * (torch.min(t, b) / torch.max(t, b))).sqrt()


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
            w = fcos_centerness(points[fg], r.bboxes[0][fg])
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


# A batch whose ATSS assignment is worked out by hand (mmdet 3.3.0 ATSSAssigner, topk 9, TOOD's anchors of 8 strides).
# A 128 x 128 image, P3 (stride 8, 16 x 16, anchors 64 px) and P4 (stride 16, 8 x 8, anchors 128 px), anchor points at
# multiples of the stride. A GT's candidates are the 9 anchors per level nearest its centre (no ties at the 9th); their
# IoUs come in groups of equal values (rows or columns of anchors), and the positives are the candidates at or above
# mean + unbiased std of the 18 IoUs whose points lie inside the GT (every candidate here does):
# - image 0, GT 0 [3, 16, 123, 84], class 0: threshold 0.490. P3 row y=48, x=56/64/72 (IoU 0.502) and P4 column x=64,
#   y=32/48/64 (0.498) pass; the next groups are P3 y=56 (0.456) and P4 x=48 (0.433). Positives on both levels.
# - image 1, GT 0 [32, 5, 96, 89], class 2: threshold 0.673. P3 column x=64, y=40/48/56 (0.762) pass; next 0.609.
# - image 1, GT 1 [1, 34, 125, 128], class 1: threshold 0.637. P4 column x=64, y=64/80/96 (0.711) pass; next 0.593.
# No anchor is positive for two GTs. Image 0 has one GT, so its second GT row is padding.
HAND_IMGSZ, HAND_STRIDES, HAND_NC = 128, (8.0, 16.0), 3
HAND_GTS = {0: [([3, 16, 123, 84], 0)], 1: [([32, 5, 96, 89], 2), ([1, 34, 125, 128], 1)]}  # image: [(xyxy px, class)]
HAND_POSITIVES = {  # (image, GT in the image): (stride, x px, y px) of its positive anchors
    (0, 0): [(8, 56, 48), (8, 64, 48), (8, 72, 48), (16, 64, 32), (16, 64, 48), (16, 64, 64)],
    (1, 0): [(8, 64, 40), (8, 64, 48), (8, 64, 56)],
    (1, 1): [(16, 64, 64), (16, 64, 80), (16, 64, 96)],
}


def _hand_grid():
    """Anchor points (A, 2) px and strides (A,) of the hand-worked batch, level after level, row-major, offset 0."""
    points, strides = [], []
    for s in HAND_STRIDES:
        n = int(HAND_IMGSZ // s)
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        points.append(torch.stack((xs, ys), -1).view(-1, 2).double() * s)
        strides.append(torch.full((n * n,), s, dtype=torch.float64))
    return torch.cat(points), torch.cat(strides)


def _hand_anchor(stride, x, y):
    """Index in the flat anchor axis of the anchor of `stride` at pixel (x, y)."""
    start = 0
    for s in HAND_STRIDES:
        n = int(HAND_IMGSZ // s)
        if s == stride:
            return start + int(y // s) * n + int(x // s)
        start += n * n
    raise ValueError(stride)


def _hand_case():
    """The hand-worked batch, and predictions for it: (B, 4, A) boxes in stride units, (B, nc, A) probabilities.

    Every positive predicts its GT moved by up to 8 px per side (GIoU losses and centreness both vary across the
    positives); every other anchor predicts a box left of and above the image, which overlaps no GT. So the task-aligned
    assigner (TAL) has t = s * u^6 > 0 only on the hand positives (at most 6 per GT, under its top-13), and each goes to
    its own GT: it overlaps that one far more than the other GT of its image (asserted in `_hand_reference`).
    """
    g = torch.Generator().manual_seed(21)
    points, strides = _hand_grid()
    b, a = len(HAND_GTS), points.shape[0]
    boxes = torch.tensor([-3.0, -3.0, -2.0, -2.0]).view(1, 4, 1).repeat(b, 1, a)
    for (i, k), anchors in HAND_POSITIVES.items():
        gt = torch.tensor(HAND_GTS[i][k][0], dtype=torch.float32)
        for s, x, y in anchors:
            boxes[i, :, _hand_anchor(s, x, y)] = (gt + (torch.rand(4, generator=g) * 16 - 8)) / s
    scores = torch.rand(b, HAND_NC, a, generator=g) * 0.96 + 0.02
    feats = [torch.zeros(b, 8, int(HAND_IMGSZ // s), int(HAND_IMGSZ // s)) for s in HAND_STRIDES]
    batch = _batch(
        [box for i in HAND_GTS for box, _ in HAND_GTS[i]],
        [c for i in HAND_GTS for _, c in HAND_GTS[i]],
        [i for i in HAND_GTS for _ in HAND_GTS[i]],
        imgsz=HAND_IMGSZ,
    )
    return {"boxes": boxes, "scores": scores, "feats": feats}, batch


def _hand_reference(preds, warmup):
    """mmdet 3.3.0 TOODHead.loss_by_feat on the hand-worked batch, in float64, from the hand positives.

    Warm-up: sigmoid focal loss (gamma 2, alpha 0.25) on the hard ATSS labels over every anchor and class / number of
    positives; GIoU of each positive weighted by its FCOS centreness / sum of centreness, x 2. TAL: quality focal
    loss with t_hat / sum of t_hat; GIoU weighted by t_hat / sum of t_hat, x 2. t = s * u^6 with u the IoU of the
    predicted box with the GT, t_hat = t / (max t + 1e-7) * max u over the GT's positives.

    Returns:
        (loss_cls, loss_bbox, number of positives)
    """
    points, strides = _hand_grid()
    p = preds["scores"].double().permute(0, 2, 1)  # (B, A, C)
    boxes = preds["boxes"].double().permute(0, 2, 1)  # (B, A, 4) stride units
    target = torch.zeros_like(p)  # the soft (TAL) or hard (ATSS) label of each positive's class, 0 elsewhere
    cls_factor = box_sum = box_factor = 0.0
    for (i, k), anchors in HAND_POSITIVES.items():
        gt, c = torch.tensor(HAND_GTS[i][k][0], dtype=torch.float64), HAND_GTS[i][k][1]
        idx = torch.tensor([_hand_anchor(*anchor) for anchor in anchors])
        pred_px = boxes[i, idx] * strides[idx, None]
        if warmup:
            quality = torch.ones(len(idx), dtype=torch.float64)
            weight = fcos_centerness(points[idx], gt.expand(len(idx), 4))
        else:
            ious = box_iou(pred_px, torch.stack([torch.tensor(g, dtype=torch.float64) for g, _ in HAND_GTS[i]]))
            assert (ious.argmax(1) == k).all(), "hand-worked TAL case: a positive overlaps another GT more than its own"
            u = ious[:, k]
            t = p[i, idx, c] * u.pow(6)
            quality = weight = t / (t.max() + 1e-7) * u.max()
        target[i, idx, c] = quality
        cls_factor += quality.sum().item()
        giou = generalized_box_iou_loss(boxes[i, idx], gt / strides[idx, None])
        box_sum += (weight * giou).sum().item()
        box_factor += weight.sum().item()
    if warmup:
        hard = target  # 1 at (positive, its class)
        loss = -(0.25 * hard * (1 - p).pow(2) * p.log() + 0.75 * (1 - hard) * p.pow(2) * (1 - p).log())
    else:  # BCE(p, t_hat) |t_hat - p|^2 at (positive, its class), BCE(p, 0) p^2 everywhere else
        loss = -(target * p.log() + (1 - target) * (1 - p).log()) * (target - p).abs().pow(2)
    num_pos = sum(len(v) for v in HAND_POSITIVES.values())
    return loss.sum().item() / max(cls_factor, 1.0), 2.0 * box_sum / max(box_factor, 1.0), num_pos


@pytest.mark.parametrize("epoch", [RECIPES["mmdet"].initial_epoch - 1, RECIPES["mmdet"].initial_epoch])
def test_loss_on_hand_worked_atss_positives_at_the_switch_to_tal(epoch):
    """The last warm-up epoch and the first TAL epoch on a batch with ATSS positives on P3 and P4."""
    loss_fn = TOODLoss(_Model(nc=HAND_NC, strides=HAND_STRIDES))
    loss_fn.epoch = epoch
    warmup = epoch < RECIPES["mmdet"].initial_epoch
    assert loss_fn.warmup is warmup
    preds, batch = _hand_case()
    total, items = loss_fn(preds, batch)
    cls, box, num_pos = _hand_reference(preds, warmup)
    if warmup:
        phase = f"ATSS warm-up (epoch {epoch})"
        cls_ref = f"focal loss on the ATSS labels / number of positives ({num_pos})"
        box_ref = "2 x centreness-weighted GIoU / sum of centreness"
    else:
        phase = f"TAL (epoch {epoch})"
        cls_ref, box_ref = "quality focal loss / sum of t_hat", "2 x t_hat-weighted GIoU / sum of t_hat"
    got_cls, got_box = items["loss_cls"].item(), items["loss_bbox"].item()
    assert got_cls == pytest.approx(cls, rel=1e-5), f"{phase}: loss_cls {got_cls:.6g}, reference {cls_ref} {cls:.6g}"
    assert got_box == pytest.approx(box, rel=1e-5), f"{phase}: loss_bbox {got_box:.6g}, reference {box_ref} {box:.6g}"
    assert total.item() == pytest.approx(cls + box, rel=1e-5), f"{phase}: the loss to back-propagate"


def test_hand_worked_batch_has_the_hand_worked_atss_positives():
    """The loss's ATSS assigner gives the positives written out above (so a failure of the loss test on the warm-up
    is about the loss, not the assignment)."""
    loss_fn = TOODLoss(_Model(nc=HAND_NC, strides=HAND_STRIDES))
    preds, batch = _hand_case()
    points, strides = _hand_grid()
    anchors = torch.cat((points - 4 * strides[:, None], points + 4 * strides[:, None]), 1).float()
    targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"], batch["bboxes"]), 1)
    gt = loss_fn.preprocess(targets, len(HAND_GTS), scale_tensor=torch.full((4,), float(HAND_IMGSZ)))
    labels, gt_boxes = gt.split((1, 4), 2)
    levels = [f.shape[2] * f.shape[3] for f in preds["feats"]]
    a = loss_fn.initial_assigner(anchors, levels, labels, gt_boxes, gt_boxes.sum(2, keepdim=True).gt(0))
    got = {}
    for i, j in a.fg_mask.nonzero().tolist():
        got.setdefault((i, int(a.gt_idx[i, j])), []).append(j)
    expected = {key: sorted(_hand_anchor(*anchor) for anchor in v) for key, v in HAND_POSITIVES.items()}
    assert got == expected


def test_yaml_tal_mapping_reaches_the_assigner_and_bad_keys_fail():
    """`tal:` in a model YAML sets TAL's top-k / alpha / beta of TOOD's loss (the large-object study's rows); absent, the
    paper's 13 / 1.0 / 6.0; an unknown key is refused with the keys it may hold."""
    from pathlib import Path

    import yaml

    from tood_yolo.nn.model import TOODDetectionModel

    cfg = yaml.safe_load((Path(__file__).parents[1] / "cfg/tood-n.yaml").read_text())
    default = TOODDetectionModel(dict(cfg), nc=3, verbose=False).init_criterion().assigner
    assert (default.topk, default.alpha, default.beta) == (13, 1.0, 6.0)
    tal = TOODDetectionModel({**cfg, "tal": {"topk": 10, "alpha": 0.5}}, nc=3, verbose=False).init_criterion().assigner
    assert (tal.topk, tal.alpha, tal.beta) == (10, 0.5, 6.0)
    with pytest.raises(ValueError, match="topk, alpha, beta"):
        TOODDetectionModel({**cfg, "tal": {"k": 10}}, nc=3, verbose=False).init_criterion()
