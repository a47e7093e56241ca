"""`TOODDetectionValidator`: Ultralytics' detection validator with TOOD's pre-NMS bound (`engine/candidates.py`), a
class-name check, TOOD's dataset class (`tood_yolo.data.dataset`), and COCO's official box AP table (pycocotools) for
`save_json=True`, offline.

What Ultralytics 8.4.190 does with `save_json=True` (`DetectionValidator.eval_json` / `coco_evaluate`):

- COCO val2017 itself (`is_coco`: the split path contains "coco" and ends in `val2017.txt` or `test-dev2017.txt`):
  predictions get COCO's 91-class ids (`coco80_to_coco91_class`) and are scored against
  `<data path>/annotations/instances_val2017.json` (LVIS: `lvis_v1_<split>.json`), image ids = int(file stem).
- Any other detection set (8.4 "custom json"): the validator builds the ground truth itself from the YOLO labels
  (`gdict`: category id = class index + 1, boxes in original image pixels, image id = dataloader index) and scores the
  predictions against it.
- Either way it scores with `faster-coco-eval>=1.6.7`, through `check_requirements`: with YOLO_AUTOINSTALL=false or
  offline nothing is installed and the table is skipped ("faster-coco-eval unable to run: No module named
  'faster_coco_eval'"). pycocotools, a dependency of this package, is never used.

`TOODDetectionValidator` is that validator with `coco_evaluate` done by pycocotools (the official implementation):
the 12-number AP/AR table is printed after Ultralytics' own metrics, and the stats get the same keys faster-coco-eval
would have filled (`metrics/mAP_small(B)` etc.; on COCO/LVIS also mAP50, mAP50-95 and fitness).
The COCO json helpers (reading, pycocotools scoring) are `tood_yolo.utils.coco`'s; `python -m tood_yolo.tools.coco`
scores a saved predictions.json against any COCO annotation file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from ultralytics.data.utils import get_split_fraction
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import LOGGER, nms

from ..data.dataset import TOODDataset, build_tood_dataset
from ..data.reference import fill_batch_padding
from ..utils.coco import coco_eval, load_gt
from .candidates import MAX_NMS, ULTRALYTICS_MAX_NMS, needs_bound, nms_bound, top_anchors


def _short(names: list[str], n: int = 8) -> str:
    """`names` for a message: all of them, or the first `n` and the count."""
    return f"{names}" if len(names) <= n else f"{names[:n]}... ({len(names)} names)"


class TOODDetectionValidator(DetectionValidator):
    """Ultralytics' DetectionValidator whose NMS gets at most `max_nms` (or `max_det`) candidates per image for models
    with a T-head, whose dataset is TOOD's (`build_dataset`), whose batches of the reference's pipeline (a training
    run's validation under `recipe: mmdet`) get their padding painted (`preprocess`), and whose `save_json=True` COCO
    evaluation runs pycocotools (offline).

    NMS runs without Ultralytics' time limit (2 s + 0.05 s per image of a batch). Past it Ultralytics only warns and
    gives the rest of the batch no detections, so mAP would depend on the machine's load (it did for weakly trained
    models on this project's shared CPU before the bound). The limit guards against NMS on tens of thousands of
    candidates; with at most `max_nms` per image NMS cannot run away, and the limit would be left with nothing to do
    but that load dependence. Same inputs as Ultralytics' faster-coco-eval path (COCO/LVIS annotation file, or the
    ground truth built from the labels for other sets), same stats keys; everything else is Ultralytics' validator
    unchanged.

    Attributes:
        max_nms (int): Candidates per image given to NMS, at least max_det (Ultralytics' own cap is 30,000).
        bounded (bool): Whether the bound applies to the model being validated (`needs_bound`; set by init_metrics).
    """

    max_nms: int = MAX_NMS
    bounded: bool = True

    def build_dataset(self, img_path: str, mode: str = "val", batch: int | None = None) -> TOODDataset:
        """`DetectionValidator.build_dataset` with TOOD's dataset class, which names bad label rows and a missing
        labels folder (`tood_yolo.data.dataset`)."""
        fraction = get_split_fraction(self.args.fraction, self.args.split or "val")
        return build_tood_dataset(
            self.args, img_path, batch, self.data, mode=mode, stride=self.stride, fraction=fraction
        )

    def preprocess(self, batch: dict) -> dict:
        """Ultralytics' preprocessing, then the padding of a reference batch painted (`fill_batch_padding`: the
        trainer's validation under the reference's pipeline)."""
        return fill_batch_padding(super().preprocess(batch))

    def init_metrics(self, model) -> None:
        """Ultralytics' metrics set-up, whether NMS's candidates are bounded for this model (`needs_bound`), and a
        warning when the model's class names are not the dataset's: the results would pair the dataset's class ids with
        the model's names (e.g. COCO persons reported as 'RBC')."""
        super().init_metrics(model)
        self.bounded = needs_bound(model)
        ours, theirs = list(self.names.values()), list(self.data["names"].values())
        if not self.training and not self.args.single_cls and ours != theirs:
            LOGGER.warning(
                f"the model's class names differ from the dataset's: model {_short(ours)}, dataset {_short(theirs)}. "
                f"Results pair the dataset's class ids with the model's names; validate on the dataset the model "
                f"was trained for"
            )

    def postprocess(self, preds: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """`DetectionValidator.postprocess` (its NMS call, argument for argument) on at most `max_nms` (or `max_det`)
        candidates per image when `bounded` (`tood_yolo.engine.candidates`: the best-scored ones, as Ultralytics' own
        `max_nms` cap picks them), without NMS's time limit (see the class).

        Args:
            preds (torch.Tensor): (B, 4 + nc, A) boxes and scores, or the eval-mode tuple whose first element it is.

        Returns:
            (list[dict[str, torch.Tensor]]): Per image, the NMS output's 'bboxes' (N, 4) xyxy, 'conf' (N,), 'cls' (N,)
                and 'extra' (N, 0).
        """
        k = nms_bound(self.max_nms, self.args.max_det) if self.bounded else ULTRALYTICS_MAX_NMS
        preds, _ = top_anchors(preds, k, self.nc)
        outputs = nms.non_max_suppression(
            preds,
            self.args.conf,
            self.args.iou,
            nc=0 if self.args.task == "detect" else self.nc,
            multi_label=True,
            agnostic=self.args.single_cls or self.args.agnostic_nms,
            max_det=self.args.max_det,
            end2end=self.end2end,
            rotated=self.args.task == "obb",
            max_time_img=math.inf,
            max_nms=k,
        )
        return [{"bboxes": x[:, :4], "conf": x[:, 4], "cls": x[:, 5], "extra": x[:, 6:]} for x in outputs]

    def coco_evaluate(
        self,
        stats: dict[str, Any],
        pred_json: str | Path | list,
        anno_json: str | Path | dict,
        iou_types: str | list[str] = "bbox",
        suffix: str | list[str] = "Box",
    ) -> dict[str, Any]:
        """Evaluate with pycocotools (see `DetectionValidator.coco_evaluate` for the arguments); Ultralytics' own
        path if pycocotools is missing."""
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            return super().coco_evaluate(stats, pred_json, anno_json, iou_types, suffix)
        if not (self.args.save_json and len(self.jdict) and (self.is_coco or self.is_lvis or self.gdict)):
            return stats
        LOGGER.info("\nEvaluating pycocotools mAP...")
        try:
            for x in pred_json, anno_json:
                if isinstance(x, (str, Path)):
                    assert Path(x).is_file(), f"{x} file not found"
            iou_types = [iou_types] if isinstance(iou_types, str) else iou_types
            suffix = [suffix] if isinstance(suffix, str) else suffix
            gt = getattr(self, "_pycoco_api", None) or load_gt(anno_json)
            self._pycoco_api = gt
            img_ids = gt.getImgIds() if self.gdict else [int(Path(x).stem) for x in self.dataloader.dataset.im_files]
            for iou_type, sfx in zip(iou_types, suffix):
                s = coco_eval(pred_json, gt, img_ids, iou_type)
                b = sfx[0]
                if not self.training and (self.is_coco or self.is_lvis):
                    stats[f"metrics/mAP50({b})"] = s["AP50"]
                    stats[f"metrics/mAP50-95({b})"] = s["AP"]
                    stats["fitness"] = 0.9 * s["AP"] + 0.1 * s["AP50"]
                if iou_type != "keypoints":  # COCO keypoint evaluation has no small area range
                    for x, k in zip(("small", "medium", "large"), ("APs", "APm", "APl")):
                        stats[f"metrics/mAP_{x}({b})"] = s[k]
            if self.is_lvis:
                stats["fitness"] = stats["metrics/mAP50-95(B)"]
        except Exception as e:
            LOGGER.warning(f"pycocotools unable to run: {e}")
        return stats
