"""Label assigners of TOOD: Task Alignment Learning and its ATSS warm-up, batched over padded GTs.

Both follow mmdetection 3.3.0 (`TaskAlignedAssigner`, `ATSSAssigner` and the per-GT normalisation of
`TOODHead._get_targets_single`) rule for rule, but run on a whole padded batch at once in the Ultralytics layout:
gt_labels (B, M, 1), gt_bboxes (B, M, 4) xyxy pixels, mask_gt (B, M, 1) with 1 for real GTs and 0 for padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from ultralytics.utils.metrics import bbox_iou

__all__ = "Assignment", "TALAssigner", "ATSSAssigner", "valid_anchor_mask"

# mmdet's centre-inside test: an anchor centre must lie more than this many pixels inside every GT side.
CENTER_MARGIN = 0.01


def valid_anchor_mask(pad_shapes: torch.Tensor, feat_shapes: Sequence[tuple[int, int]],
                      strides: Sequence[float]) -> torch.Tensor:
    """(B, A) bool: whether each anchor of a batch lies inside its image's own padded shape, as mmdet's
    `AnchorGenerator.valid_flags(featmap_sizes, pad_shape)`: on a level of stride s and size (fh, fw), the anchors of
    rows < min(ceil(h / s), fh) and columns < min(ceil(w / s), fw). Levels in order, each row-major (`make_anchors`).

    Args:
        pad_shapes (torch.Tensor): (B, 2) each image's padded (h, w).
        feat_shapes (Sequence[tuple[int, int]]): (fh, fw) of each level.
        strides (Sequence[float]): Stride of each level.
    """
    masks = []
    for (fh, fw), s in zip(feat_shapes, strides):
        rows = torch.arange(fh, device=pad_shapes.device)
        cols = torch.arange(fw, device=pad_shapes.device)
        vh = torch.clamp(torch.ceil(pad_shapes[:, :1].double() / float(s)), max=fh)  # (B, 1)
        vw = torch.clamp(torch.ceil(pad_shapes[:, 1:].double() / float(s)), max=fw)
        masks.append(((rows[None, :, None] < vh[:, :, None]) & (cols[None, None, :] < vw[:, :, None])).flatten(1))
    return torch.cat(masks, 1)


class Assignment(NamedTuple):
    """Per-anchor targets of a batch; B images, A anchors.

    Attributes:
        fg_mask (torch.Tensor): (B, A) bool, positive anchors.
        gt_idx (torch.Tensor): (B, A) long, index of the assigned GT in the padded GT axis (0 on background).
        labels (torch.Tensor): (B, A) long, class of the assigned GT, `num_classes` on background.
        bboxes (torch.Tensor): (B, A, 4) xyxy pixels of the assigned GT (zeros on background), dtype of gt_bboxes.
        quality (torch.Tensor): (B, A) float32 soft target: normalised alignment t_hat for TAL, 1.0 for ATSS, 0 on
            background.
        ious (torch.Tensor): (B, A) float32 IoU the assignment used, with the assigned GT (0 on background).
    """

    fg_mask: torch.Tensor
    gt_idx: torch.Tensor
    labels: torch.Tensor
    bboxes: torch.Tensor
    quality: torch.Tensor
    ious: torch.Tensor


def _pairwise_iou(gt_bboxes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Plain IoU of every GT with every box, in float32 so half-precision inputs do not quantise the ranking.

    Args:
        gt_bboxes (torch.Tensor): (B, M, 4) xyxy.
        boxes (torch.Tensor): (B, A, 4) or (A, 4) xyxy.

    Returns:
        (torch.Tensor): (B, M, A) IoUs.
    """
    return bbox_iou(gt_bboxes.float().unsqueeze(2), boxes.float().unsqueeze(-3), xywh=False).squeeze(-1)


def _centres_inside(points: torch.Tensor, gt_bboxes: torch.Tensor) -> torch.Tensor:
    """Whether points lie strictly inside their GT by more than `CENTER_MARGIN` on all four sides.

    Args:
        points (torch.Tensor): (B, M, K, 2) candidate anchor centres, K per GT.
        gt_bboxes (torch.Tensor): (B, M, 4) xyxy.

    Returns:
        (torch.Tensor): (B, M, K) bool.
    """
    gt = gt_bboxes.float().unsqueeze(2)
    points = points.float()
    ltrb = torch.cat((points - gt[..., :2], gt[..., 2:] - points), dim=-1)
    return ltrb.amin(-1) > CENTER_MARGIN


def _background(gt_bboxes: torch.Tensor, num_anchors: int, num_classes: int) -> Assignment:
    """Assignment with every anchor negative, for batches without a single GT slot (M = 0)."""
    b, device = gt_bboxes.shape[0], gt_bboxes.device
    zeros = torch.zeros(b, num_anchors, device=device)
    return Assignment(
        fg_mask=torch.zeros(b, num_anchors, dtype=torch.bool, device=device),
        gt_idx=torch.zeros(b, num_anchors, dtype=torch.long, device=device),
        labels=torch.full((b, num_anchors), num_classes, dtype=torch.long, device=device),
        bboxes=gt_bboxes.new_zeros(b, num_anchors, 4),
        quality=zeros,
        ious=zeros.clone(),
    )


def _resolve(
    is_pos: torch.Tensor, ious: torch.Tensor, gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each anchor to the GT of highest IoU among the GTs that made it a positive (mmdet's -INF overlaps trick).

    Args:
        is_pos (torch.Tensor): (B, M, A) bool, anchor is a positive candidate of the GT.
        ious (torch.Tensor): (B, M, A) float IoUs that arbitrate conflicts.
        gt_labels (torch.Tensor): (B, M, 1) classes.
        gt_bboxes (torch.Tensor): (B, M, 4) xyxy.
        num_classes (int): background label.

    Returns:
        fg_mask (B, A) bool, gt_idx (B, A) long, labels (B, A) long, bboxes (B, A, 4), assigned ious (B, A) float.
    """
    # Only the selecting GTs compete: a GT that merely contains the anchor has no say.
    max_iou, gt_idx = ious.masked_fill(~is_pos, -torch.inf).max(dim=1)
    fg_mask = is_pos.any(dim=1)
    gt_idx = gt_idx * fg_mask
    labels = gt_labels.squeeze(-1).long().gather(1, gt_idx).masked_fill(~fg_mask, num_classes)
    bboxes = gt_bboxes.gather(1, gt_idx.unsqueeze(-1).expand(-1, -1, 4)).where(fg_mask.unsqueeze(-1), 0.0)
    return fg_mask, gt_idx, labels, bboxes, max_iou.where(fg_mask, 0.0)


class TALAssigner:
    """TOOD's task-aligned assigner of Task Alignment Learning: mmdet 3.3.0's `TaskAlignedAssigner`, with the per-GT
    normalisation of its TOODHead (named apart from Ultralytics' `TaskAlignedAssigner`, a different rule).

    For every GT, t = s**alpha * u**beta with s the predicted probability of the GT's class and u the plain IoU of the
    decoded predicted box with the GT. The top-k anchors by t over all levels are candidates; a candidate is kept if
    t > 0 and its anchor centre lies inside the GT, so a GT may get fewer than k positives or none. An anchor kept by
    several GTs goes to the one of highest u. Soft target per positive: t_hat = t / (max t + eps) * max u, the maxima
    over the final positives of its GT.

    This is not Ultralytics' variant: no top-k restricted to anchors inside the GT, no CIoU, no enlargement of small
    GTs, and conflicts are settled among the selecting GTs only.

    Attributes:
        num_classes (int): number of classes, also the background label.
        topk (int): candidates per GT.
        alpha (float): exponent of the classification score in t.
        beta (float): exponent of the IoU in t.
        eps (float): guards the normalisation against a zero maximum.
    """

    def __init__(self, num_classes: int, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-7):
        """Store the hyper-parameters; defaults are TOOD's (mmdet writes eps as 10e-8)."""
        self.num_classes = num_classes
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        anc_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> Assignment:
        """Assign GTs to anchors.

        Args:
            pd_scores (torch.Tensor): (B, A, C) class probabilities (after sigmoid).
            pd_bboxes (torch.Tensor): (B, A, 4) decoded predicted boxes, xyxy pixels.
            anc_points (torch.Tensor): (A, 2) anchor centres, pixels.
            gt_labels (torch.Tensor): (B, M, 1) GT classes.
            gt_bboxes (torch.Tensor): (B, M, 4) GT boxes, xyxy pixels.
            mask_gt (torch.Tensor): (B, M, 1) 1 for real GTs, 0 for padding.
            valid (torch.Tensor, optional): (B, A) bool, the anchors inside each image's own padded shape
                (`valid_anchor_mask`); the others are no candidates, as mmdet assigns only its `valid_flags` anchors.
                None: every anchor.

        Returns:
            (Assignment): per-anchor targets, quality = t_hat.
        """
        num_anchors = pd_scores.shape[1]
        if gt_bboxes.shape[1] == 0:
            return _background(gt_bboxes, num_anchors, self.num_classes)

        ious = _pairwise_iou(gt_bboxes, pd_bboxes)  # (B, M, A)
        # Padding rows may carry any label; zero it so the gather stays in range (they are masked out below).
        cls = (gt_labels.squeeze(-1).long() * mask_gt.squeeze(-1).long()).unsqueeze(-1)
        scores = pd_scores.float().transpose(1, 2).gather(1, cls.expand(-1, -1, num_anchors))  # (B, M, A)
        align = scores.pow(self.alpha) * ious.pow(self.beta)
        if valid is not None:  # below every valid anchor's t >= 0: never among the top k before a valid one
            align = align.masked_fill(~valid.unsqueeze(1), -1.0)

        # Top-k over every (valid) anchor, then the t > 0 and centre-inside filters on those k only.
        top_t, top_idx = align.topk(min(self.topk, num_anchors), dim=-1)  # (B, M, k)
        keep = (top_t > 0) & _centres_inside(anc_points[top_idx], gt_bboxes) & mask_gt.bool()
        is_pos = torch.zeros_like(align, dtype=torch.bool).scatter_(-1, top_idx, keep)

        fg_mask, gt_idx, labels, bboxes, fg_ious = _resolve(is_pos, ious, gt_labels, gt_bboxes, self.num_classes)

        # Normalise over each GT's positives after conflicts, like TOODHead: t and u are > 0 on positives, so the
        # maxima of the masked (zeroed elsewhere) tensors are the maxima over positives. Background anchors have no
        # is_pos entry, so their gt_idx of 0 cannot leak into GT 0.
        final = is_pos & (gt_idx.unsqueeze(1) == torch.arange(is_pos.shape[1], device=is_pos.device)[:, None])
        max_t = (align * final).amax(dim=-1)  # (B, M)
        max_u = (ious * final).amax(dim=-1)
        fg_t = align.gather(1, gt_idx.unsqueeze(1)).squeeze(1)
        t_hat = fg_t / (max_t.gather(1, gt_idx) + self.eps) * max_u.gather(1, gt_idx)
        return Assignment(fg_mask, gt_idx, labels, bboxes, t_hat.where(fg_mask, 0.0), fg_ious)


class ATSSAssigner:
    """ATSS assigner (mmdet 3.3.0), TOOD's target source during its warm-up epochs.

    Per level, the k anchors whose centres are nearest to the GT centre are candidates; the IoU threshold of a GT is
    the mean plus the unbiased standard deviation of its candidates' IoUs. A candidate is positive if its IoU reaches
    the threshold and its centre lies inside the GT; an anchor positive for several GTs goes to the one of highest IoU.

    Attributes:
        num_classes (int): number of classes, also the background label.
        topk (int): candidates per GT per level.
    """

    def __init__(self, num_classes: int, topk: int = 9):
        """Store the hyper-parameters; topk=9 is TOOD's."""
        self.num_classes = num_classes
        self.topk = topk

    @torch.no_grad()
    def __call__(
        self,
        anchors: torch.Tensor,
        num_level_anchors: list[int],
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> Assignment:
        """Assign GTs to anchors.

        Args:
            anchors (torch.Tensor): (A, 4) anchor boxes, xyxy pixels (TOOD: squares of 8 * stride on the anchor points),
                concatenated level after level.
            num_level_anchors (list[int]): anchors per level, summing to A.
            gt_labels (torch.Tensor): (B, M, 1) GT classes.
            gt_bboxes (torch.Tensor): (B, M, 4) GT boxes, xyxy pixels.
            mask_gt (torch.Tensor): (B, M, 1) 1 for real GTs, 0 for padding.
            valid (torch.Tensor, optional): (B, A) bool, the anchors inside each image's own padded shape
                (`valid_anchor_mask`); the others are no candidates (mmdet assigns its `valid_flags` anchors only).
                None: every anchor. A level needs at least `topk` valid anchors per image (any real image has).

        Returns:
            (Assignment): per-anchor targets, quality = 1.0 on positives.
        """
        num_anchors = anchors.shape[0]
        if gt_bboxes.shape[1] == 0:
            return _background(gt_bboxes, num_anchors, self.num_classes)

        ious = _pairwise_iou(gt_bboxes, anchors)  # (B, M, A)
        centres = (anchors[:, :2].float() + anchors[:, 2:].float()) / 2  # (A, 2)
        gt_centres = (gt_bboxes[..., :2].float() + gt_bboxes[..., 2:].float()) / 2  # (B, M, 2)
        # Squared distances rank like mmdet's Euclidean ones; explicit differences, not cdist, whose matmul path
        # would perturb near-ties.
        dist2 = (gt_centres.unsqueeze(2) - centres).pow(2).sum(-1)  # (B, M, A)
        if valid is not None:  # farther than any valid anchor: never a candidate before k valid ones
            dist2 = dist2.masked_fill(~valid.unsqueeze(1), torch.inf)

        cand_idx, start = [], 0
        for n in num_level_anchors:
            _, idx = dist2[..., start : start + n].topk(min(self.topk, n), dim=-1, largest=False)
            cand_idx.append(idx + start)
            start += n
        cand_idx = torch.cat(cand_idx, dim=-1)  # (B, M, K), distinct per GT since levels do not overlap

        cand_ious = ious.gather(-1, cand_idx)
        thr = cand_ious.mean(-1, keepdim=True) + cand_ious.std(-1, keepdim=True)  # unbiased std, as mmdet
        keep = (cand_ious >= thr) & _centres_inside(centres[cand_idx], gt_bboxes) & mask_gt.bool()
        is_pos = torch.zeros_like(ious, dtype=torch.bool).scatter_(-1, cand_idx, keep)

        fg_mask, gt_idx, labels, bboxes, fg_ious = _resolve(is_pos, ious, gt_labels, gt_bboxes, self.num_classes)
        return Assignment(fg_mask, gt_idx, labels, bboxes, fg_mask.float(), fg_ious)
