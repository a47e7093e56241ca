"""The T-head in Ultralytics' multi-input form (`[[P3, P4, P5], 1, TOODHead, [...]]`) and on YOLOv8/YOLO11 necks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tood_yolo import TOODDetectionModel

from tood_yolo.nn.head import TOODHead

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "thead_fpn_reference.npz"
FPN_CASES = {  # the heads of tests/data/make_thead_fpn_reference.py
    "free": dict(nc=3, feat_channels=32, stacked_convs=2, num_dcn=0, anchor_type="anchor_free", anchor_offset=0.0,
                 ch=(8,) * 5),
    "based_dcn": dict(nc=2, feat_channels=32, stacked_convs=1, num_dcn=1, anchor_type="anchor_based",
                      anchor_offset=0.5, ch=(32,) * 3),
}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (GN affine, offsets, layer attention), so that every path shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim > 1 else 0.5))


def _model(widths: list[int], head_args: list, nc: int = 3) -> TOODDetectionModel:
    """A small backbone of stride-2 convs with levels of the given (unequal) widths from P3 on, then a T-head."""
    backbone = [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [8, 3, 2]]]  # P1, P2
    backbone += [[-1, 1, "Conv", [w, 3, 2]] for w in widths]  # P3, P4, ...
    head = [[list(range(2, 2 + len(widths))), 1, "TOODHead", ["nc", *head_args]]]
    return TOODDetectionModel({"nc": nc, "backbone": backbone, "head": head}, ch=3, nc=nc, verbose=False)


@pytest.mark.parametrize("case", FPN_CASES)
def test_fpn_form_outputs_equal_those_before_the_multi_input_form(case):
    """Same weights, same inputs: the FPN form gives the outputs of the head before this change (saved reference)."""
    ref = np.load(REFERENCE)
    head = TOODHead(**FPN_CASES[case])
    state = {k.split("/", 2)[2]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith(f"{case}/state/")}
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    assert not head.proj  # equal widths: no projection, the first inter conv takes the FPN's width
    head.stride = torch.tensor([8.0 * 2**i for i in range(head.nl)])
    x = [torch.from_numpy(ref[f"{case}/x/{i}"]).float() for i in range(head.nl)]
    head.eval()
    with torch.no_grad():
        y, _ = head(x)
    # 1e-4: the reference was saved before the decompositions were fused into one bmm, which sums in another order;
    # float32 rounding then moves a sampled box by up to ~7e-5 px (the mmdet parity tests use the same tolerance)
    torch.testing.assert_close(y, torch.from_numpy(ref[f"{case}/y"]), rtol=1e-4, atol=1e-4)


def test_a_head_pickled_before_the_multi_input_form_loads_and_runs(tmp_path):
    head = TOODHead(**FPN_CASES["free"]).eval()
    head.stride = torch.tensor([8.0 * 2**i for i in range(head.nl)])
    x = [torch.randn(2, 8, s, s) for s in (8, 4, 2, 1, 1)]
    with torch.no_grad():
        expected = head(x)[0]
    del head._modules["proj"]  # what an older checkpoint's pickled head holds
    torch.save(head, tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], expected)


def test_unequal_widths_are_projected_then_run_through_the_shared_head():
    widths, c = (16, 48, 24), 32
    head = TOODHead(nc=3, feat_channels=c, stacked_convs=2, norm_groups=4, ch=widths)
    assert [p.conv.kernel_size for p in head.proj] == [(1, 1)] * 3
    proj = [(p.conv.in_channels, p.conv.out_channels, p.gn.num_groups) for p in head.proj]
    assert proj == [(w, c, 4) for w in widths]
    assert head.inter_convs[0].conv.in_channels == c
    _randomise(head)
    # the same head minus the projections, on equal-width inputs: must see exactly the projected maps
    shared = TOODHead(nc=3, feat_channels=c, stacked_convs=2, norm_groups=4, ch=(c,) * 3)
    shared.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("proj.")}, strict=True)
    for h in (head, shared):
        h.stride = torch.tensor([8.0, 16.0, 32.0])
        h.eval()
    x = [torch.randn(2, w, s, s + 1) for w, s in zip(widths, (8, 4, 2))]
    with torch.no_grad():
        y, raw = head(x)
        y_shared, _ = shared([p(xi) for p, xi in zip(head.proj, x)])
    torch.testing.assert_close(y, y_shared)
    assert y.shape == (2, 4 + 3, 8 * 9 + 4 * 5 + 2 * 3)
    assert raw["feats"] is x  # the loss reads the input maps' shapes


def test_fused_reads_of_the_inter_features_equal_the_separate_ops():
    """`read_feat` (one bmm for both decompositions, one conv for M's and O's first layers) against the modules."""
    head = TOODHead(nc=3, feat_channels=32, stacked_convs=3, norm_groups=4, ch=(32,))
    _randomise(head)
    feat = torch.randn(2, 96, 7, 5)
    attn = [d.attention(feat.mean((2, 3), keepdim=True)) for d in (head.cls_decomp, head.reg_decomp)]
    with torch.no_grad():
        got = head.read_feat(feat, *attn)
        expected = (head.cls_decomp(feat, attn[0]), head.reg_decomp(feat, attn[1]),
                    head.cls_prob_module[:2](feat), head.reg_offset_module[:2](feat))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("widths", [(16, 32, 64), (16, 24, 32, 48, 64)])
def test_any_number_of_levels_with_strides_from_the_model(widths):
    model = _model(list(widths), [32, 2, 0, "anchor_free", 0.0, 4])
    head = model.model[-1]
    assert head.nl == len(widths) and len(head.proj) == len(widths)
    torch.testing.assert_close(head.stride, torch.tensor([8.0 * 2**i for i in range(len(widths))]))
    assert model.stride.max() == 8 * 2 ** (len(widths) - 1)
    model.eval()
    s = 8 * 2 ** (len(widths) - 1) * 2  # the coarsest level is 2x2
    with torch.no_grad():
        y, _ = model(torch.rand(1, 3, s, s))
    assert y.shape == (1, 4 + 3, sum((s // 8 // 2**i) ** 2 for i in range(len(widths))))
    assert torch.isfinite(y).all()


def test_a_level_of_one_pixel_trains_and_aligns_exactly():
    model = _model([16, 32, 64], [32, 2, 0, "anchor_free", 0.0, 4])
    head = model.model[-1]
    _randomise(head)
    torch.nn.init.zeros_(head.reg_offset_module[-1].weight)  # O = 0: alignment must leave the boxes as they are
    torch.nn.init.zeros_(head.reg_offset_module[-1].bias)
    x = torch.rand(2, 3, 32, 32)
    feats = [x]
    for m in model.model[:-1]:
        feats.append(m(feats[-1]))
    p5 = feats[-1]
    assert p5.shape[2:] == (1, 1)
    level = head.forward_level(p5, 2, torch.zeros(1, 2))
    torch.testing.assert_close(level["box"], level["box_raw"])
    # GroupNorm of 8 channels per group on one pixel still sees its input; 1 channel per group would give every image
    # the same output (the affine bias alone), so `norm_groups` must leave several channels per group for tiny levels
    assert not torch.allclose(level["score"][0], level["score"][1])
    per_channel = TOODHead(nc=3, feat_channels=32, stacked_convs=2, norm_groups=32, ch=(16, 32, 64))
    out = per_channel.forward_level(p5, 2, torch.zeros(1, 2))["score"]
    torch.testing.assert_close(out[0], out[1])
    model.train()
    out = model(x)
    (out["boxes"].sum() + out["scores"].sum()).backward()
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert head.proj[2].conv.weight.grad.abs().sum() > 0  # the 1x1 level's projection learns


# --------------------------------------------------------------------------------------------------------------------
# cfg/yolov8{n,s}-tood.yaml, cfg/yolo11{n,s}-tood.yaml: Ultralytics' own models with the T-head as their head
# --------------------------------------------------------------------------------------------------------------------
TWINS = {"yolov8n-tood": ("v8/yolov8.yaml", "n"), "yolov8s-tood": ("v8/yolov8.yaml", "s"),
         "yolo11n-tood": ("11/yolo11.yaml", "n"), "yolo11s-tood": ("11/yolo11.yaml", "s")}
TWINS.update({f"{name}-bn": src for name, src in TWINS.items()})  # the YOLO-regime head (per-level BatchNorm trunks)


@pytest.mark.parametrize("name", TWINS)
def test_twin_config_is_ultralytics_model_with_only_the_head_swapped(name):
    """Every row but the head, and the scale, as Ultralytics' own YAML (read from the installed package); built, every
    layer but the head has Ultralytics' module, inputs and weight shapes."""
    import ultralytics
    from ultralytics.nn.tasks import parse_model, yaml_model_load

    src, scale = TWINS[name]
    theirs = yaml_model_load(Path(ultralytics.__file__).parent / "cfg" / "models" / src)
    ours = yaml_model_load(ROOT / "cfg" / f"{name}.yaml")
    assert ours["backbone"] == theirs["backbone"] and ours["head"][:-1] == theirs["head"][:-1]
    assert ours["scales"] == {scale: theirs["scales"][scale]} and ours["nc"] == theirs["nc"]
    (f, n, module, _), detect = ours["head"][-1], theirs["head"][-1]
    assert (f, n, module, detect[2]) == (detect[0], 1, "TOODHead", "Detect")
    assert ours["recipe"] == "ultralytics"

    model = TOODDetectionModel(ours, verbose=False)
    twin, _ = parse_model({**theirs, "scale": scale}, ch=3, verbose=False)  # Ultralytics' layers (no stride pass)
    assert isinstance(model.model[-1], TOODHead) and model.model[-1].f == twin[-1].f
    assert model.stride.tolist() == [8, 16, 32]
    for a, b in zip(model.model[:-1], twin[:-1], strict=True):
        assert (type(a), a.f) == (type(b), b.f)
        assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    head = model.model[-1]
    widths = [m[0].conv.in_channels for m in twin[-1].cv2]
    if name.endswith("-bn"):  # a trunk per level reads the level at its own width, as Detect's branches do
        assert (head.norm, head.trunk, head.reg, head.stacked_convs) == ("bn", "level", "dfl", 2) and not head.proj
        assert [convs[0].conv.in_channels for convs in head.inter_convs] == widths
        return
    assert [p.conv.in_channels for p in head.proj] == widths
    assert head.proj[0].gn.num_groups == 32  # the paper's group count (better than its group size: docs/models.md)


def test_yolo11n_tood_trains_validates_and_exports_at_320(tmp_path):
    """imgsz=320 is used as is (largest stride 32) in training and validation; the dynamic ONNX export gives PyTorch's
    outputs at other batch sizes and image sizes."""
    import onnxruntime as ort
    from ultralytics import YOLO

    from tood_yolo.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "syn", n_train=8, n_val=4, imgsz=320)
    model = YOLO(str(ROOT / "cfg" / "yolo11n-tood.yaml"))
    model.train(data=str(data), imgsz=320, epochs=1, batch=8, device="cpu", workers=0, plots=False, amp=False,
                project=str(tmp_path), name="run", exist_ok=True)
    trainer = model.trainer
    assert type(trainer).__name__ == "TOODTrainer" and trainer.args.imgsz == 320
    assert trainer.train_loader.dataset.imgsz == 320
    val_set = trainer.validator.dataloader.dataset  # rect batches: padded to a multiple of the largest stride
    # Ultralytics' rect validation shape, as for yolo11n: ceil(320 / 32 + 0.5) * 32 (a stride-128 model got 384)
    assert val_set.imgsz == 320 and val_set.rect and int(trainer.stride) == 32 and (val_set.batch_shapes == 352).all()
    assert "metrics/mAP50-95(B)" in trainer.metrics

    best = YOLO(str(tmp_path / "run" / "weights" / "best.pt"))
    f = best.export(format="onnx", dynamic=True, imgsz=320, simplify=False)  # onnxslim: test_zoo.py
    session = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
    net = best.model.float().eval()
    for shape in ((1, 3, 320, 320), (2, 3, 256, 416)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        (y_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            y = net(x)[0].numpy()
        np.testing.assert_allclose(y_onnx, y, rtol=1e-4, atol=1e-4)
