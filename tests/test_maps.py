"""See the alignment: TOOD's score maps, offsets and layer attention (tood_yolo.tools.maps); COCO's AP table (.coco)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.data.converter import coco80_to_coco91_class
from ultralytics.utils import ASSETS

from tood_yolo.engine import validator as validation
from tood_yolo.utils import coco as coco_json
from tood_yolo.tools import coco, maps
from tood_yolo.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 256
BUS = ASSETS / "bus.jpg"  # 810 x 1080


@pytest.fixture(scope="module")
def tood() -> YOLO:
    """An untrained tood-n with its alignment branches nudged off their near-constant initialisation."""
    torch.manual_seed(0)
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    head = model.model.model[-1]
    with torch.no_grad():
        for m in (head.tood_cls, head.cls_prob_module[-1], head.reg_offset_module[-1]):
            m.weight.add_(torch.randn_like(m.weight) * 0.3)
        head.reg_offset_module[-1].bias.add_(torch.randn(8))  # offsets of about a grid cell
    return model


@pytest.fixture(scope="module")
def bus_maps(tood) -> maps.AlignmentMaps:
    return maps.compute_alignment_maps(tood, BUS, imgsz=IMGSZ, topk=5)


def test_maps_values_and_shapes(tood, bus_maps):
    m = bus_maps
    letterboxed = maps.letterbox(cv2.imread(str(BUS)), IMGSZ, 128)
    assert m.image.shape == letterboxed.shape == (256, 256, 3)  # rect letterbox as `yolo predict`: 256x192 -> 256x256
    assert (m.image == letterboxed).all() and m.orig_shape == (1080, 810)
    assert [lv.name for lv in m.levels] == ["P3", "P4", "P5", "P6", "P7"]
    for lv in m.levels:
        assert lv.p_map.shape == lv.m_map.shape == lv.aligned.shape == (256 // lv.stride, 256 // lv.stride)
        assert lv.offset.shape == (8, *lv.aligned.shape) and lv.cls_attn.shape == lv.reg_attn.shape == (6,)
        for a in (lv.p_map, lv.m_map, lv.aligned, lv.cls_attn, lv.reg_attn):
            assert a.min() >= 0 and a.max() <= 1
        np.testing.assert_allclose(lv.aligned, np.sqrt(lv.p_map * lv.m_map), rtol=1e-6, atol=1e-7)
    assert np.ptp(m.levels[0].aligned) > 0.01  # the nudged model's maps are not flat

    # The head's own output (scores = aligned per class, anchors level by level) agrees: max over classes
    dm = tood.model.eval()
    x = torch.from_numpy(m.image[..., ::-1].transpose(2, 0, 1).copy()).float().div(255)[None]
    with torch.no_grad():
        scores = dm(x)[0][0, 4:]
    np.testing.assert_allclose(np.concatenate([lv.aligned.ravel() for lv in m.levels]), scores.amax(0).numpy(),
                               rtol=1e-4, atol=1e-6)

    # top-k: best aligned scores over all levels, in order, and only above conf
    all_scores = np.sort(np.concatenate([lv.aligned.ravel() for lv in m.levels]))[::-1]
    assert [t["score"] for t in m.top] == pytest.approx(all_scores[:5].tolist())
    assert maps.top_locations(m, 5, conf=1.0) == [] and maps.top_locations(m, 0) == []
    t = m.top[0]
    lv = next(lv for lv in m.levels if lv.name == t["level"])
    assert t["anchor"] == (t["j"] * lv.stride, t["i"] * lv.stride)  # TOOD anchors at (j, i) * stride
    dy_x1, dx_x1 = lv.offset[0, t["i"], t["j"]], lv.offset[1, t["i"], t["j"]]
    assert t["tips"][0] == pytest.approx(((t["j"] + dx_x1) * lv.stride, (t["i"] + dy_x1) * lv.stride))

    # one class instead of the max: P of class "top" is the class of the best location
    one = maps.compute_alignment_maps(tood, BUS, imgsz=IMGSZ, topk=1, cls="top")
    assert one.cls == m.top[0]["cls"]
    assert all((lv.cls_index == one.cls).all() and (lv.p_map <= mx.p_map + 1e-7).all()
               for lv, mx in zip(one.levels, m.levels))


def test_saved_maps_and_page(tood, bus_maps, tmp_path):
    page = maps.save_alignment_maps(tood, BUS, tmp_path / "bus", topk=5, maps=bus_maps)
    assert page == tmp_path / "bus" / "index.html"
    html = page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 5 * 3 + 4 and all(not Path(s).is_absolute() and (page.parent / s).is_file() for s in srcs)
    for lv in bus_maps.levels:
        for key in maps.MAP_KEYS:
            img = cv2.imread(str(page.parent / f"{lv.name.lower()}_{key}.png"))
            assert img.shape == bus_maps.image.shape
    assert cv2.imread(str(page.parent / "offsets.png")).shape == bus_maps.image.shape
    assert cv2.imread(str(page.parent / "attention.png")) is not None
    saved = np.load(page.parent / "maps.npz")
    np.testing.assert_array_equal(saved["P4_aligned"], bus_maps.levels[1].aligned)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        maps.heatmap_overlay(bus_maps.image, np.full((2, 2), 1.5))


def test_arrows_only_where_requested(bus_maps):
    img = bus_maps.image
    assert (maps.draw_offsets(img, []) == img).all()
    for t in bus_maps.top[:2]:
        out = maps.draw_offsets(img, [t])
        changed = np.argwhere((out != img).any(2))  # (y, x)
        assert len(changed)
        pts = np.array([t["anchor"], *t["tips"], t["box"][:2], t["box"][2:]])
        lo, hi = pts.min(0) - 4, pts.max(0) + 4
        assert (changed[:, 1] >= lo[0]).all() and (changed[:, 1] <= hi[0]).all()
        assert (changed[:, 0] >= lo[1]).all() and (changed[:, 0] <= hi[1]).all()
        assert any(np.hypot(*(np.array(p) - t["anchor"])) >= 2 for p in t["tips"])  # arrows with a length
    t = bus_maps.top[0]
    longer = maps.draw_offsets(img, [t], boxes=False, arrow_scale=3)
    changed = np.argwhere((longer != img).any(2))
    tips = np.array(t["anchor"]) + 3 * (np.array(t["tips"]) - np.array(t["anchor"]))
    far = np.abs(changed[:, ::-1] - np.array(t["anchor"])).max()
    assert np.abs(tips - t["anchor"]).max() - 2 <= far <= np.abs(tips - t["anchor"]).max() + 4


def test_plain_ultralytics_model_gets_a_clear_error(tmp_path):
    yolo = YOLO("yolov8n.yaml")
    with pytest.raises(maps.NotTOODError, match=r"TOODHead.*Detect.*python -m tood_yolo\.tools\.analysis"):
        maps.save_alignment_maps(yolo, BUS, tmp_path)
    with pytest.raises(maps.NotTOODError, match="TOODHead"):
        maps.add_alignment_map_callback(yolo, BUS)
    with pytest.raises(maps.NotTOODError, match="tood_yolo.tools.analysis"):
        maps.main(["model=yolov8n.yaml", f"source={BUS}", f"project={tmp_path}"])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli(tmp_path):
    page = maps.main(["model=cfg/tood-n.yaml", f"source={BUS}", "imgsz=128", "topk=3", "cls=top",
                      f"project={tmp_path}", "name=bus"])
    assert page == tmp_path / "bus" / "index.html" and (tmp_path / "bus" / "p7_aligned.png").is_file()
    with pytest.raises(SyntaxError, match="topk"):
        maps.main(["model=cfg/tood-n.yaml", f"source={BUS}", "top_k=3"])


class FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images.append((tag, img.shape, step, dataformats))

    def flush(self):
        pass


@pytest.mark.slow
def test_callback_writes_into_the_run_during_training(tmp_path, monkeypatch):
    from ultralytics.utils.callbacks import tensorboard as tb

    data = make_synthetic_dataset(tmp_path / "syn", n_train=8, n_val=4, imgsz=128)
    image = sorted((data.parent / "images" / "val").glob("*.jpg"))[0]
    writer = FakeWriter()
    monkeypatch.setattr(maps.callback, "_tensorboard_enabled", lambda: True)
    monkeypatch.setattr(tb, "WRITER", writer, raising=False)  # as Ultralytics' TensorBoard callback keeps it
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    maps.add_alignment_map_callback(model, image, every=1, topk=3)
    model.train(data=str(data), imgsz=128, epochs=1, batch=4, workers=0, device="cpu", plots=False, amp=False,
                project=str(tmp_path), name="run", exist_ok=True)
    run = tmp_path / "run" / "alignment_maps"
    assert sorted(p.name for p in run.iterdir()) == ["epoch_1"]  # the final validation of best.pt adds none
    assert (run / "epoch_1" / "index.html").is_file()
    assert cv2.imread(str(run / "epoch_1" / "p3_aligned.png")).shape == (128, 128, 3)
    assert {(tag, step) for tag, _, step, _ in writer.images} == {
        ("alignment/montage", 1), ("alignment/offsets", 1), ("alignment/attention", 1)}


# --------------------------------------------------------------------------------------------------------- COCO
def coco8_instances(root: Path) -> dict:
    """COCO instances json of coco8's val split: 91-class ids, image id = int(stem), boxes in pixels."""
    ids = coco80_to_coco91_class()
    images, annotations = [], []
    for f in sorted((root / "images" / "val").glob("*.jpg")):
        h, w = cv2.imread(str(f)).shape[:2]
        images.append({"id": int(f.stem), "file_name": f.name, "width": w, "height": h})
        for line in (root / "labels" / "val" / f"{f.stem}.txt").read_text().split("\n"):
            if line.strip():
                c, cx, cy, bw, bh = map(float, line.split())
                box = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
                annotations.append({"id": len(annotations) + 1, "image_id": int(f.stem), "category_id": ids[int(c)],
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in ids]}


@pytest.fixture(scope="module")
def coco8(shared_data) -> tuple[Path, Path]:
    root = shared_data("coco8")
    ann = root / "instances_val.json"
    ann.write_text(json.dumps(coco8_instances(root)))
    return root, ann


def test_coco_perfect_predictions_give_ap_1(coco8, tmp_path, capsys):
    root, ann = coco8
    gt = json.loads(ann.read_text())
    assert len(gt["annotations"]) == 17
    c91 = coco80_to_coco91_class()
    stems = {img["id"]: img["file_name"] for img in gt["images"]}
    # as `yolo val save_json=True` writes them on a non-COCO-val2017 set: class index + 1, image id = int(stem)
    perfect = [{"image_id": a["image_id"], "file_name": stems[a["image_id"]],
                "category_id": c91.index(a["category_id"]) + 1, "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    pred = tmp_path / "predictions.json"
    pred.write_text(json.dumps(perfect))
    stats = coco.main([f"predictions={pred}", f"annotations={ann}"])  # classmap=auto finds class index + 1
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 1.0
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in perfect]  # IoU 1/3
    assert coco_json.coco_eval(coco.match_predictions(shifted, gt)[0], gt, print_fn=None)["AP"] == 0.0
    assert coco_json.coco_eval([], gt, print_fn=None)["AP"] == 0.0


@pytest.mark.slow
def test_coco_table_from_yolo_val(coco8, tmp_path, monkeypatch, capsys):
    root, ann = coco8
    calls = []

    def spy(*args, **kwargs):
        calls.append(coco_eval(*args, **{**kwargs, "print_fn": calls.append}))
        return calls[-1]

    coco_eval = validation.coco_eval
    monkeypatch.setattr(validation, "coco_eval", spy)
    model = YOLO(str(ROOT / "cfg/tood-n.yaml"))
    args = {"model": "tood-n", "data": str(root / "data.yaml"), "imgsz": 128, "batch": 4, "device": "cpu",
            "save_json": True, "plots": False, "rect": True, "mode": "val", "task": "detect"}
    validator = validation.TOODDetectionValidator(save_dir=tmp_path / "val", args=args)
    stats = validator(model=model.model)
    table, result = calls
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in table
    assert set(result) == set(coco_json.COCO_STATS) and 0 <= result["AP"] < 0.05  # untrained
    assert stats["metrics/mAP_small(B)"] == result["APs"]
    # the predictions.json it saved, scored against the 91-id instances json by the command line
    monkeypatch.undo()
    stats = coco.main([f"predictions={tmp_path / 'val' / 'predictions.json'}", f"annotations={ann}", "classmap=index"])
    assert 0 <= stats["AP"] < 0.05
    assert "Average Recall" in capsys.readouterr().out
