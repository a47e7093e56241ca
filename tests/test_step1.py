"""Step 1 of `yolo train` under `recipe: mmdet` against step 1 of mmdetection 3.3.0's own Runner on
`tood_r50_fpn_1x_coco` (recorded by tests/data/make_r50_step1_reference.py: same init, images, batch 2, flip off).

Compared: the input tensor (shape, the exact uint8 pixels of each image, per-row sums, a padding that normalises to 0),
the learning rate, the optimiser's groups (one, weight decay 1e-4 on every parameter, momentum 0.9, no Nesterov),
loss_cls and loss_bbox (1e-4 relative) and the gradient the first optimiser step applies (relative L2 <= 1e-3 over all
trainable tensors, estimated from the reference's count sketch; per-tensor norms 1e-2 relative).
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_r50_step1_reference import IMAGES, MEAN, REFERENCE, STD, seeded_init, sketch, write_init  # noqa: E402

from tood_yolo.engine.trainer import TOODTrainer  # noqa: E402
from tood_yolo.tools.convert import convert, mmdet_key_map  # noqa: E402

REF = dict(np.load(REFERENCE))


class _Stop(Exception):
    """Ends the run once step 1 is recorded (the rest of the epoch, validation and saving are not under test)."""


@pytest.fixture(scope="module")
def step1(shared_data, tmp_path_factory) -> dict:
    coco8 = shared_data("coco8")
    root = tmp_path_factory.mktemp("step1")
    for sub in ("images", "labels"):
        (root / sub / "train").mkdir(parents=True)
        for name in IMAGES:
            file = Path(name) if sub == "images" else Path(name).with_suffix(".txt")
            (root / sub / "train" / file).write_bytes((coco8 / sub / "train" / file).read_bytes())
    data = root / "data.yaml"
    names = yaml.safe_load((coco8 / "data.yaml").read_text())["names"]
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train", "names": names}))
    write_init(str(root / "init.pth"))  # the seeded init in mmdet's layout, as the reference loaded it
    init = convert(root / "init.pth", root / "init.pt", "tood-r50.yaml")

    seen: dict = {}
    preprocess = TOODTrainer.preprocess_batch

    def record_batch(self, batch):
        batch = preprocess(self, batch)
        seen.setdefault("batch", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    def record_step(self):
        model = self.model
        seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        seen["params"] = [n for n, p in model.named_parameters()]
        seen["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        seen["group_sizes"] = [len(g["params"]) for g in self.optimizer.param_groups]
        seen["losses"] = {k: float(v) for k, v in self.loss_items.items()}
        seen["mmdet_names"] = mmdet_key_map(model)
        seen["norm"] = model.model[0]
        raise _Stop

    from ultralytics import YOLO

    mp = pytest.MonkeyPatch()
    mp.setattr(TOODTrainer, "preprocess_batch", record_batch)
    mp.setattr(TOODTrainer, "optimizer_step", record_step)
    try:
        with pytest.raises(_Stop):
            # epochs=2: Ultralytics leaves the last epoch out of the warm-up, which one epoch would leave empty
            YOLO(str(init)).train(data=str(data), batch=2, epochs=2, imgsz=1333, fliplr=0.0, device="cpu", workers=0,
                                  amp=False, plots=False, val=False, project=str(root), name="run", exist_ok=True,
                                  seed=0, deterministic=True)
    finally:
        mp.undo()
    return seen


def test_seeded_init_is_regenerated_exactly():
    a, b = seeded_init().state_dict(), seeded_init().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_input_equals_mmdet(step1):
    batch = step1["batch"]
    assert tuple(batch["img"].shape) == tuple(REF["input_shape"]) == (2, 3, 800, 1216)
    norm = step1["norm"]
    x = (batch["img"] - norm.mean) / norm.std  # what the model's ResNet computes first
    for i, file in enumerate(batch["im_file"]):
        name = Path(file).name
        h, w = (int(v) for v in batch["resized_shape"][i])
        assert (h, w) == tuple(REF[f"{name}/img_shape"])
        assert tuple(batch["pad_shape"][i].tolist()) == tuple(REF[f"{name}/pad_shape"])
        pix = (batch["img"][i, :, :h, :w].double() * 255)
        assert (pix - pix.round()).abs().max() < 1e-3
        pix = pix.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        assert zlib.crc32(pix.tobytes()) == int(REF[f"{name}/crc32"]), f"{name}: pixels differ from mmdet's"
        np.testing.assert_allclose(x[i].double().sum((0, 2)).numpy(), REF[f"{name}/row_sums"], rtol=1e-5, atol=1e-2)
        pad = x[i].clone()
        pad[:, :h, :w] = 0
        assert float(pad.abs().max()) < 1e-6 and float(REF[f"{name}/pad_max"]) == 0.0
    torch.testing.assert_close(torch.tensor(MEAN, dtype=torch.float64) / 255, norm.mean.flatten().double())
    torch.testing.assert_close(torch.tensor(STD, dtype=torch.float64) / 255, norm.std.flatten().double())


def test_optimizer_equals_mmdet(step1):
    groups = step1["groups"]
    assert len(groups) == int(REF["optim/groups"]) == 1
    assert step1["group_sizes"] == [len(step1["params"])]  # every parameter, with weight decay
    for k in ("lr", "momentum", "weight_decay", "nesterov", "dampening"):
        assert float(groups[0][k]) == pytest.approx(float(REF[f"optim/{k}"][0]), rel=1e-9), k
    assert float(REF["optim/lr"][0]) == pytest.approx(1e-5)  # LinearLR's start: 0.001 x 0.01


def test_losses_equal_mmdet(step1):
    for k in ("loss_cls", "loss_bbox"):
        print(f"{k}: ours {step1['losses'][k]:.7f}, mmdet {float(REF[f'losses/{k}']):.7f}")
        assert step1["losses"][k] == pytest.approx(float(REF[f"losses/{k}"]), rel=1e-4), k


def test_applied_gradient_equals_mmdet(step1):
    names = step1["mmdet_names"]
    grads = {names[k]: g for k, g in step1["grads"].items()}
    assert sorted(grads) == list(REF["grad/names"])  # the same tensors train
    norms = np.array([float(grads[k].double().norm()) for k in REF["grad/names"]])
    np.testing.assert_allclose(norms, REF["grad/norms"], rtol=1e-2, atol=1e-6 * REF["grad/norms"].max())
    ours, ref = sketch(grads), REF["grad/sketch"]
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    total = np.sqrt((REF["grad/norms"] ** 2).sum())
    print(f"gradient: norm ours {np.sqrt((norms ** 2).sum()):.6f}, mmdet {total:.6f}; "
          f"relative L2 distance ~{rel:.2e} (sketch); largest per-tensor norm difference "
          f"{np.max(np.abs(norms - REF['grad/norms']) / np.maximum(REF['grad/norms'], 1e-12)):.2e} relative")
    assert rel <= 1e-3, f"relative L2 distance of the applied gradients ~{rel:.2e}"
