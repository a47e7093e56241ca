"""TOOD's training loss: Task Alignment Learning, with ATSS warm-up epochs, as mmdetection's TOODHead.

Written by hand because Ultralytics' `v8DetectionLoss` differs in every part that matters here: BCE instead
of quality focal loss, CIoU + DFL instead of GIoU x 2, another assigner (`tood_yolo.utils.assigners`), no warm-up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ultralytics.utils.loss import DFLoss, v8DetectionLoss
from ultralytics.utils.tal import make_anchors

from .assigners import ATSSAssigner, TALAssigner, valid_anchor_mask
from .recipe import Recipe


def quality_focal_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss on probabilities: BCE(p, t) * |t - p|^beta, elementwise.

    `target` holds t_hat at (positive, its class) and 0 elsewhere, so the formula gives both of mmdet's branches:
    BCE(p, t_hat) |t_hat - p|^beta for the positive's class and BCE(p, 0) p^beta for every other entry.

    Args:
        pred (torch.Tensor): (N, C) probabilities.
        target (torch.Tensor): (N, C) soft targets in [0, 1].
        beta (float): Focusing exponent (2 in TOOD).

    Returns:
        (torch.Tensor): (N, C) losses.
    """
    return F.binary_cross_entropy(pred, target, reduction="none") * (target - pred).abs().pow(beta)


def focal_loss_with_prob(
    pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """Sigmoid focal loss on probabilities (mmdet `FocalLoss(activated=True)`), elementwise.

    Args:
        pred (torch.Tensor): (N, C) probabilities.
        target (torch.Tensor): (N, C) one-hot hard labels.

    Returns:
        (torch.Tensor): (N, C) losses.
    """
    pt = (1 - pred) * target + pred * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy(pred, target, reduction="none") * weight


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - GIoU of aligned xyxy box pairs, with mmdet's `bbox_overlaps` eps (union and enclosure clamped at eps).

    Args:
        pred (torch.Tensor): (N, 4) boxes.
        target (torch.Tensor): (N, 4) boxes.

    Returns:
        (torch.Tensor): (N,) losses.
    """
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    overlap = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0).prod(1)
    enclose = enclose.clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


def centerness_target(points: torch.Tensor, gt_bboxes: torch.Tensor) -> torch.Tensor:
    """FCOS centreness of anchor centres (N, 2) inside their assigned GT boxes (N, 4 xyxy):
    sqrt(lr ratio * tb ratio)."""
    l, t = points[:, 0] - gt_bboxes[:, 0], points[:, 1] - gt_bboxes[:, 1]
    r, b = gt_bboxes[:, 2] - points[:, 0], gt_bboxes[:, 3] - points[:, 1]
    lr, tb = torch.stack((l, r), 1), torch.stack((t, b), 1)
    return ((lr.min(1)[0] / lr.max(1)[0]) * (tb.min(1)[0] / tb.max(1)[0])).sqrt()


def reduce_mean(x: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """Mean of `x` over DDP processes as mmdet's avg_factor; `x` itself when not distributed or `sync` is False."""
    if sync and dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x.div_(dist.get_world_size()))
    return x


class TOODLoss:
    """TOOD's loss for a model whose last layer is a `TOODHead` (or, for the ablation, Ultralytics' `Detect`).

    Epochs of the ATSS warm-up (`ATSSWarmup`): ATSS targets, focal loss on hard labels / number of positives and
    centreness-weighted GIoU / sum of centreness. Later: task-aligned targets, quality focal loss with t_hat as soft
    label and t_hat-weighted GIoU, both / max(sum of t_hat, 1). A T-head with DFL distances (`reg="dfl"`) adds
    Ultralytics' DFL term on its aligned distributions, weighted and normalised as the GIoU term (not the reference's:
    its head has no distributions). DDP training steps all-reduce the factors. The run's recipe
    (`Recipe`) decides the warm-up, the weights (the reference's 1 and 2 under mmdet; Ultralytics' `cls=` / `box=`
    gains, calibrated, under ultralytics) and the scale of the returned loss (`LossScale`): `TOODTrainer` hands it over,
    and without one the loss works it out from the model's `args` (which Ultralytics attaches) and YAML. Set `epoch` (a
    plain int) at every epoch start; `TOODTrainer` does.

    Returns (when called with predictions and a batch): the loss to back-propagate and the detached
    {"loss_cls", "loss_bbox"} (and "loss_dfl") of the batch, as the reference logs them (weighted, per positive, not
    scaled).
    """

    preprocess = v8DetectionLoss.preprocess  # padded (B, M, 5) class + pixel xyxy targets, as Ultralytics builds them
    parse_output = v8DetectionLoss.parse_output
    bbox_decode = v8DetectionLoss.bbox_decode  # Detect's DFL expectation (or ltrb distances) to xyxy boxes

    def __init__(
        self,
        model: torch.nn.Module,
        recipe: Recipe | None = None,
        topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        atss_topk: int = 9,
    ):
        head = model.model[-1]
        self.device = next(model.parameters()).device
        self.nc, self.stride = head.nc, head.stride
        self.anchor_offset = getattr(head, "anchor_offset", 0.5)  # Detect's anchor points sit at cell centres
        self.detect_head = not getattr(head, "decoded", False)  # distances and logits to decode (the ablation's Detect)
        self.use_dfl = head.reg_max > 1  # what `bbox_decode` (v8's) reads
        self.proj = torch.arange(head.reg_max, dtype=torch.float, device=self.device)
        self.dfl_loss = DFLoss(head.dfl.c1) if getattr(head, "reg", "ltrb") == "dfl" else None
        self.recipe = recipe or Recipe.of(getattr(model, "args", None), getattr(model, "yaml", None) or {})
        self.assigner = TALAssigner(self.nc, topk=topk, alpha=alpha, beta=beta)
        self.initial_assigner = ATSSAssigner(self.nc, topk=atss_topk)
        self.epoch = 0

    @property
    def warmup(self) -> bool:
        """Whether the current epoch uses the ATSS warm-up targets and losses."""
        return self.recipe.warmup.active(self.epoch)

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        preds = self.parse_output(preds)
        with torch.autocast(self.device.type, enabled=False):  # fp32 under AMP, as the reference (and BCE needs it)
            boxes, scores = self.decode(preds)
            dists = preds["dists"].float().permute(0, 2, 1) if self.dfl_loss else None
            losses = self.loss(boxes, scores, preds["feats"], batch, dists)
        total = self.recipe.loss_scale.scale(sum(losses.values()), boxes.shape[0])
        return total, {k: v.detach() for k, v in losses.items()}

    def decode(self, preds: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A, 4) xyxy boxes in stride units and (B, A, C) probabilities from the head's training outputs.

        A `TOODHead` gives both directly. A `Detect` head gives DFL distributions (or ltrb distances when reg_max is 1)
        and class logits: decoded with its expectation and a sigmoid, as Ultralytics does at inference.
        """
        boxes, scores = preds["boxes"].float().permute(0, 2, 1), preds["scores"].float().permute(0, 2, 1)
        if self.detect_head:
            points = make_anchors(preds["feats"], self.stride, self.anchor_offset)[0]
            boxes, scores = self.bbox_decode(points, boxes), scores.sigmoid()
        return boxes, scores

    def loss(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        feats: list[torch.Tensor],
        batch: dict,
        dists: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Classification and box losses of a batch.

        Args:
            boxes (torch.Tensor): (B, A, 4) predicted xyxy boxes in stride units.
            scores (torch.Tensor): (B, A, C) aligned scores (probabilities).
            feats (list[torch.Tensor]): The head's input maps (for anchor layout).
            batch (dict): Ultralytics batch with "batch_idx", "cls", "bboxes" (normalised xywh), and "pad_shape"
                ((B, 2) each image's own padded (h, w)) when its images differ in size (`collate_padded`): the anchors
                outside an image's padded shape take no part in its targets or its classification loss, as mmdet's
                `valid_flags` (its label weights are 0 there).
            dists (torch.Tensor, optional): (B, A, 4 * bins) log-probabilities of the distributions behind `boxes`
                (a DFL T-head's), for the DFL term.

        Returns:
            (dict[str, torch.Tensor]): "loss_cls", "loss_bbox" (and "loss_dfl") weighted scalars.
        """
        b = boxes.shape[0]
        points, strides = make_anchors(feats, self.stride, self.anchor_offset)  # (A, 2) grid units, (A, 1)
        points_px = points * strides
        imgsz = torch.tensor(feats[0].shape[2:], device=self.device, dtype=torch.float32) * self.stride[0]
        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        targets = self.preprocess(targets.to(self.device).float(), b, scale_tensor=imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = targets.split((1, 4), 2)
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt(0.0)
        valid = None
        if "pad_shape" in batch:
            shapes = [f.shape[2:] for f in feats]
            valid = valid_anchor_mask(batch["pad_shape"].to(self.device), shapes, self.stride.tolist())

        if self.warmup:
            anchors = torch.cat((points_px - 4 * strides, points_px + 4 * strides), 1)  # 8*stride squares
            levels = [f.shape[2] * f.shape[3] for f in feats]
            a = self.initial_assigner(anchors, levels, gt_labels, gt_bboxes, mask_gt, valid)
            target = F.one_hot(a.labels, self.nc + 1)[..., : self.nc].float()
            cls = focal_loss_with_prob(scores, target)
            box_weight = centerness_target(points_px.expand(b, -1, -1)[a.fg_mask], a.bboxes[a.fg_mask].float())
            cls_factor = a.fg_mask.sum().float()
        else:
            a = self.assigner(
                scores.detach(), (boxes.detach() * strides), points_px, gt_labels, gt_bboxes, mask_gt, valid
            )
            target = F.one_hot(a.labels, self.nc + 1)[..., : self.nc].float() * a.quality.unsqueeze(-1)
            cls = quality_focal_loss(scores, target)
            box_weight = a.quality[a.fg_mask]
            cls_factor = a.quality.sum()
        cls = (cls if valid is None else cls[valid]).sum()
        strides_pos = strides.expand(b, -1, -1)[a.fg_mask]
        target_boxes = a.bboxes[a.fg_mask].float() / strides_pos
        box = (giou_loss(boxes[a.fg_mask], target_boxes) * box_weight).sum()
        # All-reduce only in a training step: a loss that will be back-propagated, whose backward DDP all-reduces on
        # every rank, so every rank reaches it equally often. The validator's loss runs under inference mode, where
        # ranks can see unequal batch counts: a collective there meets another one (or none) and waits until the
        # process-group timeout. Checking the scores too keeps out a loss of detached predictions with grad enabled.
        sync = torch.is_grad_enabled() and scores.requires_grad
        cls_factor = reduce_mean(cls_factor, sync).clamp(min=1)
        box_factor = reduce_mean(box_weight.sum(), sync).clamp(min=1)
        cls_weight, bbox_weight, dfl_weight = self.recipe.weights.phase(self.warmup)
        losses = {"loss_cls": cls / cls_factor * cls_weight, "loss_bbox": box / box_factor * bbox_weight}
        if dists is not None:
            dfl = self.dfl_term(boxes[a.fg_mask], dists[a.fg_mask], target_boxes)
            losses["loss_dfl"] = (dfl * box_weight).sum() / box_factor * dfl_weight
        return losses

    def dfl_term(self, boxes: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Ultralytics' DFL of each positive's four distributions, mean over the sides.

        Each side's target is the distance from the point its distribution was sampled at (the box side plus or minus
        the distribution's expectation: x1 + d_l, y1 + d_t, x2 - d_r, y2 - d_b) to the GT side, in strides.

        Args:
            boxes (torch.Tensor): (N, 4) predicted xyxy boxes of the positives, stride units.
            log_probs (torch.Tensor): (N, 4 * bins) log-probabilities of their distributions.
            targets (torch.Tensor): (N, 4) assigned GT boxes, xyxy, stride units.

        Returns:
            (torch.Tensor): (N,) losses.
        """
        bins = self.dfl_loss.reg_max
        log_probs = log_probs.view(-1, 4, bins)
        dist = (log_probs.exp() * torch.arange(bins, device=boxes.device, dtype=boxes.dtype)).sum(-1)
        origin = boxes + torch.cat((dist[:, :2], -dist[:, 2:]), 1)
        target = torch.cat((origin[:, :2] - targets[:, :2], targets[:, 2:] - origin[:, 2:]), 1).detach()
        # log-probabilities go in as logits: DFLoss's log-softmax leaves a normalised distribution's as they are
        return self.dfl_loss(log_probs.view(-1, bins), target).view(-1)


class THeadV8Loss(v8DetectionLoss):
    """Ultralytics' YOLOv8 loss on a `TOODHead`'s outputs: the ablation's "T-head + v8 loss" cell.

    Everything is v8's (its task-aligned assigner with topk 10, alpha 0.5; BCE on logits; CIoU; anchor points at cell
    centres; gains `box`/`cls`/`dfl`; loss x batch size). The T-head predicts boxes, not DFL distributions (reg_max
    1), so v8's L1 term on normalised ltrb distances takes DFL's place, as for any reg_max-1 head in Ultralytics.
    The aligned boxes become ltrb distances from v8's anchor points and the aligned scores sqrt(P * M) become logits
    (clamped to [1e-6, 1 - 1e-6] before the logit, beyond which BCE's gradient through the clamp is 0).
    """

    def parse_output(self, preds) -> dict[str, torch.Tensor]:
        """The T-head's xyxy boxes (B, 4, A, stride units) and probabilities as v8's distances and logits."""
        preds = super().parse_output(preds)
        points = make_anchors(preds["feats"], self.stride, 0.5)[0].T.unsqueeze(0)  # (1, 2, A)
        boxes = preds["boxes"].float()
        ltrb = torch.cat((points - boxes[:, :2], boxes[:, 2:] - points), 1)
        return {"boxes": ltrb, "scores": torch.logit(preds["scores"].float(), eps=1e-6), "feats": preds["feats"]}
