"""Tests of the synthetic shapes dataset: files, labels, geometry, statistics, reuse and Ultralytics' loader."""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tood_yolo.data import synthetic
from tood_yolo.data.synthetic import (
    CLASS_NAMES,
    MANIFEST,
    MAX_OBJECTS,
    MIN_CONTRAST,
    MIN_VISIBLE,
    Scene,
    Shape,
    label_lines,
    make_scene,
    make_synthetic_dataset,
    visible_fractions,
)

IMGSZ = 320
N_TRAIN, N_VAL = 256, 64  # the defaults: statistics below are about the dataset train.py really uses
OLD = 1_000_000_000  # an mtime in 2001, to see whether a file was rewritten without relying on clock resolution


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    """Return each label file's rows as an (N, 5) float array, keyed by file stem."""
    return {p.stem: np.loadtxt(p, ndmin=2) for p in sorted(folder.glob("*.txt"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A dataset with the default parameters, made once for the module."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture(scope="module")
def train_labels(dataset: Path) -> list[np.ndarray]:
    """The rows of every train label file."""
    return list(read_labels(dataset.parent / "labels" / "train").values())


def test_structure_and_counts(dataset: Path) -> None:
    root = dataset.parent
    assert dataset.name == "data.yaml" and root.is_absolute()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        images = sorted(p.stem for p in (root / "images" / split).iterdir())
        labels = sorted(p.stem for p in (root / "labels" / split).iterdir())
        assert len(images) == n and images == labels
        assert cv2.imread(str(root / "images" / split / f"{images[0]}.jpg")).shape == (IMGSZ, IMGSZ, 3)
    text = dataset.read_text()
    assert f"path: {json.dumps(str(root))}\n" in text
    assert "train: images/train\n" in text and "val: images/val\n" in text
    for i, name in enumerate(CLASS_NAMES):
        assert f"  {i}: {name}\n" in text


def test_label_rows_are_valid(dataset: Path) -> None:
    for split in ("train", "val"):
        for path in (dataset.parent / "labels" / split).glob("*.txt"):
            lines = path.read_text().splitlines()
            assert 1 <= len(lines) <= MAX_OBJECTS
            for line in lines:
                fields = line.split()
                assert len(fields) == 5, line
                assert fields[0].isdigit() and int(fields[0]) < len(CLASS_NAMES)
                cx, cy, w, h = map(float, fields[1:])
                assert w > 0 and h > 0
                assert 0 <= cx - w / 2 - 1e-6 and cx + w / 2 <= 1 + 1e-6
                assert 0 <= cy - h / 2 - 1e-6 and cy + h / 2 <= 1 + 1e-6


def test_statistics_of_default_dataset(train_labels: list[np.ndarray]) -> None:
    rows = np.concatenate(train_labels)
    counts = np.array([len(r) for r in train_labels])
    assert counts.min() >= 1 and counts.max() == MAX_OBJECTS and 3 < counts.mean() < 6
    assert np.bincount(rows[:, 0].astype(int)).min() > 0.1 * len(rows)  # every class is well represented
    side = rows[:, 3:5].max(1) * IMGSZ
    assert side.min() < 16 and side.max() > 0.4 * IMGSZ
    assert 0.08 < (side < 20).mean() < 0.3 and 0.08 < (side > 96).mean() < 0.3


def boxes_intersect(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (cx, cy, w, h) boxes overlap."""
    return abs(a[0] - b[0]) < (a[2] + b[2]) / 2 and abs(a[1] - b[1]) < (a[3] + b[3]) / 2


def test_overlapping_pairs_present(train_labels: list[np.ndarray]) -> None:
    overlapping = sum(
        any(boxes_intersect(r[i, 1:], r[j, 1:]) for i in range(len(r)) for j in range(i + 1, len(r)))
        for r in train_labels
    )
    assert 0.15 < overlapping / len(train_labels) < 0.8


def test_occluded_objects_stay_mostly_visible() -> None:
    fractions = [f for i in range(60) for f in visible_fractions(make_scene(0, "train", i, IMGSZ).shapes)]
    assert MIN_VISIBLE >= 0.4  # the promise: no labelled object is more than 60 % hidden
    assert min(fractions) >= MIN_VISIBLE
    assert sum(f < 0.95 for f in fractions) > 10  # real occlusion happens, not just touching boxes


def test_dense_overlap_still_keeps_objects_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "OVERLAP_P", 1.0)  # every object after the first is aimed at an earlier one
    fractions = [f for i in range(40) for f in visible_fractions(make_scene(0, "train", i, IMGSZ).shapes)]
    assert min(fractions) >= MIN_VISIBLE and sum(f < 0.95 for f in fractions) > 40


def test_objects_stand_out_from_their_background() -> None:
    for i in range(40):
        scene = make_scene(1, "val", i, IMGSZ)
        for shape in scene.shapes:
            x1, y1, x2, y2 = (int(v) for v in shape.box())
            under = scene.background[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).mean(0)
            assert np.linalg.norm(np.asarray(shape.color) - under) >= MIN_CONTRAST


def test_visible_fractions_of_a_known_overlap() -> None:
    square = Shape(1, 100, 100, 40 * math.sqrt(2), param=1.0)  # axis-aligned 40 x 40 square
    right_half = Shape(1, 120, 100, 40 * math.sqrt(2), param=1.0)  # a second square over its right half
    assert visible_fractions([square, right_half]) == pytest.approx([0.5, 1.0], abs=0.03)
    assert visible_fractions([right_half, square])[1] == 1.0  # what is drawn last is never hidden


def test_saved_files_are_the_rendered_scenes(dataset: Path) -> None:
    root = dataset.parent
    for split, i in (("train", 0), ("train", 17), ("val", 5)):
        scene = make_scene(0, split, i, IMGSZ)
        stem = f"{i:06d}"
        assert (root / "labels" / split / f"{stem}.txt").read_text().splitlines() == label_lines(scene.shapes, IMGSZ)
        saved = cv2.imread(str(root / "images" / split / f"{stem}.jpg"))
        # JPEG drops much of the pixel noise, so compare smoothed images
        smooth = [cv2.GaussianBlur(im, (5, 5), 0).astype(np.float32) for im in (saved, scene.render())]
        assert np.abs(smooth[0] - smooth[1]).mean() < 2


@pytest.mark.parametrize("index", range(8))
def test_each_box_holds_exactly_its_shape(index: int) -> None:
    scene = make_scene(3, "train", index, IMGSZ)
    image = scene.render()
    visible = visible_fractions(scene.shapes)
    rows = np.array([line.split() for line in label_lines(scene.shapes, IMGSZ)], float)
    for i, (shape, row) in enumerate(zip(scene.shapes, rows)):
        changed = (image != scene.render(without=i)).any(2)
        cx, cy, w, h = row[1:] * IMGSZ
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        # pixel j spans [j, j+1): nothing changes outside the pixels the box touches
        inside = np.zeros_like(changed)
        inside[math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)] = True
        assert not changed[~inside].any(), f"shape {i} leaks outside its box"
        ys, xs = np.nonzero(changed)
        assert len(xs) > 0.1 * w * h * visible[i]
        if visible[i] == 1.0:  # an unhidden shape fills its box: the box is tight to within a pixel
            assert xs.min() <= x1 + 1 and xs.max() + 1 >= x2 - 1
            assert ys.min() <= y1 + 1 and ys.max() + 1 >= y2 - 1


def test_single_shape_box_matches_render() -> None:
    background = np.full((IMGSZ, IMGSZ, 3), 40, np.uint8)
    for cls in range(len(CLASS_NAMES)):
        shape = Shape(cls, 150.3, 170.7, 61.0, angle=0.4, param=0.6, color=(230, 200, 10))
        changed = np.nonzero((Scene(background, [shape]).render() != background).any(2))
        x1, y1, x2, y2 = shape.box()
        assert changed[1].min() == math.floor(x1) and changed[1].max() + 1 == math.ceil(x2), CLASS_NAMES[cls]
        assert changed[0].min() == math.floor(y1) and changed[0].max() + 1 == math.ceil(y2), CLASS_NAMES[cls]


def test_shapes_differ_by_class() -> None:
    """Same position, size and colour: the classes must still render differently (a ring has a hole, and so on)."""
    background = np.zeros((IMGSZ, IMGSZ, 3), np.uint8)
    masks = [Scene(background, [Shape(c, 160, 160, 100, param=0.6)]).render()[..., 0] > 127 for c in range(5)]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            assert (masks[a] != masks[b]).mean() > 0.01, (CLASS_NAMES[a], CLASS_NAMES[b])
    assert not masks[3][160, 160] and masks[0][160, 160]  # the ring's hole


def test_determinism(tmp_path: Path) -> None:
    kwargs = {"n_train": 6, "n_val": 3}
    a, b = (make_synthetic_dataset(tmp_path / name, seed=5, **kwargs).parent for name in ("a", "b"))
    c = make_synthetic_dataset(tmp_path / "c", seed=6, **kwargs).parent
    for split in ("train", "val"):
        for path in (a / "labels" / split).iterdir():
            assert path.read_bytes() == (b / "labels" / split / path.name).read_bytes()
        for path in (a / "images" / split).iterdir():
            assert path.read_bytes() == (b / "images" / split / path.name).read_bytes()
    texts = [(root / "labels" / "train" / "000000.txt").read_text() for root in (a, c)]
    assert texts[0] != texts[1]
    # each image has its own random stream: a bigger dataset starts with the same images
    bigger = make_synthetic_dataset(tmp_path / "d", seed=5, n_train=8, n_val=3).parent
    last = Path("labels", "train", "000005.txt")
    assert (bigger / last).read_bytes() == (a / last).read_bytes()


def age_all(root: Path) -> None:
    """Give every file an old mtime."""
    for path in root.rglob("*"):
        os.utime(path, (OLD, OLD))


def test_reuse_and_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    yaml_path = make_synthetic_dataset(root, n_train=4, n_val=2)
    label = root / "labels" / "train" / "000000.txt"
    age_all(root)
    assert make_synthetic_dataset(root, n_train=4, n_val=2) == yaml_path
    assert all(p.stat().st_mtime == OLD for p in root.rglob("*") if p.is_file())  # nothing rewritten

    (root / "labels" / "train.cache").write_text("stale")  # Ultralytics writes these beside the labels
    make_synthetic_dataset(root, n_train=4, n_val=2, overwrite=True)
    assert label.stat().st_mtime != OLD and yaml_path.stat().st_mtime != OLD
    assert not (root / "labels" / "train.cache").exists()

    make_synthetic_dataset(root, n_train=3, n_val=2)  # other parameters: regenerated, old files gone
    assert len(list((root / "labels" / "train").iterdir())) == 3
    assert json.loads((root / MANIFEST).read_text())["params"]["n_train"] == 3


def test_incomplete_dataset_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_synthetic_dataset(root, n_train=4, n_val=2)
    (root / "images" / "val" / "000001.jpg").unlink()  # e.g. an interrupted copy
    age_all(root)
    make_synthetic_dataset(root, n_train=4, n_val=2)
    assert (root / "images" / "val" / "000001.jpg").exists()
    assert (root / "labels" / "train" / "000000.txt").stat().st_mtime != OLD


def test_moved_dataset_gets_its_path_fixed(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "old", n_train=2, n_val=1)
    (tmp_path / "old").rename(tmp_path / "new")
    yaml_path = make_synthetic_dataset(tmp_path / "new", n_train=2, n_val=1)
    assert f"path: {json.dumps(str(tmp_path / 'new'))}" in yaml_path.read_text()


def test_foreign_dataset_is_not_clobbered(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "mine.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path, n_train=2, n_val=1)
    assert (tmp_path / "labels" / "mine.txt").exists()
    make_synthetic_dataset(tmp_path, n_train=2, n_val=1, overwrite=True)
    assert (tmp_path / MANIFEST).exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, imgsz=32)


def test_other_image_size(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_train=3, n_val=1, imgsz=160).parent
    assert cv2.imread(str(root / "images" / "train" / "000000.jpg")).shape == (160, 160, 3)


def test_ultralytics_reads_every_label(dataset: Path) -> None:
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(dataset))
    assert data["nc"] == len(CLASS_NAMES) and data["names"] == dict(enumerate(CLASS_NAMES))
    cfg = get_cfg(overrides={"imgsz": IMGSZ, "task": "detect"})
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        ds = build_yolo_dataset(cfg, data[split], batch=8, data=data, mode="val")
        assert len(ds) == n and len(ds.labels) == n
        ours = read_labels(dataset.parent / "labels" / split)
        assert sum(len(lb["cls"]) for lb in ds.labels) == sum(len(r) for r in ours.values())
        for lb in ds.labels:
            rows = ours[Path(lb["im_file"]).stem]
            np.testing.assert_allclose(lb["bboxes"], rows[:, 1:], atol=1e-6)
            np.testing.assert_array_equal(lb["cls"][:, 0], rows[:, 0])
        item = ds[0]
        assert item["img"].shape[1:] == (IMGSZ, IMGSZ) and len(item["bboxes"]) == len(ds.labels[0]["cls"])


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # run the file as `python -m` would (its __main__ guard included) but in-process: a fresh interpreter would spend
    # seconds importing the package's torch-based modules
    argv = ["synthetic.py", str(tmp_path / "cli"), "n_train=3", "n_val=2", "seed=1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(synthetic.__file__, run_name="__main__")
    yaml_path = Path(capsys.readouterr().out.strip())
    assert yaml_path == tmp_path / "cli" / "data.yaml" and yaml_path.exists()
    assert len(list((tmp_path / "cli" / "images" / "train").iterdir())) == 3
    assert json.loads((tmp_path / "cli" / MANIFEST).read_text())["params"]["seed"] == 1
    with pytest.raises(SystemExit, match="unknown argument"):
        synthetic.main(["bogus=1"])
