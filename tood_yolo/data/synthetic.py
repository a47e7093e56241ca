"""A synthetic shapes detection dataset that `python train.py` can learn in minutes on a CPU, with no download.

Each image shows 1-8 shapes from five classes (circle, rectangle, triangle, ring, cross) in random colours and
rotations, with boxes from about 12 px to 45 % of the image (log-uniform), on a textured, noisy background with
distractor clutter (lines, scribbles, arcs, thin ellipses) that is never labelled. A quarter of the objects after the
first are aimed at an earlier one, so partial occlusion is common: the later shape is drawn on top.

Label boxes are *amodal*: the full geometric extent of each shape, computed from its polygon and clipped to the
image, whether or not part of it is hidden. That keeps every box exact and independent of the rasteriser; to keep it
fair, a shape is only created if at least `MIN_VISIBLE` of its area stays visible under the shapes drawn after it.

Rendering is exact coverage anti-aliasing (4x supersampled inside each shape's box), so a shape changes no pixel
outside its label box. Every image comes from its own generator seeded by (seed, split, index), so datasets are
reproducible and a larger one starts with the images of a smaller one.

Two layouts (`LAYOUTS`): `shapes`, the main job's set described above, and `large`, 1-3 objects of 35-100 % of the
image (boxes ~25-90 % of its side) labelled as one class, "shape": the regime of the held-out set on which the T-head
was found weak (one class of large objects, issue 28); its images come from streams of their own. An optional `test` split (`n_test`) holds images no training or choice sees.

Usage:
    python -m tood_yolo.data.synthetic [root] [n_train=256] [n_val=64] [n_test=0] [imgsz=320] [seed=0]
                                       [layout=shapes|large] [overwrite=False]
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle", "ring", "cross")
DEFAULT_ROOT = Path("datasets/synthetic")
MANIFEST = "synthetic.json"
GENERATOR_VERSION = 1  # bump whenever the output changes, so datasets made by older code are regenerated
SPLITS = ("train", "val", "test")  # the index of a split seeds its images: new splits go at the end


@dataclass(frozen=True)
class Layout:
    """How many objects an image holds (1 to `max_objects`), how large they are (`size_range`: the circumscribed
    diameter as a fraction of imgsz, drawn log-uniform) and whether the labels name the shape (`CLASS_NAMES`) or one
    class for all (`one_class`)."""

    max_objects: int
    size_range: tuple[float, float]
    one_class: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """The class names its labels use."""
        return ("shape",) if self.one_class else CLASS_NAMES


LAYOUTS = {
    "shapes": Layout(8, (0.045, 0.45)),  # ~14 px to ~144 px at imgsz 320: small and medium objects, often crowded
    "large": Layout(3, (0.35, 1.0), one_class=True),  # ~112 px to the whole image at 320: few, large objects
}
MAX_OBJECTS = LAYOUTS["shapes"].max_objects
OVERLAP_P = 0.25  # chance that an object after the first is aimed at an earlier one
MIN_VISIBLE = 0.5  # stricter than "drop what is more than 60 % hidden": an amodal box needs enough evidence
MIN_CONTRAST = 70.0  # RGB distance of an object colour from the background under it and from shapes it overlaps
PLACE_TRIES = 30
SUPERSAMPLE = 4
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Shape:
    """One object: its class, geometry in continuous pixel coordinates (pixel i spans [i, i+1)) and BGR colour.

    `size` is the diameter of the circle through the shape's outermost points. `param` is the class's own
    proportion: the short/long side ratio of a rectangle, the inner/outer radius of a ring, the arm half-width over
    arm half-length of a cross; circles and triangles ignore it. A shape must lie inside the image to be rendered
    (the generator only places whole shapes).
    """

    cls: int
    cx: float
    cy: float
    size: float
    angle: float = 0.0
    param: float = 0.5
    color: tuple[int, int, int] = (255, 255, 255)

    def contours(self) -> list[np.ndarray]:
        """Return the outline as float (N, 2) polygons; a second, inner polygon is the hole of a ring."""
        r = self.size / 2
        if CLASS_NAMES[self.cls] in ("circle", "ring"):
            # fixed vertex angles (no rotation) put vertices on the extreme points, so the box is exact
            t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
            unit = np.stack([np.cos(t), np.sin(t)], 1)
            outer = [unit * r]
            holes = [unit[::-1] * r * self.param] if CLASS_NAMES[self.cls] == "ring" else []
            return [p + (self.cx, self.cy) for p in outer + holes]
        if CLASS_NAMES[self.cls] == "rectangle":
            w = self.size / math.hypot(1, self.param)
            h = w * self.param
            pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        elif CLASS_NAMES[self.cls] == "triangle":
            t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
            pts = np.stack([np.cos(t), np.sin(t)], 1) * r
        else:  # cross: a plus sign whose arm corners lie on the circumscribed circle
            a = r / math.hypot(1, self.param)  # arm half-length
            b = a * self.param  # arm half-width
            pts = np.array([
                [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a],
                [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b], [-b, -a],
            ])  # fmt: skip
        c, s = math.cos(self.angle), math.sin(self.angle)
        return [pts @ np.array([[c, s], [-s, c]]) + (self.cx, self.cy)]

    def box(self) -> tuple[float, float, float, float]:
        """Return the geometric extent (x1, y1, x2, y2) in pixels; the outer polygon holds every extreme point."""
        outer = self.contours()[0]
        (x1, y1), (x2, y2) = outer.min(0), outer.max(0)
        return float(x1), float(y1), float(x2), float(y2)

    def coverage(self) -> tuple[int, int, np.ndarray]:
        """Return (x0, y0, alpha): the fraction of each pixel the shape covers, over the pixels its box touches.

        Filling a supersampled mask and averaging it down gives true area coverage, which (unlike OpenCV's LINE_AA,
        which bleeds about a pixel) never reaches a pixel that the geometry does not touch.
        """
        x1, y1, x2, y2 = self.box()
        x0, y0 = math.floor(x1), math.floor(y1)
        w, h = math.ceil(x2) - x0, math.ceil(y2) - y0
        mask = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE), np.uint8)
        # shift=4 gives 1/16 sub-pixel precision; -0.5 because OpenCV puts pixel centres on integers
        polys = [np.round(((p - (x0, y0)) * SUPERSAMPLE - 0.5) * 16).astype(np.int32) for p in self.contours()]
        cv2.fillPoly(mask, polys, 255, cv2.LINE_8, 4)
        alpha = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        return x0, y0, alpha


@dataclass
class Scene:
    """One image: a background (texture and clutter), the shapes in drawing order, and sensor noise added last."""

    background: np.ndarray  # (H, W, 3) uint8
    shapes: list[Shape] = field(default_factory=list)
    noise: np.ndarray | None = None  # (H, W, 3) float32, added after the shapes so it covers them too

    def render(self, without: int | None = None) -> np.ndarray:
        """Return the BGR uint8 image, optionally leaving out shape number `without` (to see what it changes)."""
        img = self.background.astype(np.float32)
        for i, shape in enumerate(self.shapes):
            if i != without:
                x0, y0, alpha = shape.coverage()
                roi = img[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]]
                roi += alpha[..., None] * (np.asarray(shape.color, np.float32) - roi)
        if self.noise is not None:
            img += self.noise
        return np.clip(np.round(img), 0, 255).astype(np.uint8)


def visible_fractions(shapes: list[Shape]) -> list[float]:
    """Return, for each shape, the share of its area that no later-drawn shape covers (coverage >= 0.5 counts)."""
    covs = [s.coverage() for s in shapes]
    fractions = []
    for i, (x0, y0, alpha) in enumerate(covs):
        visible = alpha >= 0.5
        area = max(int(visible.sum()), 1)
        h, w = alpha.shape
        for x0j, y0j, alphaj in covs[i + 1 :]:
            # paste the overlap of the later shape's mask into this shape's window
            ax, ay = max(x0, x0j), max(y0, y0j)
            bx, by = min(x0 + w, x0j + alphaj.shape[1]), min(y0 + h, y0j + alphaj.shape[0])
            if ax < bx and ay < by:
                visible[ay - y0 : by - y0, ax - x0 : bx - x0] &= alphaj[ay - y0j : by - y0j, ax - x0j : bx - x0j] < 0.5
        fractions.append(float(visible.sum()) / area)
    return fractions


def label_lines(shapes: list[Shape], imgsz: int, one_class: bool = False) -> list[str]:
    """Return YOLO label rows `class cx cy w h`, normalised, for boxes clipped to the image (class 0 for all shapes
    when `one_class`)."""
    lines = []
    for s in shapes:
        x1, y1, x2, y2 = np.clip(s.box(), 0, imgsz) / imgsz  # clipping guards float rounding at the border
        lines.append(f"{0 if one_class else s.cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
    return lines


def _texture(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """Return a float background: base colour, a gradient and coarse plus fine colour noise."""
    base = rng.uniform(30, 225, 3)
    ramp = np.linspace(-0.5, 0.5, imgsz, dtype=np.float32)
    gx, gy = rng.uniform(-50, 50, 2)
    img = np.empty((imgsz, imgsz, 3), np.float32)
    img[:] = base + (ramp[None, :] * gx + ramp[:, None] * gy)[..., None]
    for cells, amplitude in ((int(rng.integers(3, 8)), rng.uniform(8, 30)), (imgsz // 8, rng.uniform(3, 12))):
        coarse = rng.normal(0, amplitude, (cells, cells, 3)).astype(np.float32)
        img += cv2.resize(coarse, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)
    return img


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Return a random BGR colour as plain ints (OpenCV and json both want them)."""
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _draw_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Draw unlabelled distractors that share edges and colours with objects but not their shapes."""
    imgsz = img.shape[0]
    for _ in range(int(rng.integers(2, 12))):
        kind, color = int(rng.integers(4)), _random_color(rng)
        thickness = int(rng.integers(1, 3))
        p = rng.uniform(0, imgsz, (5, 2)).astype(np.int32)
        if kind == 0:  # straight line
            cv2.line(img, tuple(map(int, p[0])), tuple(map(int, p[1])), color, thickness, cv2.LINE_AA)
        elif kind == 1:  # scribble: a short open polyline
            walk = np.cumsum(rng.normal(0, imgsz * 0.06, (5, 2)), 0) + p[0]
            cv2.polylines(img, [walk.astype(np.int32)], False, color, thickness, cv2.LINE_AA)
        elif kind == 2:  # open arc, never closed into a ring
            axes = (int(rng.uniform(0.03, 0.15) * imgsz),) * 2
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, tuple(map(int, p[0])), axes, 0, start, start + rng.uniform(60, 240), color, thickness)
        else:  # thin filled ellipse, too elongated to pass for a circle
            major = rng.uniform(0.04, 0.15) * imgsz
            axes = (int(major), max(1, int(major / rng.uniform(3, 6))))
            cv2.ellipse(img, tuple(map(int, p[0])), axes, rng.uniform(0, 180), 0, 360, color, -1, cv2.LINE_AA)


def _random_shape(rng: np.random.Generator, cls: int, size: float, cx: float, cy: float) -> Shape:
    """Return a shape of class `cls` at (cx, cy) with random rotation and proportions (colour comes later)."""
    name = CLASS_NAMES[cls]
    param = {"rectangle": (0.5, 1.0), "ring": (0.45, 0.7), "cross": (0.25, 0.4)}.get(name, (0.5, 0.5))
    return Shape(cls, cx, cy, size, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(*param)))


def _boxes_touch(a: tuple[float, ...], b: tuple[float, ...], margin: float) -> bool:
    """Return whether two (x1, y1, x2, y2) boxes come within `margin` pixels of each other."""
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _place(rng: np.random.Generator, shapes: list[Shape], size: float, imgsz: int) -> Shape | None:
    """Return a new shape on top of `shapes` that keeps every shape at least MIN_VISIBLE visible, or None.

    With probability OVERLAP_P the new shape is aimed at an earlier one (partial occlusion); otherwise its box
    must stay clear of all earlier boxes, so occlusion only ever happens on purpose.
    """
    cls = int(rng.integers(len(CLASS_NAMES)))
    aim = shapes[int(rng.integers(len(shapes)))] if shapes and rng.random() < OVERLAP_P else None
    for _ in range(PLACE_TRIES):
        if aim is None:  # anywhere the circumscribed circle fits, so a first object always finds room
            cx, cy = rng.uniform(size / 2, imgsz - size / 2, 2)
        else:
            direction = rng.uniform(0, 2 * np.pi)
            dist = (size + aim.size) / 2 * rng.uniform(0.4, 0.9)
            cx, cy = aim.cx + dist * math.cos(direction), aim.cy + dist * math.sin(direction)
        shape = _random_shape(rng, cls, size, float(cx), float(cy))
        box = shape.box()
        if min(box) < 0 or max(box) > imgsz:  # objects stay whole: truncation is left to mosaic augmentation
            continue
        touching = any(_boxes_touch(box, s.box(), 2.0) for s in shapes)
        if touching and (aim is None or min(visible_fractions([*shapes, shape])) < MIN_VISIBLE):
            continue
        return shape
    return None


def _pick_color(rng: np.random.Generator, shape: Shape, background: np.ndarray, below: list[Shape]) -> Shape:
    """Return `shape` with a colour that stands out from the background under it and the shapes it overlaps."""
    x1, y1, x2, y2 = (int(v) for v in shape.box())
    refs = [background[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).mean(0)]
    refs += [np.asarray(s.color, np.float32) for s in below if _boxes_touch(shape.box(), s.box(), 0.0)]
    best, best_gap = shape.color, -1.0
    for _ in range(20):
        color = _random_color(rng)
        gap = min(float(np.linalg.norm(np.asarray(color) - r)) for r in refs)
        if gap >= MIN_CONTRAST:
            return replace(shape, color=color)
        if gap > best_gap:
            best, best_gap = color, gap
    return replace(shape, color=best)


def make_scene(seed: int, split: str, index: int, imgsz: int = 320, layout: str = "shapes") -> Scene:
    """Return the scene of image `index` of `split`; each image has its own random stream, so order never matters.
    A layout other than `shapes` adds its index to the stream's key, so its images share none of the `shapes` set's."""
    key = [seed, SPLITS.index(split), index] + ([list(LAYOUTS).index(layout)] if layout != "shapes" else [])
    rng = np.random.default_rng(key)
    texture = _texture(rng, imgsz)
    background = np.clip(np.round(texture), 0, 255).astype(np.uint8)
    _draw_clutter(rng, background)
    lo, hi = (f * imgsz for f in LAYOUTS[layout].size_range)
    # log-uniform sizes spread small and large evenly; placing large ones first lets them fit in crowded images
    n = int(rng.integers(1, LAYOUTS[layout].max_objects + 1))
    sizes = sorted(np.exp(rng.uniform(math.log(lo), math.log(hi), n)))
    shapes: list[Shape] = []
    for size in reversed(sizes):
        shape = _place(rng, shapes, float(size), imgsz)
        if shape is not None:
            shapes.append(_pick_color(rng, shape, background, shapes))
    noise = rng.standard_normal(background.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
    return Scene(background, shapes, noise)


def _data_yaml(root: Path, test: bool = False, layout: str = "shapes") -> str:
    """Return the data.yaml text; json quoting makes any path a valid YAML string."""
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(LAYOUTS[layout].names))
    splits = "train: images/train\nval: images/val\n" + ("test: images/test\n" if test else "")
    return f"path: {json.dumps(str(root))}\n{splits}names:\n{names}"


def _counts(params: dict) -> dict[str, int]:
    """The number of images of each split a dataset with `params` holds (`n_test` 0: no test split)."""
    return {s: n for s in SPLITS if (n := params.get(f"n_{s}", 0))}


def _is_complete(root: Path, params: dict) -> bool:
    """Return whether `root` holds a finished dataset made by this generator version with `params`."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest != {"version": GENERATOR_VERSION, "params": params, "complete": True}:
        return False
    return all(
        len(list((root / kind / split).glob(pattern))) == n
        for split, n in _counts(params).items()
        for kind, pattern in (("images", "*.jpg"), ("labels", "*.txt"))
    )


def _clear(root: Path, overwrite: bool) -> None:
    """Delete the previous splits and Ultralytics caches; refuse a folder holding a dataset made elsewhere."""
    ours = (root / MANIFEST).exists()
    if not ours and not overwrite and any((root / p).exists() for p in ("images", "labels", "data.yaml")):
        raise FileExistsError(f"{root} holds a dataset this generator did not make; pass overwrite=True to replace it")
    for split in SPLITS:
        shutil.rmtree(root / "images" / split, ignore_errors=True)
        shutil.rmtree(root / "labels" / split, ignore_errors=True)
        (root / "labels" / f"{split}.cache").unlink(missing_ok=True)


def _write_split(root: Path, split: str, n: int, imgsz: int, seed: int, layout: str) -> None:
    """Render and save `n` images and their label files."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        scene = make_scene(seed, split, i, imgsz, layout)
        cv2.imwrite(str(images / f"{i:06d}.jpg"), scene.render(), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        (labels / f"{i:06d}.txt").write_text("".join(f"{line}\n" for line in label_lines(scene.shapes, imgsz, LAYOUTS[layout].one_class)))


def make_synthetic_dataset(
    root: str | Path = DEFAULT_ROOT,
    n_train: int = 256,
    n_val: int = 64,
    imgsz: int = 320,
    seed: int = 0,
    overwrite: bool = False,
    n_test: int = 0,
    layout: str = "shapes",
) -> Path:
    """Write a YOLO-format shapes dataset under `root` (or reuse the one there) and return its data.yaml path.

    A finished dataset with the same parameters and generator version is reused as is; anything else this module
    made is regenerated. A folder holding some other dataset is only replaced with overwrite=True.
    """
    if n_train < 1 or n_val < 1 or n_test < 0 or imgsz < 64:
        raise ValueError(f"need n_train >= 1, n_val >= 1, n_test >= 0 and imgsz >= 64, got {n_train}, {n_val}, "
                         f"{n_test}, {imgsz}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    root = Path(root).resolve()
    yaml_path = root / "data.yaml"
    params = {"n_train": n_train, "n_val": n_val, "imgsz": imgsz, "seed": seed}
    if n_test or layout != "shapes":  # the main job's set keeps the manifest it always had
        params |= {"n_test": n_test, "layout": layout}
    text = _data_yaml(root, test=n_test > 0, layout=layout)
    if not overwrite and _is_complete(root, params):
        if not yaml_path.exists() or yaml_path.read_text() != text:  # the folder was moved
            yaml_path.write_text(text)
        return yaml_path
    _clear(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"version": GENERATOR_VERSION, "params": params, "complete": False}
    (root / MANIFEST).write_text(json.dumps(manifest))  # claims the folder first, so an interrupted run is redone
    for split, n in _counts(params).items():
        _write_split(root, split, n, imgsz, seed, layout)
    yaml_path.write_text(text)
    (root / MANIFEST).write_text(json.dumps({**manifest, "complete": True}))
    return yaml_path


def main(argv: list[str] | None = None) -> None:
    """Command line: an optional root folder and key=value overrides; prints the data.yaml path."""
    args = sys.argv[1:] if argv is None else argv
    kwargs: dict = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            kwargs["root"] = arg
        elif key in ("n_train", "n_val", "n_test", "imgsz", "seed"):
            kwargs[key] = int(value)
        elif key == "layout":
            kwargs[key] = value
        elif key == "overwrite":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            raise SystemExit(f"unknown argument {arg!r}; usage: {__doc__.split('Usage:')[1].strip()}")
    print(make_synthetic_dataset(**kwargs))


if __name__ == "__main__":
    main()
