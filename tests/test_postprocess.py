"""Post-processing of TOOD models: the pre-NMS bound (`tood_yolo.engine.candidates`) and the int8 OpenVINO export.

The bound's oracle is Ultralytics' own: `non_max_suppression(..., max_nms=k)` on the whole output. A model whose
scores all pass conf (an untrained TOOD model: its aligned scores start near 0.07) must give NMS exactly k candidates
per image in validation and prediction. A tiny TOOD model trained for a minute on test_deploy's rectangle scenes gives
real predictions for the metrics and int8 checks.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from test_deploy import IMGSZ, iou, scene
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionPredictor
from ultralytics.utils import nms

from tood_yolo.engine.candidates import MAX_NMS, needs_bound, top_anchors
from tood_yolo.engine.predictor import TOODDetectionPredictor
from tood_yolo.engine.validator import TOODDetectionValidator

ROOT = Path(__file__).resolve().parents[1]
ULTRALYTICS_MAX_NMS = 30_000  # non_max_suppression's default cap


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 spinning threads run 10-50x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nms_inputs(monkeypatch) -> list[int]:
    """The number of boxes each torchvision NMS call receives (Ultralytics' NMS calls it once per image)."""
    counts, nms_fn = [], torchvision.ops.nms

    def counting(boxes, scores, iou_threshold):
        counts.append(len(boxes))
        return nms_fn(boxes, scores, iou_threshold)

    monkeypatch.setattr(torchvision.ops, "nms", counting)
    return counts


def random_preds(b: int = 2, nc: int = 4, a: int = 1200, seed: int = 0) -> torch.Tensor:
    """(b, 4 + nc, a) xywh boxes in a 320 px image and distinct scores, most above 0.001 (TOOD's score spread)."""
    g = torch.Generator().manual_seed(seed)
    xy, wh = 320 * torch.rand(b, 2, a, generator=g), 4 + 76 * torch.rand(b, 2, a, generator=g)
    return torch.cat((xy, wh, torch.rand(b, nc, a, generator=g) ** 3), 1)


@pytest.mark.parametrize("k", [50, 400, 2000])
def test_top_anchors_give_nms_ultralytics_own_capped_candidates(k):
    preds = random_preds()
    ref = nms.non_max_suppression(preds, 0.001, 0.7, multi_label=True, max_det=300, max_nms=k)
    got = nms.non_max_suppression(top_anchors(preds, k, 4)[0], 0.001, 0.7, multi_label=True, max_det=300, max_nms=k)
    unbounded = nms.non_max_suppression(preds, 0.001, 0.7, multi_label=True, max_det=300, max_time_img=math.inf)
    for r, g, u in zip(ref, got, unbounded):
        assert torch.equal(r, g)  # validation: the same candidates as Ultralytics' cap at k, the same detections
        assert torch.equal(g, u[: len(g)])  # and the unbounded detections' best-scored part: only the tail goes
    # prediction: best class, `classes=` keeps 1 and 3 (an anchor whose best class is another is no candidate)
    ref = nms.non_max_suppression(preds, 0.001, 0.7, classes=[1, 3], max_nms=k)
    kept, idx = top_anchors(preds, k, 4, classes=[1, 3])
    got = nms.non_max_suppression(kept, 0.001, 0.7, classes=[1, 3])
    assert all(torch.equal(r, g) for r, g in zip(ref, got))
    assert (idx is None) == (k >= preds.shape[-1])


def test_predictor_maps_reid_indices_back_to_anchors():
    """Tracking's ReID features are read at NMS's kept indices: those of the bounded output must reach the same
    anchors' features as Ultralytics' indices into the whole output."""
    preds, k = random_preds(a=500), 100
    feats = [torch.rand(2, 8, 20, 20), torch.rand(2, 8, 10, 10)]  # 500 anchors
    _, full = nms.non_max_suppression(preds, 0.25, 0.7, max_nms=k, return_idxs=True)
    predictor = TOODDetectionPredictor()
    kept, predictor._kept = top_anchors(preds, k, 4)
    _, bounded = nms.non_max_suppression(kept, 0.25, 0.7, return_idxs=True)
    got = predictor.get_obj_feats(feats, bounded)
    want = DetectionPredictor.get_obj_feats(feats, full)
    assert len(full[0]) > 0 and all(torch.equal(g, w) for g, w in zip(got, want))


def test_only_t_head_models_and_exports_are_bounded(untrained):
    """Ultralytics' Detect validated through TOOD's classes (ablation, alignment study) keeps Ultralytics' own cap."""
    from types import SimpleNamespace

    from ultralytics.nn.tasks import DetectionModel

    assert needs_bound(untrained.model)
    assert not needs_bound(DetectionModel("yolov8n.yaml", nc=3, verbose=False))
    assert needs_bound(SimpleNamespace(format="openvino"))  # an export: no modules to look at


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> YOLO:
    """tood-n as built (seed 0), 80 classes: every (anchor, class) score passes conf=0.001 (checked in the test)."""
    torch.manual_seed(0)
    return YOLO(str(ROOT / "cfg" / "tood-n.yaml"))


def test_nms_gets_at_most_k_candidates_in_val_and_predict(untrained, shared_data, nms_inputs):
    coco8 = shared_data("coco8")
    data = coco8 / "data.yaml"
    with torch.no_grad():
        scores = untrained.model.eval()(torch.rand(1, 3, 256, 256))[0][:, 4:]
    assert scores.shape[-1] > MAX_NMS and (scores > 0.001).all()  # 1,364 anchors x 80 classes, all candidates
    untrained.val(data=str(data), imgsz=256, batch=4, conf=0.001, plots=False, verbose=False)
    n_images = len(list((coco8 / "images" / "val").glob("*")))
    assert nms_inputs == [MAX_NMS] * n_images  # unbounded: 30,000 each (Ultralytics' cap of 109,120 pairs)
    nms_inputs.clear()
    images = sorted((coco8 / "images" / "val").glob("*"))[:2]
    untrained.predict([str(p) for p in images], imgsz=256, conf=0.001, verbose=False)
    assert nms_inputs == [MAX_NMS] * 2  # best class: one candidate per anchor, 1,364 unbounded


TINY_YAML = """# a tiny TOOD model: Ultralytics convs, the T-head on P3-P5 (stride 32), 2 inter convs, 32 channels
nc: 1
backbone:
  - [-1, 1, Conv, [16, 3, 2]] # 0-P1/2
  - [-1, 1, Conv, [32, 3, 2]] # 1-P2/4
  - [-1, 1, Conv, [32, 3, 2]] # 2-P3/8
  - [-1, 1, Conv, [64, 3, 2]] # 3-P4/16
  - [-1, 1, Conv, [64, 3, 2]] # 4-P5/32
head:
  - [[2, 3, 4], 1, TOODHead, [nc, 32, 2, 0, anchor_free, 0.0, 8]]
"""


@pytest.fixture(scope="module")
def rectangles(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny TOOD model trained by Ultralytics' trainer (10 epochs, ~1 min on 2 shared cores) to find the orange
    rectangle of test_deploy's scenes (32 train, 16 val), and the set: (checkpoint, data.yaml). Its val mAP50 is ~1."""
    tmp = tmp_path_factory.mktemp("rectangles")
    for split, seeds in (("train", range(32)), ("val", range(500, 516))):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        for i in seeds:
            im, (x1, y1, x2, y2) = scene(i)
            h, w = im.shape[:2]
            cv2.imwrite(str(tmp / "images" / split / f"{i}.png"), im)
            (tmp / "labels" / split / f"{i}.txt").write_text(
                f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
            )
    data = tmp / "data.yaml"
    data.write_text(f"path: {tmp}\ntrain: images/train\nval: images/val\nnames: {{0: rectangle}}\n")
    (tmp / "tiny.yaml").write_text(TINY_YAML)
    YOLO(str(tmp / "tiny.yaml")).train(
        data=str(data), epochs=10, imgsz=IMGSZ, batch=8, nbs=8, optimizer="AdamW", lr0=0.01, warmup_epochs=1,
        initial_epoch=1, val=False, plots=False, device="cpu", workers=0, amp=False, seed=0, deterministic=True,
        project=str(tmp), name="run", verbose=False,
    )
    return tmp / "run" / "weights" / "last.pt", data


@pytest.mark.slow
def test_validation_metrics_equal_the_unbounded_path(rectangles, nms_inputs):
    """A bound that cuts on every image (100 candidates of the 420 anchors at 128, max_det 100 as the reference's
    max_per_img) gives the mAPs of Ultralytics' cap of 30,000."""
    ckpt, data = rectangles
    args = {"data": str(data), "imgsz": IMGSZ, "batch": 8, "max_det": 100, "plots": False, "verbose": False}
    unbounded = type("Unbounded", (TOODDetectionValidator,), {"max_nms": ULTRALYTICS_MAX_NMS})
    ref = YOLO(str(ckpt)).val(validator=unbounded, **args)
    assert len(nms_inputs) == 16 and min(nms_inputs) > 100  # more candidates than the bound on every image
    nms_inputs.clear()
    got = YOLO(str(ckpt)).val(validator=type("Bounded", (TOODDetectionValidator,), {"max_nms": 100}), **args)
    assert nms_inputs == [100] * 16
    assert ref.box.map50 > 0.9  # a real detector: the comparison means something
    assert abs(got.box.map - ref.box.map) <= 0.002 and abs(got.box.map50 - ref.box.map50) <= 0.002


@pytest.fixture(scope="module")
def int8_export(rectangles) -> Path:
    """The tiny trained model's int8 OpenVINO export (nncf, calibrated on the 16 val scenes): its folder."""
    pytest.importorskip("openvino", reason="openvino is not installed (the 'export' extra of pyproject.toml)")
    pytest.importorskip("nncf", reason="nncf is not installed (the 'export' extra of pyproject.toml): no int8 export")
    ckpt, data = rectangles
    f = YOLO(str(ckpt)).export(format="openvino", int8=True, data=str(data), imgsz=IMGSZ, batch=1)
    assert "int8" in Path(f).name
    return Path(f)


def quantised_ops_before_outputs(xml: Path, head: str) -> tuple[list[str], collections.Counter]:
    """Walk an OpenVINO IR back from its outputs to the T-head's last convs (its predictors: `tood_cls`, `tood_reg`
    and the last convs of M and O, which Ultralytics quantises as it does `Detect`'s last convs): the FakeQuantize
    ops met on the way (int8 tensors that feed the final score and box operations) and the op types walked through.

    Args:
        xml (Path): The IR.
        head (str): The head's scope in op names, "__module.model.<index of the head>".
    """
    import openvino as ov

    predictors = tuple(f"{head}.{name}" for name in ("tood_cls", "tood_reg", "cls_prob_module", "reg_offset_module"))
    stack = [op for op in ov.Core().read_model(str(xml)).get_ordered_ops() if op.get_type_name() == "Result"]
    seen, quantised, walked = set(), [], collections.Counter()
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()
        # ShapeOf reads only a shape, which quantisation leaves as it is: not a path for int8 values
        if name in seen or op.get_type_name() in ("Constant", "Parameter", "ShapeOf") or name.startswith(predictors):
            continue
        seen.add(name)
        walked[op.get_type_name()] += 1
        if op.get_type_name() == "FakeQuantize":
            quantised.append(name)
        stack.extend(i.get_source_output().get_node() for i in op.inputs())
    return quantised, walked


@pytest.mark.slow
def test_int8_openvino_keeps_the_t_heads_final_operations_float(int8_export):
    """As Ultralytics does for `Detect` (nncf's ignored scope in its OpenVINO export: `TOODHead` is a `Detect`), no
    int8 tensor reaches the aligned score sqrt(P * M), the DFL expectation, O's box sampling or the box decoding:
    every op between the head's last convs and the outputs runs in float in the quantised IR."""
    quantised, walked = quantised_ops_before_outputs(next(int8_export.glob("*.xml")), "__module.model.5")
    assert walked["Sigmoid"] and walked["Sqrt"] and walked["GridSample"]  # the walk met the score and box ops
    assert not quantised, f"int8 tensors feed the T-head's final operations: {quantised}"


@pytest.mark.slow
def test_int8_openvino_keeps_the_shipped_heads_final_operations_float(rectangles, tmp_path, monkeypatch):
    """The same for the shipped head (DFL distances sampled by O, the depthwise class predictor), untrained."""
    pytest.importorskip("nncf", reason="nncf is not installed (the 'export' extra of pyproject.toml): no int8 export")
    _, data = rectangles
    monkeypatch.chdir(tmp_path)  # Ultralytics' exporter writes a YAML-built model's export into the working directory
    model = YOLO(str(ROOT / "cfg" / "yolo11n-tood-bn.yaml"))
    f = Path(model.export(format="openvino", int8=True, data=str(data), imgsz=IMGSZ, batch=1))
    head = f"__module.model.{len(model.model.model) - 1}"
    quantised, walked = quantised_ops_before_outputs(next(f.glob("*.xml")), head)
    assert walked["Sigmoid"] and walked["Sqrt"] and walked["GridSample"] and walked["Softmax"]  # + DFL's softmax
    assert not quantised, f"int8 tensors feed the T-head's final operations: {quantised}"


@pytest.mark.slow
def test_openvino_int8_predicts_the_fp32_boxes(rectangles, int8_export):
    """int8 OpenVINO (nncf post-training quantisation, calibrated on the 16 val scenes) predicts PyTorch fp32's best
    box on each scene within 1 px and its score within 0.03.

    Tolerance: nncf quantises the T-head's convs (their inputs and weights) and keeps its final operations in float
    (previous test), as Ultralytics does for `Detect`. An activation in [0, 1] moves by 1/255 = 0.004 a step, so 0.03 is
    ~8 steps gathered through the ~20 quantised layers; 1 px is two int8 steps of a P3 input that spans ~16 strides.
    Runner-up boxes near the conf threshold may come and go (NMS between near-equal scores), so only each scene's best
    detection is compared.
    """
    ckpt, data = rectangles
    f = int8_export
    fp32, int8 = YOLO(str(ckpt)), YOLO(f, task="detect")
    for path in sorted((data.parent / "images" / "val").glob("*.png")):
        x, y, w, h = np.loadtxt(data.parent / "labels" / "val" / f"{path.stem}.txt")[1:]
        a = fp32.predict(str(path), imgsz=IMGSZ, conf=0.1, verbose=False)[0]
        b = int8.predict(str(path), imgsz=IMGSZ, conf=0.1, verbose=False)[0]
        gt = np.array([x - w / 2, y - h / 2, x + w / 2, y + h / 2]) * np.tile(a.orig_shape[::-1], 2)
        assert len(a.boxes) and iou(a.boxes.xyxy[:1].numpy(), gt)[0] > 0.7  # fp32 finds it: the check means something
        assert len(b.boxes), f"{path.name}: int8 finds nothing"
        box_err = np.abs(b.boxes.xyxy[0].numpy() - a.boxes.xyxy[0].numpy()).max()
        conf_err = abs(float(b.boxes.conf[0]) - float(a.boxes.conf[0]))
        assert box_err < 1.0 and conf_err < 0.03 and b.boxes.cls[0] == a.boxes.cls[0], (path.name, box_err, conf_err)
