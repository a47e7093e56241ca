"""Tests of the alignment study: hand-built predictions with hand-worked answers, then real runs on coco8."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import pytest
import torch

from tood_yolo.tools.analysis import (
    alignment_study,
    assign_predictions,
    average_ranks,
    count_detections,
    dense_predictions,
    json_alignment,
    main,
    parse_args,
    pre_nms_alignment,
    rank_correlation,
)

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # one 10x10 GT of class 0
GT_CLS = torch.tensor([0])


def shifted(dx: list[float], y2: float = 10.0) -> torch.Tensor:
    """10-wide boxes shifted right by dx: IoU with GT = (10 - dx) / (10 + dx) for 0 <= dx <= 10 and y2 = 10."""
    dx = torch.tensor(dx, dtype=torch.float32)
    return torch.stack([dx, torch.zeros_like(dx), dx + 10, torch.full_like(dx, y2)], 1)


def iou_of_shift(dx: float) -> float:
    """Independent IoU of `shifted([dx])` with GT: overlap (10 - dx) * 10 over union 200 - overlap."""
    return (10 - dx) / (10 + dx)


def study(boxes, scores, classes=None, gt=GT, gt_cls=GT_CLS, **kwargs):
    """Run the pre-NMS study with class 0 predictions unless told otherwise."""
    classes = torch.zeros(len(scores), dtype=torch.long) if classes is None else classes
    return pre_nms_alignment(boxes, torch.tensor(scores), classes, gt, gt_cls, **kwargs)


def test_average_ranks_ties():
    # rankdata([3, 1, 4, 1, 5], "average"): the two 1s share positions 1 and 2
    assert average_ranks(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0])).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]


def test_rank_correlation_matches_spearman_formula():
    # without ties Spearman's rho = 1 - 6 sum(d^2) / (n (n^2 - 1)), d the rank differences (argsort of argsort)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g), torch.rand(50, generator=g)
    d = (a.argsort().argsort() - b.argsort().argsort()).double()
    assert rank_correlation(a, b) == pytest.approx(1 - 6 * d.square().sum().item() / (50 * (50**2 - 1)))


def test_perfectly_aligned():
    dx = [0, 1, 2, 3, 4]  # IoU 1, .818, .667, .538, .429: falling
    r = study(shifted(dx), [0.9, 0.8, 0.7, 0.6, 0.5])  # scores falling too
    assert r["corr"].item() == pytest.approx(1.0)
    assert r["top_iou"].item() == pytest.approx(sum(map(iou_of_shift, dx)) / 5, abs=1e-6)  # fewer than 10: all
    assert r["n"].item() == 5


def test_anti_aligned():
    dx = [0, 1, 2, 3, 4]
    r = study(shifted(dx), [0.5, 0.6, 0.7, 0.8, 0.9])  # best IoU has the worst score
    assert r["corr"].item() == pytest.approx(-1.0)
    # top-10 by score is all 5, mean IoU unchanged by the order
    assert r["top_iou"].item() == pytest.approx(sum(map(iou_of_shift, dx)) / 5, abs=1e-6)


def test_intermediate():
    # IoU ranks (ascending) of dx 0..4: [5, 4, 3, 2, 1]; score ranks of [.8, .9, .7, .5, .6]: [4, 5, 3, 1, 2]
    # d = [1, -1, 0, 1, -1], sum d^2 = 4, rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8 (no ties: the formula holds)
    r = study(shifted([0, 1, 2, 3, 4]), [0.8, 0.9, 0.7, 0.5, 0.6])
    assert r["corr"].item() == pytest.approx(0.8)


def test_ties_average_ranks():
    # IoU ranks of dx 0..3: [4, 3, 2, 1], centred [1.5, .5, -.5, -1.5] (sum of squares 5)
    # score ranks of [.9, .9, .5, .5] with ties averaged: [3.5, 3.5, 1.5, 1.5], centred [1, 1, -1, -1] (sum 4)
    # Pearson = (1.5 + .5 + .5 + 1.5) / sqrt(5 * 4) = 4 / sqrt(20)
    r = study(shifted([0, 1, 2, 3]), [0.9, 0.9, 0.5, 0.5])
    assert r["corr"].item() == pytest.approx(4 / math.sqrt(20))
    assert rank_correlation(torch.tensor([0.9, 0.9, 0.5, 0.5]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(
        4 / math.sqrt(20)
    )


def test_constant_scores_undefined():
    r = study(shifted([0, 1, 2]), [0.5, 0.5, 0.5])  # ranks all equal: correlation undefined, IoU mean still defined
    assert math.isnan(r["corr"].item())
    assert r["top_iou"].item() == pytest.approx(sum(map(iou_of_shift, [0, 1, 2])) / 3, abs=1e-6)


def test_top50_and_top10_cut():
    # 50 aligned predictions (dx 0, .1, ... 4.9, scores falling) and 10 with lower scores but better IoUs than most
    # (dx -0.05 is IoU .990): inside the top-50 they would break the alignment, so rho = 1 only if they are cut
    dx = [i / 10 for i in range(50)] + [-0.05] * 10
    scores = [1 - i / 100 for i in range(50)] + [0.01] * 10
    r = study(shifted(dx), scores)
    assert r["corr"].item() == pytest.approx(1.0)
    assert r["n"].item() == 60
    assert r["top_iou"].item() == pytest.approx(sum(iou_of_shift(i / 10) for i in range(10)) / 10, abs=1e-6)
    assert study(shifted(dx), scores, topk=60)["corr"].item() < 0.9  # the same instance without the cut


def test_single_prediction_skipped():
    r = study(shifted([1]), [0.9])
    assert math.isnan(r["corr"].item())  # fewer than 2 predictions: no correlation
    assert r["top_iou"].item() == pytest.approx(iou_of_shift(1), abs=1e-6)


def test_assignment_rules():
    gt = torch.tensor([[0.0, 0, 10, 10], [4.0, 0, 14, 10]])  # two class-0 GTs overlapping
    boxes = torch.tensor(
        [
            [3.0, 0, 13, 10],  # IoU 7/13 with GT 0, 9/11 with GT 1 -> GT 1
            [0.0, 0, 10, 10],  # class 1: no class-1 GT -> unassigned
            [50.0, 50, 60, 60],  # overlaps nothing (IoU 0) -> unassigned
            [2.0, 0, 12, 10],  # IoU 8/12 with both: tie -> lower GT index, 0
        ]
    )
    assigned, iou = assign_predictions(boxes, torch.tensor([0, 1, 0, 0]), gt, torch.tensor([0, 0]))
    assert assigned.tolist() == [1, -1, -1, 0]
    assert iou.tolist() == pytest.approx([9 / 11, 0, 0, 8 / 12], abs=1e-6)
    r = pre_nms_alignment(boxes, torch.tensor([0.9, 0.99, 0.8, 0.7]), torch.tensor([0, 1, 0, 0]), gt, [0, 0])
    assert r["n"].tolist() == [1, 1]  # the class-1 box, though best-scored and exact, reaches no instance


def test_class_mismatch_not_assigned():
    r = study(shifted([0, 1]), [0.9, 0.8], classes=torch.tensor([1, 1]))
    assert r["n"].item() == 0 and math.isnan(r["top_iou"].item())


def test_dense_predictions_multi_label():
    boxes = torch.rand(3, 4)
    cls_scores = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.9, 0.8, 0.7]])  # (A=3, nc=3)
    b, s, c = dense_predictions(boxes, cls_scores, torch.tensor([2, 0, 2]))
    assert len(b) == 6 and torch.equal(b[3:], boxes)  # one copy per GT class present (0 and 2)
    assert s.tolist() == pytest.approx([0.1, 0.4, 0.9, 0.3, 0.6, 0.7]) and c.tolist() == [0, 0, 0, 2, 2, 2]
    b, s, c = dense_predictions(boxes, cls_scores, torch.tensor([2]), multi_label=False)
    assert s.tolist() == pytest.approx([0.3, 0.6, 0.9]) and c.tolist() == [2, 2, 0]


# One image for the post-NMS counts, with the category of each detection worked out by hand.
COUNT_GT = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [44, 0, 54, 10]])
COUNT_GT_CLS = torch.tensor([0, 0, 2, 2])
COUNT_DETS = [  # box, score, class, expected (input order shuffled: matching must follow the scores)
    ([1, 0, 11, 10], 0.80, 0, "redundant"),  # IoU 9/11 with GT 0, which the 0.90 box takes first: a duplicate
    ([0, 0, 10, 10], 0.90, 0, "correct"),  # GT 0
    ([0, 0, 10, 3], 0.70, 0, "error"),  # IoU 30/100 = 0.3 with GT 0
    ([0, 0, 10, 0.5], 0.60, 0, "background"),  # IoU 5/100 = 0.05: nothing
    ([0, 0, 10, 10], 0.95, 1, "background"),  # exact box, wrong class: no class-1 GT
    ([21, 0, 31, 10], 0.30, 0, "correct"),  # GT 1 (9/11), lowest score but first on its GT
    ([41, 0, 51, 10], 0.85, 2, "correct"),  # GT 2 (9/11; 7/13 with GT 3)
    ([43, 0, 53, 10], 0.84, 2, "correct"),  # 7/13 with taken GT 2, 9/11 with free GT 3: takes GT 3
    ([40, 0, 50, 10], 0.50, 2, "redundant"),  # IoU 1 with taken GT 2, 6/14 < 0.5 with GT 3
]


def test_count_detections():
    boxes = torch.tensor([d[0] for d in COUNT_DETS], dtype=torch.float32)
    scores = torch.tensor([d[1] for d in COUNT_DETS])
    classes = torch.tensor([d[2] for d in COUNT_DETS])
    counts = count_detections(boxes, scores, classes, COUNT_GT, COUNT_GT_CLS)
    expected = {k: sum(d[3] == k for d in COUNT_DETS) for k in ("correct", "redundant", "error", "background")}
    assert expected == {"correct": 4, "redundant": 2, "error": 1, "background": 2}
    assert counts == {"detections": 9, **expected}


def test_count_detections_empty():
    assert count_detections(torch.zeros(0, 4), [], [], COUNT_GT, COUNT_GT_CLS)["detections"] == 0
    assert count_detections(COUNT_GT, [0.5] * 4, [0] * 4, torch.zeros(0, 4), [])["background"] == 4


def write_coco(tmp: Path, images: list[dict], gts: list[tuple], dets: list[dict]) -> tuple[Path, Path]:
    """Write a COCO GT file (gts: image_id, ltwh, category, iscrowd) and a predictions.json."""
    anns = [
        {"id": i + 1, "image_id": im, "bbox": b, "category_id": c, "iscrowd": crowd, "area": b[2] * b[3]}
        for i, (im, b, c, crowd) in enumerate(gts)
    ]
    (tmp / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1}]}))
    (tmp / "predictions.json").write_text(json.dumps(dets))
    return tmp / "predictions.json", tmp / "gt.json"


def test_json_alignment(tmp_path):
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}]
    gts = [(7, [0, 0, 10, 10], 1, 0), (8, [0, 0, 10, 10], 1, 0), (8, [20, 0, 10, 10], 1, 1)]  # last one crowd
    dets = [
        {"image_id": 7, "bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.9},  # correct
        {"image_id": 7, "bbox": [1, 0, 10, 10], "category_id": 1, "score": 0.8},  # redundant (9/11)
        {"image_id": "b", "file_name": "b.jpg", "bbox": [0, 0, 10, 3], "category_id": 1, "score": 0.7},  # error
        {"image_id": 8, "bbox": [20, 0, 10, 10], "category_id": 1, "score": 0.02},  # on the crowd: background
        {"image_id": 99, "bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.9},  # unknown image: left out
    ]
    r = json_alignment(*write_coco(tmp_path, images, gts, dets))
    assert (r["images"], r["instances"], r["detections"]) == (2, 2, 4)
    assert (r["correct"], r["redundant"], r["error"], r["background"]) == (1, 1, 1, 1)
    assert r["correct_pct"] == pytest.approx(25.0)
    assert r["rank_corr"] is None and r["ranked"] is None and "not available" in r["note"]
    assert json_alignment(*write_coco(tmp_path, images, gts, dets), conf=0.05)["detections"] == 3


def test_parse_args_errors():
    with pytest.raises(SyntaxError):
        parse_args(["model=a.pt", "foo=1", "data=d.yaml"])
    with pytest.raises(SyntaxError):
        parse_args(["model=a.pt"])  # no data
    with pytest.raises(SyntaxError):
        parse_args(["predictions=p.json"])  # no annotations
    assert parse_args(["model=a.pt,b.pt", "data=d.yaml"])["model"] == ["a.pt", "b.pt"]


@pytest.fixture(scope="module")
def coco8(shared_data) -> Path:
    """coco8's data.yaml in a temp copy."""
    return shared_data("coco8") / "data.yaml"


def coco8_gt_json(data: Path, out: Path) -> Path:
    """COCO GT json of coco8 val from its YOLO labels, with the ids Ultralytics' predictions.json uses (class + 1)."""
    images, anns = [], []
    for f in sorted((data.parent / "images" / "val").glob("*.jpg")):
        h, w = cv2.imread(str(f)).shape[:2]
        images.append({"id": int(f.stem), "file_name": f.name, "height": h, "width": w})
        for line in (data.parent / "labels" / "val" / f"{f.stem}.txt").read_text().splitlines():
            c, x, y, bw, bh = map(float, line.split())
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            anns.append({"id": len(anns) + 1, "image_id": int(f.stem), "category_id": int(c) + 1, "bbox": box})
    out.write_text(json.dumps({"images": images, "annotations": anns}))
    return out


def test_runner_matches_predictions_json(coco8, tmp_path):
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    # an untrained head scores ~1e-4: conf below that so that NMS keeps detections to count
    kwargs = {"data": str(coco8), "imgsz": 320, "conf": 1e-5, "iou": 0.7}
    r = alignment_study(model, **kwargs)
    assert (r["images"], r["instances"]) == (4, 17)  # coco8 val: 4 images, 17 boxes
    assert math.isfinite(r["rank_corr"]) and -1 <= r["rank_corr"] <= 1 and 1 <= r["ranked"] <= 17
    assert math.isfinite(r["top_iou"]) and 0 < r["top_iou"] <= 1
    assert r["detections"] == sum(r[k] for k in ("correct", "redundant", "error", "background")) > 0
    model.val(**kwargs, save_json=True, plots=False, project=str(tmp_path), name="val")
    j = json_alignment(tmp_path / "val" / "predictions.json", coco8_gt_json(coco8, tmp_path / "gt.json"))
    keys = ("images", "instances", "detections", "correct", "redundant", "error", "background")
    assert {k: j[k] for k in keys} == {k: r[k] for k in keys}  # same boxes, same space, same counts


def test_cli_two_models(coco8, tmp_path):
    torch.manual_seed(0)  # untrained heads tie many scores: a fixed init keeps some instances rankable
    save_dir = main(
        ["model=yolov8n.yaml,yolov8s.yaml", f"data={coco8}", "imgsz=320", f"project={tmp_path}", "name=cmp"]
    )
    assert save_dir == tmp_path / "cmp"
    results = json.loads((save_dir / "alignment.json").read_text())["results"]
    rows = list(csv.DictReader(open(save_dir / "alignment.csv", encoding="utf-8")))
    assert [r["model"] for r in results] == [r["model"] for r in rows] == ["yolov8n.yaml", "yolov8s.yaml"]
    for r in results:
        assert r["instances"] == 17 and math.isfinite(r["rank_corr"]) and math.isfinite(r["top_iou"])
        assert r["conf"] == 0.001  # `yolo val`'s default when conf is not given
