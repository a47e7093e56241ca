"""TOOD's alignment study (Feng et al., ICCV 2021) as a tool for any Ultralytics detection model.

TOOD claims that its highest-scoring prediction for an object is also its best-localised one. The paper measures it
in two ways, both reproduced here for one image at a time and summed over a dataset:

- Before NMS: every prediction is assigned to a ground-truth (GT) instance; for each instance the top-50 predictions by
  score are taken, and the Pearson correlation between their classification ranking and their localisation (IoU)
  ranking is computed (Pearson on ranks, i.e. Spearman's rho), together with the mean IoU of the top-10 by score.
- After NMS: detections are counted as correct (IoU >= 0.5, first by score for its GT), redundant (IoU >= 0.5 with a GT
  that a higher-scoring detection already took: a duplicate) or error (0.1 < IoU < 0.5).

Rules where the paper is silent (fixed here so that numbers are comparable between models):

- Pre-NMS predictions are multi-label, like Ultralytics' val NMS (multi_label=True): each anchor gives one prediction
  per class (box, that class's score). Only classes present in the image's GT are built, as no other class can be
  assigned. No score threshold is applied before NMS: the top-50 selection is the filter (and untrained models stay
  measurable).
- Assignment: a prediction goes to the GT of its own class with which it has the highest IoU, provided that IoU > 0;
  IoU ties go to the lower GT index. Predictions overlapping no same-class GT are left out.
- Score ties in the top-k selection go to the lower prediction index (stable sort). Rank ties take average ranks
  (scipy.stats.rankdata's "average"), so the correlation is exactly Spearman's rho with ties.
- An instance's correlation is undefined, and the instance left out of the mean correlation, when it has fewer than 2
  assigned predictions or when all its top-k scores or all its top-k IoUs are equal. Its top-10 mean IoU is the mean
  over the (up to 10) predictions it has; instances with no prediction are left out of that mean. Both means are plain
  averages over instances; `ranked` and `located` count the instances in each.
- After NMS, detections are those with score > conf (Ultralytics' NMS keeps score > conf; default conf=0.001, the
  value `yolo val` uses). Matching is class-aware and greedy in descending score order, COCO-style: a detection takes
  the not-yet-matched same-class GT with the highest IoU >= 0.5 (correct); failing that, IoU >= 0.5 with an already
  matched same-class GT makes it redundant; failing that, a best same-class IoU in (0.1, 0.5) makes it an error; any
  other detection is background. Percentages are of all post-NMS detections, background included (0 when none).
- The runner maps boxes (pre- and post-NMS) and GTs back to original image pixels and clips boxes to the image, as
  Ultralytics' results and predictions.json do, so its post-NMS counts equal those `json_alignment` finds in the
  predictions.json of the same val run.

Usage:
    $ python -m tood_yolo.tools.analysis model=yolov8n.pt,tood-s.pt data=coco8.yaml split=val imgsz=640
    $ python -m tood_yolo.tools.analysis predictions=runs/detect/val/predictions.json annotations=instances_val2017.json
"""

from .cli import main, parse_args
from .metrics import (
    AlignmentStats,
    assign_predictions,
    average_ranks,
    count_detections,
    dense_predictions,
    instance_alignment,
    pre_nms_alignment,
    rank_correlation,
)
from .study import alignment_study, json_alignment
from .validator import AlignmentValidator

__all__ = (
    "AlignmentStats",
    "AlignmentValidator",
    "alignment_study",
    "assign_predictions",
    "average_ranks",
    "count_detections",
    "dense_predictions",
    "instance_alignment",
    "json_alignment",
    "main",
    "parse_args",
    "pre_nms_alignment",
    "rank_correlation",
)
