"""``--arch DECODER-ENCODER``: segmentation_models.pytorch networks behind the paper's interface."""

import math

import pytest
import torch

from steelseg.config import TrainConfig
from steelseg.errors import SteelsegError
from steelseg.model.inputs import forward_padded
from steelseg.training import recipe


@pytest.mark.parametrize("arch", ["unet-resnet18", "fpn-resnet18"])
def test_smp_networks_take_fused_channels_any_size_and_start_at_the_prior(arch):
    config = TrainConfig(arch=arch, modalities=["visible", "ir"], head_prior=0.02)
    model = recipe.build_model(config).eval()
    assert model.in_channels == 4
    with torch.no_grad():
        logits = forward_padded(model, torch.randn(2, 4, 40, 170))
    assert logits.shape == (2, 4, 40, 170)
    head = model.model.segmentation_head[0]
    torch.testing.assert_close(head.bias, torch.full((4,), math.log(0.02 / 0.98)))


def test_smp_network_state_dict_rebuilds_from_the_config():
    config = TrainConfig(arch="unet-resnet18", presence_head=True)
    torch.manual_seed(0)
    model = recipe.build_model(config).eval()
    torch.manual_seed(1)
    again = recipe.build_model(config).eval()
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arch": "resnet34"}, "config arch must be paper or DECODER-ENCODER"),
        ({"arch": "segformer-mit_b0"}, "DECODER one of unet, unetplusplus, fpn"),
        ({"arch": "unet-resnet18", "pretrained": "w.pth"}, "must be '' or imagenet with arch"),
        ({"defect_crops": 1.5}, "defect_crops must be in"),
        ({"presence_weight": 0.0}, "presence_weight must be positive"),
    ],
)
def test_bad_arch_settings_are_one_line_errors(changes, message):
    with pytest.raises(SteelsegError, match=message):
        TrainConfig(**changes)


def test_unknown_encoder_and_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(SteelsegError, match="has no encoder 'resnet7'$"):
        recipe.build_model(TrainConfig(arch="unet-resnet7"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SteelsegError, match="needs segmentation_models.pytorch"):
        TrainConfig(arch="unet-resnet18")
