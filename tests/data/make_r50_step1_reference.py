"""Write r50_step1_reference.npz: step 1 of mmdetection 3.3.0's Runner on `tood_r50_fpn_1x_coco` (tests/test_step1.py).

Two coco8 train images (000000000009: 640x480, 000000000030: 640x428), batch 2, flip off, no shuffle, from one init.
The init is the project's R-50 model built from `tood-r50.yaml` without ImageNet weights under `torch.manual_seed(0)`
(`seeded_init`): regenerated bit for bit from the seed on CPU with the pinned torch, so the repository stores no
weights (R-50 TOOD is 32 M parameters, 128 MB in float32). mmdet's own seeded default init could not be regenerated
without mmdet; this one goes into mmdet through the converter's key map (`mmdet_key_map`), and the test brings it back
through `convert`, so the converter stays in the loop.

Run in two environments (mmdet never becomes a dependency of the project):

    python tests/data/make_r50_step1_reference.py init /tmp/r50_init.pth            # the project's venv
    /path/to/mmdet-venv/bin/python tests/data/make_r50_step1_reference.py record /tmp/r50_init.pth
        # mmdet 3.3.0, mmengine 0.10.7, mmcv-lite 2.1.0, torch 2.14.1, torchvision 0.29.1 (mmcv.ops mapped below)

What is kept (about 0.5 MB), per image by file name: the input's resized and padded shapes, the CRC32 of its uint8
pixels (recovered exactly from the normalised input) and its per-row sums; the padding's largest |value| (0 in mmdet);
the GT boxes after resizing. Then the losses, the optimiser's groups (lr, momentum, weight decay, Nesterov), and the
gradient the first step applies: per-tensor L2 norms by mmdet name, and a count sketch (`sketch`, a sparse
Johnson-Lindenstrauss projection of the whole gradient to SKETCH_DIM values, signs and buckets seeded per tensor name)
whose difference estimates the relative L2 distance of two gradients to about sqrt(2 / SKETCH_DIM) of itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).with_name("r50_step1_reference.npz")
COCO8 = Path("/work/shared/data/coco8")  # where the recording read coco8; the test copies it from its own fixture
IMAGES = ("000000000009.jpg", "000000000030.jpg")
SEED = 0
SKETCH_DIM = 1 << 16
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # mmdet's, RGB


def sketch(grads: dict[str, torch.Tensor], dim: int = SKETCH_DIM) -> np.ndarray:
    """Count sketch of the concatenated gradients: each entry of tensor `name` adds +-value to one of `dim` buckets,
    bucket and sign drawn from a generator seeded with the name's CRC32 (independent of the tensors' order)."""
    out = torch.zeros(dim, dtype=torch.float64)
    for name, g in grads.items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        flat = g.detach().double().flatten()
        bucket = torch.randint(dim, flat.shape, generator=gen)
        sign = torch.randint(2, flat.shape, generator=gen).double() * 2 - 1
        out.index_add_(0, bucket, flat * sign)
    return out.numpy()


def seeded_init():
    """The project's R-50 TOOD model (80 classes) from `tood-r50.yaml` without ImageNet weights, seeded."""
    from tood_yolo.nn.backbone import without_backbone_weights
    from tood_yolo.nn.configs import read_config
    from tood_yolo.nn.model import TOODDetectionModel

    torch.manual_seed(SEED)
    return TOODDetectionModel(without_backbone_weights(read_config("tood-r50.yaml")), verbose=False)


def write_init(dst: str) -> None:
    """Save `seeded_init` in mmdet's layout (an mmdet checkpoint), through the converter's key map."""
    from tood_yolo.tools.convert import mmdet_key_map

    model = seeded_init()
    mapping = mmdet_key_map(model)
    torch.save({"state_dict": {mapping[k]: v for k, v in model.state_dict().items()}, "meta": {}}, dst)


def coco_json(root: Path) -> dict:
    """A COCO annotation file of IMAGES from their YOLO labels (class + 1 as category id, boxes in pixels)."""
    import cv2

    from mmdet.datasets import CocoDataset

    images, anns = [], []
    for i, name in enumerate(IMAGES, 1):
        h, w = cv2.imread(str(root / "images" / name)).shape[:2]
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        for row in (root / "labels" / Path(name).with_suffix(".txt").name).read_text().split("\n"):
            if row.strip():
                c, xc, yc, bw, bh = (float(v) for v in row.split())
                box = [(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h]
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CocoDataset.METAINFO["classes"])]
    return {"images": images, "annotations": anns, "categories": cats}


def map_mmcv_ops() -> None:
    """mmcv-lite has no compiled ops: `mmcv.ops` becomes a module with torchvision's deform_conv2d (what the T-head
    uses in training) and inert stand-ins for every other name mmdet imports."""
    import importlib.abc
    import importlib.machinery
    import types

    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    def deform_conv2d(input, offset, weight, stride=1, padding=0, dilation=1, groups=1, deform_groups=1, bias=False,
                      im2col_step=32):
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        return tv_deform_conv2d(input, offset, weight, None, pair(stride), pair(padding), pair(dilation))

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (torch.nn.Module,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "mmcv.ops" or name.startswith("mmcv.ops."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Stub(spec.name)
            m.__path__ = []
            m.deform_conv2d = deform_conv2d
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def record(init: str) -> None:
    """Run mmdet's Runner for one iteration from `init` and save what the test compares."""
    map_mmcv_ops()
    import cv2
    import mmdet
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
    from mmengine.runner import Runner

    from mmdet.utils import register_all_modules

    register_all_modules()
    seen: dict = {}

    @HOOKS.register_module()
    class RecordStep1(Hook):
        def before_train(self, runner):
            model, opt = runner.model, runner.optim_wrapper.optimizer
            pre, step = model.data_preprocessor.forward, opt.step

            def preprocess(data, training=False):
                out = pre(data, training)
                seen.setdefault("inputs", out["inputs"].detach().clone())
                seen.setdefault("samples", out["data_samples"])
                return out

            def record_step(*args, **kwargs):
                if "grads" not in seen:
                    seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}
                    seen["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                    seen["params_per_group"] = [len(g["params"]) for g in opt.param_groups]
                    seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
                return step(*args, **kwargs)

            model.data_preprocessor.forward, opt.step = preprocess, record_step

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.setdefault("losses", {k: float(v.detach()) for k, v in outputs.items()})

    work = Path(tempfile.mkdtemp())
    (work / "images").mkdir()
    for name in IMAGES:
        (work / "images" / name).write_bytes((COCO8 / "images" / "train" / name).read_bytes())
    (work / "labels").mkdir()
    for name in IMAGES:
        label = Path(name).with_suffix(".txt").name
        (work / "labels" / label).write_bytes((COCO8 / "labels" / "train" / label).read_bytes())
    (work / "ann.json").write_text(json.dumps(coco_json(work)))

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim/configs/tood/tood_r50_fpn_1x_coco.py"))
    cfg.work_dir = str(work / "run")
    cfg.model.backbone.init_cfg = None  # the init comes from `init`, nothing from the network
    cfg.load_from = init
    pipeline = [dict(t, prob=0.0) if t["type"] == "RandomFlip" else t for t in cfg.train_dataloader.dataset.pipeline]
    cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False,
                                sampler=dict(type="DefaultSampler", shuffle=False))
    cfg.train_dataloader.dataset.update(data_root=str(work), ann_file="ann.json", data_prefix=dict(img="images/"),
                                        pipeline=pipeline)
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=1000)  # one epoch = one iteration
    for k in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
        cfg[k] = None
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1000)
    cfg.custom_hooks = [dict(type="RecordStep1")]
    runner = Runner.from_cfg(cfg)
    state = torch.load(init, map_location="cpu")["state_dict"]
    runner.model.load_state_dict(state, strict=True)  # every key of the init has its place (load_from is not strict)
    runner.train()

    arrays: dict[str, np.ndarray] = {}
    inputs = seen["inputs"]
    arrays["input_shape"] = np.array(inputs.shape)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for x, sample in zip(inputs, seen["samples"]):
        name = Path(sample.img_path).name
        h, w = sample.img_shape
        pix = (x[:, :h, :w].double() * std + mean)
        assert (pix - pix.round()).abs().max() < 1e-3, "mmdet's input is not an exact uint8 image"
        pix = pix.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        pad = x.clone()
        pad[:, :h, :w] = 0
        arrays[f"{name}/img_shape"] = np.array([h, w])
        arrays[f"{name}/pad_shape"] = np.array(sample.pad_shape[:2])
        arrays[f"{name}/crc32"] = np.array(zlib.crc32(pix.tobytes()))
        arrays[f"{name}/row_sums"] = x.double().sum((0, 2)).numpy()
        arrays[f"{name}/pad_max"] = np.array(float(pad.abs().max()))
        boxes = sample.gt_instances.bboxes
        arrays[f"{name}/gt_bboxes"] = getattr(boxes, "tensor", boxes).numpy()
        arrays[f"{name}/gt_labels"] = sample.gt_instances.labels.numpy()
        assert cv2.imread(str(work / "images" / name)) is not None
    for k, v in seen["losses"].items():
        arrays[f"losses/{k}"] = np.array(v)
    groups = seen["groups"]
    arrays["optim/groups"] = np.array(len(groups))
    for k in ("lr", "momentum", "weight_decay", "nesterov", "dampening"):
        arrays[f"optim/{k}"] = np.array([float(g[k]) for g in groups])
    grads = {k: seen["grads"][k] for k in sorted(seen["grads"])}
    assert sorted(grads) == seen["trainable"], "a trainable parameter got no gradient"
    arrays["grad/names"] = np.array(list(grads))
    arrays["grad/norms"] = np.array([float(g.double().norm()) for g in grads.values()])
    arrays["grad/sketch"] = sketch(grads)
    np.savez_compressed(REFERENCE, **arrays)
    print({k: seen["losses"][k] for k in seen["losses"]}, "lr", arrays["optim/lr"], "grad norm",
          float(np.sqrt((arrays["grad/norms"] ** 2).sum())), "->", REFERENCE)


if __name__ == "__main__":
    {"init": write_init, "record": record}[sys.argv[1]](sys.argv[2])
