"""Tests of tood_yolo.utils.assigners: hand-worked cases and a literal per-image port of mmdetection 3.3.0
as reference."""

from __future__ import annotations

import pytest
import torch

from tood_yolo.utils.assigners import Assignment, ATSSAssigner, TALAssigner

NC = 4  # classes in the random batches
INF = 100000000  # mmdet's sentinel in the overlaps trick


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def batch1(gt_bboxes: list[list[float]], gt_labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image in the padded layout, every GT real."""
    boxes = torch.tensor(gt_bboxes, dtype=torch.float32).view(1, -1, 4)
    labels = torch.tensor(gt_labels, dtype=torch.float32).view(1, -1, 1)  # Ultralytics carries labels as floats
    return labels, boxes, torch.ones_like(labels)


def grid_points(size: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """Anchor centres of an FPN, level after level, mmdet style (offset 0), and the anchors per level."""
    points, counts = [], []
    for s in strides:
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n) * s, torch.arange(n) * s, indexing="ij")
        points.append(torch.stack((xs, ys), -1).view(-1, 2).float())
        counts.append(n * n)
    return torch.cat(points), counts


def anchor_boxes(size: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """TOOD's anchors: one square of 8 * stride centred on each anchor point."""
    points, counts = grid_points(size, strides)
    half = torch.cat([torch.full((c, 1), 4.0 * s) for c, s in zip(counts, strides)])
    return torch.cat((points - half, points + half), -1), counts


def random_gts(g: torch.Generator, b: int, m: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded GT batch with 0..m real GTs per image (at least one image empty) and garbage in the padding rows.

    The garbage is plausible boxes and labels, so an assigner that ignored mask_gt would assign them.
    """
    xy = torch.rand(b, m, 2, generator=g) * size * 0.8
    wh = 2 + torch.rand(b, m, 2, generator=g) * size * 0.5
    boxes = torch.cat((xy, (xy + wh).clamp(max=size)), -1)
    labels = torch.randint(0, NC, (b, m, 1), generator=g).float()
    counts = torch.randint(0, m + 1, (b,), generator=g)
    counts[0] = 0
    counts[-1] = m
    mask = (torch.arange(m) < counts[:, None]).float().unsqueeze(-1)
    return labels, boxes, mask


def assert_assignment(out: Assignment, ref: Assignment) -> None:
    """Exact on the discrete fields; floats to float32 round-off (the IoU eps conventions differ by ~1e-7)."""
    assert torch.equal(out.fg_mask, ref.fg_mask)
    assert torch.equal(out.gt_idx, ref.gt_idx)
    assert torch.equal(out.labels, ref.labels)
    torch.testing.assert_close(out.bboxes, ref.bboxes)
    torch.testing.assert_close(out.quality, ref.quality, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.ious, ref.ious, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Reference: mmdet 3.3.0 written out per image, as in task_aligned_assigner.py / atss_assigner.py / tood_head.py
# --------------------------------------------------------------------------------------------------------------------
def mmdet_iou(b1: torch.Tensor, b2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mmdet's bbox_overlaps(mode='iou', is_aligned=False): (n1, n2)."""
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - overlap
    return overlap / torch.max(union, union.new_tensor([eps]))


def mmdet_resolve(overlaps, candidate_idxs, is_pos, num_gt, num_priors):
    """mmdet's -INF overlaps trick; candidate_idxs already offset by gt_idx * num_priors."""
    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
    index = candidate_idxs.view(-1)[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()
    return overlaps_inf.max(dim=1)


def mmdet_in_gts(centres, candidate_idxs, gt_bboxes, num_gt, num_priors):
    """mmdet's expanded-centre test on the (offset) candidate indices."""
    for gt_idx in range(num_gt):
        candidate_idxs[:, gt_idx] += gt_idx * num_priors
    ep_cx = centres[:, 0].view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    ep_cy = centres[:, 1].view(1, -1).expand(num_gt, num_priors).contiguous().view(-1)
    candidate_idxs = candidate_idxs.view(-1)
    l_ = ep_cx[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 0]
    t_ = ep_cy[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 1]
    r_ = gt_bboxes[:, 2] - ep_cx[candidate_idxs].view(-1, num_gt)
    b_ = gt_bboxes[:, 3] - ep_cy[candidate_idxs].view(-1, num_gt)
    return torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01, candidate_idxs


def ref_tal_single(scores, bboxes, points, gt_bboxes, gt_labels, topk, alpha, beta, eps):
    """mmdet TaskAlignedAssigner.assign + TOODHead's per-GT normalisation, one image.

    Returns 1-based assigned GT indices (0 = background), normalised metrics and max overlaps (0 on background).
    """
    num_gt, num_bboxes = gt_bboxes.size(0), bboxes.size(0)
    assigned_gt_inds = torch.zeros(num_bboxes, dtype=torch.long)
    assign_metrics = torch.zeros(num_bboxes)
    if num_gt == 0:
        return assigned_gt_inds, assign_metrics, torch.zeros(num_bboxes)
    overlaps = mmdet_iou(bboxes, gt_bboxes)
    bbox_scores = scores[:, gt_labels]
    alignment_metrics = bbox_scores**alpha * overlaps**beta
    k = min(topk, alignment_metrics.size(0))
    _, candidate_idxs = alignment_metrics.topk(k, dim=0, largest=True)
    candidate_metrics = alignment_metrics[candidate_idxs, torch.arange(num_gt)]
    is_pos = candidate_metrics > 0
    is_in_gts, candidate_idxs = mmdet_in_gts(points, candidate_idxs, gt_bboxes, num_gt, num_bboxes)
    is_pos = is_pos & is_in_gts
    max_overlaps, argmax_overlaps = mmdet_resolve(overlaps, candidate_idxs, is_pos, num_gt, num_bboxes)
    pos = max_overlaps != -INF
    assigned_gt_inds[pos] = argmax_overlaps[pos] + 1
    assign_metrics[pos] = alignment_metrics[pos, argmax_overlaps[pos]]

    norm = torch.zeros(num_bboxes)
    pos_inds = pos.nonzero().squeeze(1)
    pos_assigned = assigned_gt_inds[pos_inds] - 1
    for gt_inds in torch.unique(pos_assigned):
        gt_class_inds = pos_inds[pos_assigned == gt_inds]
        m, u = assign_metrics[gt_class_inds], max_overlaps[gt_class_inds]
        norm[gt_class_inds] = m / (m.max() + eps) * u.max()
    return assigned_gt_inds, norm, torch.where(pos, max_overlaps, 0.0)


def ref_atss_single(anchors, num_level_anchors, gt_bboxes, topk):
    """mmdet ATSSAssigner.assign (no ignore boxes, no DDOD alpha), one image."""
    num_gt, num_priors = gt_bboxes.size(0), anchors.size(0)
    assigned_gt_inds = torch.zeros(num_priors, dtype=torch.long)
    if num_gt == 0:
        return assigned_gt_inds, torch.zeros(num_priors)
    overlaps = mmdet_iou(anchors, gt_bboxes)
    gt_c = torch.stack(((gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2, (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2), 1)
    centres = torch.stack(((anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2), 1)
    distances = (centres[:, None, :] - gt_c[None, :, :]).pow(2).sum(-1).sqrt()
    candidate_idxs, start_idx = [], 0
    for priors_per_level in num_level_anchors:
        end_idx = start_idx + priors_per_level
        selectable_k = min(topk, priors_per_level)
        _, idxs = distances[start_idx:end_idx, :].topk(selectable_k, dim=0, largest=False)
        candidate_idxs.append(idxs + start_idx)
        start_idx = end_idx
    candidate_idxs = torch.cat(candidate_idxs, dim=0)
    candidate_overlaps = overlaps[candidate_idxs, torch.arange(num_gt)]
    thr = candidate_overlaps.mean(0) + candidate_overlaps.std(0)
    is_pos = candidate_overlaps >= thr[None, :]
    is_in_gts, candidate_idxs = mmdet_in_gts(centres, candidate_idxs, gt_bboxes, num_gt, num_priors)
    is_pos = is_pos & is_in_gts
    max_overlaps, argmax_overlaps = mmdet_resolve(overlaps, candidate_idxs, is_pos, num_gt, num_priors)
    pos = max_overlaps != -INF
    assigned_gt_inds[pos] = argmax_overlaps[pos] + 1
    return assigned_gt_inds, torch.where(pos, max_overlaps, 0.0)


def to_batch(per_image, gt_labels, gt_bboxes, mask_gt, num_classes) -> Assignment:
    """Stack per-image reference results, mapping each image's real-GT index back to the padded axis."""
    fields = []
    for b, (assigned, quality, ious) in enumerate(per_image):
        real = mask_gt[b, :, 0].bool().nonzero().squeeze(1)
        fg = assigned > 0
        gt_idx = torch.where(fg, real[(assigned - 1).clamp(min=0)] if len(real) else assigned, 0)
        labels = torch.where(fg, gt_labels[b, gt_idx, 0].long(), num_classes)
        bboxes = torch.where(fg[:, None], gt_bboxes[b, gt_idx], 0.0)
        fields.append((fg, gt_idx, labels, bboxes, quality, ious))
    return Assignment(*(torch.stack(f) for f in zip(*fields)))


def ref_tal(assigner, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt) -> Assignment:
    """Loop over images, keep the real GTs, run the literal mmdet code."""
    per_image = []
    for b in range(pd_scores.shape[0]):
        real = mask_gt[b, :, 0].bool()
        per_image.append(
            ref_tal_single(
                pd_scores[b], pd_bboxes[b], anc_points, gt_bboxes[b, real], gt_labels[b, real, 0].long(),
                assigner.topk, assigner.alpha, assigner.beta, assigner.eps,
            )
        )
    return to_batch(per_image, gt_labels, gt_bboxes, mask_gt, assigner.num_classes)


def ref_atss(assigner, anchors, num_level_anchors, gt_labels, gt_bboxes, mask_gt) -> Assignment:
    """Loop over images, keep the real GTs, run the literal mmdet code; quality = 1 on positives."""
    per_image = []
    for b in range(gt_bboxes.shape[0]):
        real = mask_gt[b, :, 0].bool()
        assigned, ious = ref_atss_single(anchors, num_level_anchors, gt_bboxes[b, real], assigner.topk)
        per_image.append((assigned, (assigned > 0).float(), ious))
    return to_batch(per_image, gt_labels, gt_bboxes, mask_gt, assigner.num_classes)


def random_predictions(g: torch.Generator, b: int, points: torch.Tensor, strides: torch.Tensor):
    """Probabilities and boxes around each anchor point, a few strides wide, like a half-trained detector."""
    a = points.shape[0]
    scores = torch.rand(b, a, NC, generator=g)
    ltrb = torch.exp(torch.randn(b, a, 4, generator=g) * 0.6) * strides[:, None] * 1.5
    boxes = torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)
    return scores, boxes


# --------------------------------------------------------------------------------------------------------------------
# TALAssigner: hand-worked cases
# --------------------------------------------------------------------------------------------------------------------
def test_tal_small_gt_without_anchor_centre_gets_no_positive():
    # Anchor points at 4, 12, 20, 28 on both axes. GT [9, 9, 11, 11] contains none of them, yet every predicted box
    # (16x16 around its point) that covers it overlaps it (IoU 4/256 > 0) with score 0.9, so t > 0: only the
    # centre-inside rule can reject them.
    pts = torch.tensor([[x, y] for y in (4.0, 12.0, 20.0, 28.0) for x in (4.0, 12.0, 20.0, 28.0)])
    pred = torch.cat((pts - 8, pts + 8), -1)[None]
    scores = torch.full((1, 16, 2), 0.9)
    assigner = TALAssigner(num_classes=2)
    out = assigner(scores, pred, pts, *batch1([[9, 9, 11, 11]], [0]))
    assert not out.fg_mask.any() and (out.labels == 2).all() and (out.quality == 0).all() and (out.ious == 0).all()
    # The point (4, 4) only 0.005 px inside the left side of [3.995, 0, 6, 6]: below mmdet's 0.01 margin, rejected.
    assert not assigner(scores, pred, pts, *batch1([[3.995, 0, 6, 6]], [1])).fg_mask.any()
    # With 0.02 px it is accepted (the margin is 0.01, not larger); no other point lies in [3.98, 0, 6, 6].
    out = assigner(scores, pred, pts, *batch1([[3.98, 0, 6, 6]], [1]))
    assert out.fg_mask[0].nonzero().squeeze(1).tolist() == [0] and out.labels[0, 0] == 1


def two_gt_case():
    """Two GTs that both select anchor P1; worked out by hand in test_tal_conflict_goes_to_higher_iou."""
    pts = torch.tensor([[10.0, 10.0], [20.0, 10.0], [30.0, 10.0], [50.0, 50.0]])
    pred = torch.tensor([[[0.0, 0, 20, 20], [15, 0, 35, 20], [20, 0, 40, 20], [45, 45, 55, 55]]])
    scores = torch.full((1, 4, 2), 0.5)
    labels, boxes, mask = batch1([[0, 0, 25, 20], [15, 0, 40, 20]], [0, 1])
    return scores, pred, pts, labels, boxes, mask


def test_tal_conflict_goes_to_higher_iou():
    # GT a = [0,0,25,20] (area 500) contains P0 (10,10) and P1 (20,10); GT b = [15,0,40,20] contains P1 and P2 (30,10).
    # IoUs (pred boxes 20x20 = 400):  pred0-a 400/500 = 0.8   pred1-a 200/700 = 2/7   pred2-a 100/800 = 0.125
    #                                 pred0-b 100/800 = 0.125 pred1-b 400/500 = 0.8   pred2-b 400/500 = 0.8
    # pred3 overlaps neither (t = 0). With topk=3: a's top-3 by t are P0, P1, P2; P2 lies outside a -> a: {P0, P1}.
    # b's top-3 are P1, P2, P0; P0 outside b -> b: {P1, P2}. P1 is claimed by both: IoU 0.8 with b > 2/7 with a -> b.
    # The loser a keeps P0. Every positive has t = 0.5 * 0.8**6 = its GT's max t and u = 0.8 = max u, so t_hat ~ 0.8.
    out = TALAssigner(num_classes=2, topk=3)(*two_gt_case())
    assert out.fg_mask.tolist() == [[True, True, True, False]]
    assert out.gt_idx.tolist() == [[0, 1, 1, 0]]
    assert out.labels.tolist() == [[0, 1, 1, 2]]
    assert out.bboxes[0].tolist() == [[0, 0, 25, 20], [15, 0, 40, 20], [15, 0, 40, 20], [0, 0, 0, 0]]
    torch.testing.assert_close(out.ious[0], torch.tensor([0.8, 0.8, 0.8, 0.0]))
    t = 0.5 * 0.8**6
    torch.testing.assert_close(out.quality[0], torch.tensor([t / (t + 1e-7) * 0.8] * 3 + [0.0]))


def test_tal_conflict_only_among_selecting_gts():
    # GT c = [0,0,40,40], GT d = [20,0,60,40]; P0 (10,20) lies in c only, P1 (30,20) in both. topk = 1.
    # pred0 = [0,0,40,40]: u_c = 1, u_d = 800/2400 = 1/3.   pred1 = [0,0,40,30]: u_c = 1200/1600 = 0.75,
    # u_d = 600/(1200+1600-600) = 3/11.  Scores: class 0 (c) 0.5 everywhere; class 1 (d) 0.1 at P0, 0.9 at P1.
    # c: t(P0) = 0.5 > t(P1) = 0.5*0.75**6 -> top-1 P0.  d: t(P0) = 0.1/729 = 1.4e-4 < t(P1) = 0.9*(3/11)**6 = 3.7e-4
    # -> top-1 P1. P1 has the higher IoU with c (0.75 > 3/11) and lies inside c, but c did not select it, so it
    # stays with d (Ultralytics' variant would hand it to c).
    pts = torch.tensor([[10.0, 20.0], [30.0, 20.0]])
    pred = torch.tensor([[[0.0, 0, 40, 40], [0, 0, 40, 30]]])
    scores = torch.tensor([[[0.5, 0.1], [0.5, 0.9]]])
    labels, boxes, mask = batch1([[0, 0, 40, 40], [20, 0, 60, 40]], [0, 1])
    out = TALAssigner(num_classes=2, topk=1)(scores, pred, pts, labels, boxes, mask)
    assert out.fg_mask.tolist() == [[True, True]]
    assert out.gt_idx.tolist() == [[0, 1]]
    torch.testing.assert_close(out.ious[0], torch.tensor([1.0, 3 / 11]))


def test_tal_normalisation_values():
    # One GT [0,0,40,40] (area 1600) containing P0, P1, P2. pred0 = the GT (u = 1), pred1 = [0,0,40,20] (u = 0.5),
    # pred2 = [0,0,40,30] (u = 0.75); scores 0.01, 0.9, 0.5. t = s * u**6:
    # t0 = 0.01, t1 = 0.9/64 = 0.0140625, t2 = 0.5 * 0.75**6 = 0.0889892578125 (the max), while the max u (1) is P0's.
    # t_hat = t / (t2 + eps) * 1: P2 gets t2/(t2+eps) ~ 1 = max u, ratios between positives are those of t.
    pts = torch.tensor([[10.0, 20.0], [20.0, 20.0], [30.0, 20.0]])
    pred = torch.tensor([[[0.0, 0, 40, 40], [0, 0, 40, 20], [0, 0, 40, 30]]])
    scores = torch.tensor([[[0.01], [0.9], [0.5]]])
    labels, boxes, mask = batch1([[0, 0, 40, 40]], [0])
    eps = 1e-7
    out = TALAssigner(num_classes=1, eps=eps)(scores, pred, pts, labels, boxes, mask)
    t = torch.tensor([0.01, 0.9 / 64, 0.5 * 0.75**6])
    torch.testing.assert_close(out.quality[0], t / (t[2] + eps) * 1.0)
    assert abs(out.quality[0, 2].item() - 1.0) < 1e-5
    torch.testing.assert_close(out.quality[0, 0] / out.quality[0, 1], t[0] / t[1])
    torch.testing.assert_close(out.ious[0], torch.tensor([1.0, 0.5, 0.75]))


def test_tal_normalisation_after_conflicts():
    # GT a = [0,0,40,40] (class 0), GT b = [20,0,60,40] (class 1). P0 (10,20) in a only, P1 (30,20) in both,
    # P2 (50,20) in b only. pred0 = [0,0,40,20]: u_a = 0.5; pred1 = b: u_a = 800/2400 = 1/3, u_b = 1;
    # pred2 = [40,0,60,40]: u_a = 0, u_b = 0.5. Scores: class 0 0.05 at P0, 0.9 at P1; class 1 0.9 at P1, P2.
    # a selects P0 (t = 0.05/64 = 7.8e-4) and P1 (t = 0.9/729 = 1.23e-3, a's largest); b selects P1 (t = 0.9) and P2
    # (t = 0.9/64). P1 goes to b (u 1 > 1/3). a is normalised over what it keeps, {P0}: t_hat = t/(t+eps) * 0.5 ~ 0.5
    # (normalising before the conflict would give 7.8e-4/1.23e-3 * 0.5 = 0.32).
    # b: P1 ~ 1, P2 = (0.9/64)/(0.9+eps) * 1 ~ 1/64.
    pts = torch.tensor([[10.0, 20.0], [30.0, 20.0], [50.0, 20.0]])
    pred = torch.tensor([[[0.0, 0, 40, 20], [20, 0, 60, 40], [40, 0, 60, 40]]])
    scores = torch.tensor([[[0.05, 0.3], [0.9, 0.9], [0.3, 0.9]]])
    labels, boxes, mask = batch1([[0, 0, 40, 40], [20, 0, 60, 40]], [0, 1])
    eps = 1e-7
    out = TALAssigner(num_classes=2, eps=eps)(scores, pred, pts, labels, boxes, mask)
    assert out.gt_idx.tolist() == [[0, 1, 1]] and out.fg_mask.all()
    t_a0 = 0.05 / 64
    expected = torch.tensor([t_a0 / (t_a0 + eps) * 0.5, 0.9 / (0.9 + eps), 0.9 / 64 / (0.9 + eps)])
    torch.testing.assert_close(out.quality[0], expected)


def test_tal_topk_limits_positives():
    # 16 anchor points all inside GT [0,0,32,32]; every prediction is the GT itself (u = 1), so t = score; scores are a
    # permutation of distinct values. topk = 3 -> exactly the 3 highest scores are positive, t_hat = s / s_max.
    pts = torch.tensor([[x, y] for y in (4.0, 12.0, 20.0, 28.0) for x in (4.0, 12.0, 20.0, 28.0)])
    pred = torch.tensor([0.0, 0, 32, 32]).expand(1, 16, 4)
    s = (torch.randperm(16, generator=torch.Generator().manual_seed(0)).float() + 1) / 20
    labels, boxes, mask = batch1([[0, 0, 32, 32]], [0])
    out = TALAssigner(num_classes=1, topk=3)(s.view(1, 16, 1), pred, pts, labels, boxes, mask)
    top3 = s.topk(3).indices
    assert out.fg_mask.sum() == 3 and out.fg_mask[0, top3].all()
    torch.testing.assert_close(out.quality[0, top3], s[top3] / (s.max() + 1e-7))


def test_tal_topk_larger_than_anchor_count():
    # k = min(topk, A): 13 requested, 4 anchors available, so every anchor is a candidate of both GTs. The extra ones
    # over topk = 3 (P3 for a and b, t = 0) are filtered, so the result must equal the topk = 3 one.
    ref = TALAssigner(num_classes=2, topk=3)(*two_gt_case())
    out = TALAssigner(num_classes=2, topk=13)(*two_gt_case())
    assert_assignment(out, ref)


def test_tal_zero_metric_candidates_are_dropped():
    # GT [0,0,32,32] contains all 16 points; topk = 4. Only P0 and P1 predict the GT with a non-zero score:
    # P2 predicts the GT but scores 0 for its class (t = 0), the rest predict a far box (u = 0, t = 0).
    # The top-4 therefore holds two t = 0 anchors that lie inside the GT: they must be dropped -> 2 positives.
    pts = torch.tensor([[x, y] for y in (4.0, 12.0, 20.0, 28.0) for x in (4.0, 12.0, 20.0, 28.0)])
    pred = torch.tensor([100.0, 100, 110, 110]).repeat(1, 16, 1)
    pred[0, :3] = torch.tensor([0.0, 0, 32, 32])
    scores = torch.full((1, 16, 1), 0.5)
    scores[0, 1, 0], scores[0, 2, 0] = 0.25, 0.0
    labels, boxes, mask = batch1([[0, 0, 32, 32]], [0])
    out = TALAssigner(num_classes=1, topk=4)(scores, pred, pts, labels, boxes, mask)
    assert out.fg_mask[0].nonzero().squeeze(1).tolist() == [0, 1]
    torch.testing.assert_close(out.quality[0, :2], torch.tensor([0.5 / (0.5 + 1e-7), 0.25 / (0.5 + 1e-7)]))


def test_tal_empty_image_beside_image_with_gts():
    # Image 0 has only padding (mask 0) whose rows hold copies of image 1's GTs: nothing may be assigned there.
    # Image 1 must come out exactly as when assigned alone.
    scores, pred, pts, labels, boxes, mask = two_gt_case()
    batch = (
        scores.repeat(2, 1, 1), pred.repeat(2, 1, 1), pts,
        labels.repeat(2, 1, 1), boxes.repeat(2, 1, 1), torch.stack((torch.zeros_like(mask[0]), mask[0])),
    )
    assigner = TALAssigner(num_classes=2, topk=3)
    out, alone = assigner(*batch), assigner(scores, pred, pts, labels, boxes, mask)
    assert not out.fg_mask[0].any() and (out.labels[0] == 2).all()
    assert (out.gt_idx[0] == 0).all() and (out.bboxes[0] == 0).all() and (out.quality[0] == 0).all()
    assert_assignment(Assignment(*(f[1:] for f in out)), alone)


@pytest.mark.parametrize("b", [1, 3])
def test_tal_no_gt_at_all(b):
    a = 7
    out = TALAssigner(num_classes=5)(
        torch.rand(b, a, 5), torch.rand(b, a, 4) * 10, torch.rand(a, 2), torch.zeros(b, 0, 1), torch.zeros(b, 0, 4),
        torch.zeros(b, 0, 1),
    )
    assert out.fg_mask.shape == (b, a) and not out.fg_mask.any()
    assert out.gt_idx.dtype == torch.long and (out.gt_idx == 0).all()
    assert out.labels.dtype == torch.long and (out.labels == 5).all()
    assert out.bboxes.shape == (b, a, 4) and (out.bboxes == 0).all()
    assert (out.quality == 0).all() and (out.ious == 0).all()


def test_tal_half_inputs_use_float32_ious():
    # Half inputs must give exactly the float32 result on the same (rounded) values: IoU**6 in half would not.
    g = torch.Generator().manual_seed(3)
    pts, _ = grid_points(64, (8, 16))
    strides = torch.tensor([8.0] * 64 + [16.0] * 16)
    scores, pred = random_predictions(g, 2, pts, strides)
    labels, boxes, mask = random_gts(g, 2, 4, 64)
    scores, pred, boxes = scores.half(), pred.half(), boxes.half()
    assigner = TALAssigner(num_classes=NC)
    out = assigner(scores, pred, pts.half(), labels, boxes, mask)
    ref = assigner(scores.float(), pred.float(), pts, labels, boxes.float(), mask)
    assert out.fg_mask.any()
    assert_assignment(Assignment(*out[:3], out.bboxes.float(), *out[4:]), ref)
    assert out.quality.dtype == torch.float32 and out.ious.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# TALAssigner vs the literal mmdet reference
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "topk"), [(0, 13), (1, 13), (2, 5), (3, 1), (4, 30)])
def test_tal_matches_mmdet_reference(seed, topk):
    g = torch.Generator().manual_seed(seed)
    size, strides_ = 128, (8, 16, 32)
    pts, counts = grid_points(size, strides_)
    strides = torch.cat([torch.full((c,), float(s)) for c, s in zip(counts, strides_)])
    scores, pred = random_predictions(g, 4, pts, strides)
    labels, boxes, mask = random_gts(g, 4, 6, size)
    assigner = TALAssigner(num_classes=NC, topk=topk)
    out = assigner(scores, pred, pts, labels, boxes, mask)
    ref = ref_tal(assigner, scores, pred, pts, labels, boxes, mask)
    assert ref.fg_mask.sum() >= 5  # the batch exercises the rules, not only the background path
    assert_assignment(out, ref)
    assert (mask[..., 0].gather(1, out.gt_idx)[out.fg_mask] == 1).all()  # padded GTs never assigned


def test_tal_reference_detects_conflicts():
    # Guard on the random test above: its batches must contain contested anchors, or conflicts go untested.
    g = torch.Generator().manual_seed(0)
    pts, counts = grid_points(128, (8, 16, 32))
    strides = torch.cat([torch.full((c,), float(s)) for c, s in zip(counts, (8, 16, 32))])
    scores, pred = random_predictions(g, 4, pts, strides)
    labels, boxes, mask = random_gts(g, 4, 6, 128)
    assigner = TALAssigner(num_classes=NC)
    out = assigner(scores, pred, pts, labels, boxes, mask)
    # Count anchors that more than one real GT would take if each GT were alone in the image.
    claims = torch.zeros(4, pts.shape[0], dtype=torch.long)
    for m in range(6):
        single = mask.clone()
        single[:, :m] = 0
        single[:, m + 1 :] = 0
        claims += assigner(scores, pred, pts, labels, boxes, single).fg_mask.long()
    contested = claims > 1
    assert contested.any()
    assert out.fg_mask[contested].all()


# --------------------------------------------------------------------------------------------------------------------
# ATSSAssigner: hand-worked cases
# --------------------------------------------------------------------------------------------------------------------
def test_atss_unbiased_std_threshold():
    # One level of nine 10x10 anchors on a 3x3 grid (x, y in 0, 10, 20); topk = 9 -> all are candidates.
    # GT [0,1,28,6] (area 140): A0 = [0,0,10,10] and A1 = [10,0,20,10] overlap 50 -> 50/190 = 5/19 = 0.26316;
    # A2 = [20,0,30,10] overlaps 8*5 = 40 -> 40/200 = 0.2; the six others 0.
    # mean = (2*5/19 + 0.2)/9 = 0.080702; sum of squared deviations = 9 * (E[x^2] - mean^2)
    # = 9 * ((2*(5/19)**2 + 0.04)/9 - 0.080702**2) = 0.119889.
    # unbiased std = sqrt(0.119889/8) = 0.12242 -> threshold 0.20312: A0, A1 pass, A2 (0.2) does not.
    # (A biased std, sqrt(0.119889/9) = 0.11542, would give 0.19612 and wrongly let A2 in.)
    # Centres (5,5), (15,5), (25,5) are all inside the GT, so the threshold alone decides.
    anchors = torch.tensor([[x, y, x + 10, y + 10] for y in (0.0, 10.0, 20.0) for x in (0.0, 10.0, 20.0)])
    labels, boxes, mask = batch1([[0, 1, 28, 6]], [3])
    out = ATSSAssigner(num_classes=4, topk=9)(anchors, [9], labels, boxes, mask)
    assert out.fg_mask[0].nonzero().squeeze(1).tolist() == [0, 1]
    assert out.labels[0].tolist() == [3, 3] + [4] * 7
    torch.testing.assert_close(out.ious[0, :2], torch.tensor([5 / 19, 5 / 19]))
    assert out.quality[0].tolist() == [1.0, 1.0] + [0.0] * 7


def test_atss_threshold_is_inclusive():
    # GT [0,0,20,20] (area 400) split into four 10x10 anchors, one level, topk = 4: every IoU is 100/400 = 0.25
    # (exact in float32), so mean = 0.25, std = 0 and the threshold equals each IoU. mmdet keeps IoU >= threshold:
    # all four are positive (a strict > would leave this grid-aligned GT without a single positive).
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
    out = ATSSAssigner(num_classes=1, topk=4)(anchors, [4], *batch1([[0, 0, 20, 20]], [0]))
    assert out.fg_mask.all()
    torch.testing.assert_close(out.ious, torch.full((1, 4), 0.25))


def test_atss_topk_is_per_level():
    # GT [0,0,32,32], centre (16,16), area 1024. topk = 2.
    # Level 0 (8x8): [8,8,16,16], [16,8,24,16], [8,16,16,24], [16,16,24,24] (centre distance^2 32, IoU 64/1024 = 1/16).
    # Level 1 (32x32): L1a = [6,6,38,38] (centre (22,22), distance^2 72, IoU 26*26/(2048-676) = 676/1372 = 0.4927),
    #                  L1b = [64,64,96,96] (IoU 0).
    # Per level: 2 of the 1/16 anchors + L1a + L1b -> IoUs {1/16, 1/16, 0.4927, 0}: mean 0.1544, unbiased std
    # sqrt(0.15518/3) = 0.2274 -> threshold 0.3819: only L1a (centre (22,22) inside) is positive.
    # A global top-4 would take the four level-0 anchors: all 1/16, std 0 -> all four positive, L1a no candidate.
    anchors = torch.tensor(
        [[8.0, 8, 16, 16], [16, 8, 24, 16], [8, 16, 16, 24], [16, 16, 24, 24], [6, 6, 38, 38], [64, 64, 96, 96]]
    )
    labels, boxes, mask = batch1([[0, 0, 32, 32]], [0])
    out = ATSSAssigner(num_classes=1, topk=2)(anchors, [4, 2], labels, boxes, mask)
    assert out.fg_mask[0].tolist() == [False] * 4 + [True, False]
    torch.testing.assert_close(out.ious[0, 4], torch.tensor(676 / 1372))


def test_atss_small_gt_without_anchor_centre_gets_no_positive():
    # Anchors 16x16 centred on 4, 12, 20, 28. GT [9,9,11,11] contains no centre; its nearest candidates all overlap it
    # (IoU 4/256), so the threshold passes some of them and only the centre rule can reject them.
    pts = torch.tensor([[x, y] for y in (4.0, 12.0, 20.0, 28.0) for x in (4.0, 12.0, 20.0, 28.0)])
    anchors = torch.cat((pts - 8, pts + 8), -1)
    labels, boxes, mask = batch1([[9, 9, 11, 11]], [0])
    out = ATSSAssigner(num_classes=1, topk=9)(anchors, [16], labels, boxes, mask)
    assert not out.fg_mask.any() and (out.labels == 1).all() and (out.ious == 0).all()


def test_atss_conflict_goes_to_higher_iou():
    # Anchors A0 [0,0,10,10] (centre (5,5)), A1 [10,0,20,10] (centre (15,5)), A2 [40,40,50,50]; one level, topk = 3.
    # GT a = [0,0,16,10] (area 160): IoUs 100/160 = 0.625, 60/200 = 0.3, 0 -> mean 0.30833, unbiased std
    # sqrt((0.31667^2 + 0.00833^2 + 0.30833^2)/2) = 0.31257 -> thr 0.6209: A0 only (centre inside a).
    # GT b = [2,0,12,10] (area 100): IoUs 80/120 = 0.6667, 20/180 = 0.1111, 0 -> mean 0.25926, unbiased std
    # sqrt((0.40741^2 + 0.14815^2 + 0.25926^2)/2) = 0.35717 -> thr 0.6164: A0 only (centre inside b).
    # A0 is positive for both: IoU 0.6667 with b > 0.625 with a -> b.
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [40, 40, 50, 50]])
    labels, boxes, mask = batch1([[0, 0, 16, 10], [2, 0, 12, 10]], [0, 1])
    out = ATSSAssigner(num_classes=2, topk=3)(anchors, [3], labels, boxes, mask)
    assert out.fg_mask[0].tolist() == [True, False, False]
    assert out.gt_idx[0, 0] == 1 and out.labels[0, 0] == 1
    assert out.bboxes[0, 0].tolist() == [2, 0, 12, 10]
    torch.testing.assert_close(out.ious[0, 0], torch.tensor(80 / 120))
    # Without b, a keeps A0: the conflict, not the threshold, took it from a.
    alone = ATSSAssigner(num_classes=2, topk=3)(anchors, [3], labels[:, :1], boxes[:, :1], mask[:, :1])
    assert alone.fg_mask[0].tolist() == [True, False, False] and alone.gt_idx[0, 0] == 0


def test_atss_empty_image_and_no_gt():
    anchors, counts = anchor_boxes(64, (8, 16))
    assigner = ATSSAssigner(num_classes=3)
    out = assigner(anchors, counts, torch.zeros(2, 0, 1), torch.zeros(2, 0, 4), torch.zeros(2, 0, 1))
    assert out.fg_mask.shape == (2, 80) and not out.fg_mask.any() and (out.labels == 3).all()
    assert out.bboxes.shape == (2, 80, 4) and (out.quality == 0).all() and (out.ious == 0).all()
    # Image 0 only padding holding a copy of image 1's GT: nothing assigned there, image 1 unaffected by it.
    labels = torch.tensor([[[1.0]], [[1.0]]])
    boxes = torch.tensor([[[3.3, 5.1, 50.7, 44.2]], [[3.3, 5.1, 50.7, 44.2]]])
    mask = torch.tensor([[[0.0]], [[1.0]]])
    out = assigner(anchors, counts, labels, boxes, mask)
    alone = assigner(anchors, counts, labels[1:], boxes[1:], mask[1:])
    assert not out.fg_mask[0].any() and alone.fg_mask.any()
    assert_assignment(Assignment(*(f[1:] for f in out)), alone)


def test_atss_half_inputs():
    g = torch.Generator().manual_seed(5)
    anchors, counts = anchor_boxes(128, (8, 16, 32))
    labels, boxes, mask = random_gts(g, 3, 5, 128)
    assigner = ATSSAssigner(num_classes=NC)
    out = assigner(anchors.half(), counts, labels, boxes.half(), mask)
    ref = assigner(anchors, counts, labels, boxes.half().float(), mask)
    assert out.fg_mask.any()
    assert_assignment(Assignment(*out[:3], out.bboxes.float(), *out[4:]), ref)


# --------------------------------------------------------------------------------------------------------------------
# ATSSAssigner vs the literal mmdet reference
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "topk"), [(0, 9), (1, 9), (2, 3), (3, 20), (4, 9)])
def test_atss_matches_mmdet_reference(seed, topk):
    g = torch.Generator().manual_seed(seed)
    anchors, counts = anchor_boxes(128, (8, 16, 32, 64))  # the 64 level has 4 anchors: k = min(topk, 4) there
    labels, boxes, mask = random_gts(g, 4, 6, 128)
    assigner = ATSSAssigner(num_classes=NC, topk=topk)
    out = assigner(anchors, counts, labels, boxes, mask)
    ref = ref_atss(assigner, anchors, counts, labels, boxes, mask)
    assert ref.fg_mask.sum() > 10
    assert_assignment(out, ref)
    assert (mask[..., 0].gather(1, out.gt_idx)[out.fg_mask] == 1).all()
