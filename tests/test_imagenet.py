"""ImageNet weights of the paper's ResNets, as mmdet gets them (`torchvision://resnet50`): a training run from a ResNet
YAML fetches torchvision's checkpoint into torch hub's cache when online, and stops before its first epoch, naming the
file and how to get it, when offline, unless it asks for random init (`pretrained=False`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models._api import WeightsEnum

from tood_yolo.data.synthetic import make_synthetic_dataset
from tood_yolo.engine.trainer import TOODTrainer

URL = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "syn", n_train=4, n_val=2, imgsz=64)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict:
    """torch hub's cache in a temp dir, and torchvision's download replaced by one that records its URL and writes a
    (random) resnet50 state dict where torchvision would."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    seen = {"calls": [], "file": tmp_path / "hub" / "checkpoints" / Path(URL).name}

    def download(self, *args, **kwargs):
        seen["calls"].append(self.url)
        seen["file"].parent.mkdir(parents=True, exist_ok=True)
        seen["state"] = torchvision.models.resnet50().state_dict()
        torch.save(seen["state"], seen["file"])
        return seen["state"]

    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    return seen


def trainer(data: Path, tmp_path: Path, **overrides) -> TOODTrainer:
    return TOODTrainer(overrides={"model": "tood-r50.yaml", "data": str(data), "project": str(tmp_path),
                                  "device": "cpu", **overrides})


def test_online_the_trainer_downloads_imagenet_weights_through_torchvision(tiny_data, tmp_path, hub, monkeypatch):
    monkeypatch.setattr("tood_yolo.nn.backbone.is_online", lambda: True)
    t = trainer(tiny_data, tmp_path)
    model = t.get_model(cfg=t.args.model, weights=None, verbose=False)
    assert hub["calls"] == [URL]
    torch.testing.assert_close(model.model[0].layer3[0].conv1.weight, hub["state"]["layer3.0.conv1.weight"])
    t.get_model(cfg=t.args.model, weights=None, verbose=False)
    assert hub["calls"] == [URL]  # cached: not fetched again


def test_offline_training_stops_before_the_first_epoch_and_says_why(tiny_data, tmp_path, hub, no_network, monkeypatch):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    t = trainer(tiny_data, tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"ImageNet weights for resnet50 not found at {hub['file']}.*"
                                                rf"Download {URL}.*pretrained=False"):
        t.get_model(cfg=t.args.model, weights=None, verbose=False)
    random_init = trainer(tiny_data, tmp_path, pretrained=False)
    model = random_init.get_model(cfg=random_init.args.model, weights=None, verbose=False)
    # weights from a checkpoint (a converted or trained .pt): the ImageNet file is not needed either
    t.get_model(cfg=t.args.model, weights=model, verbose=False)
    assert hub["calls"] == [] and no_network == []
