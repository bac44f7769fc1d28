import pytest
import torch
import torchvision

from steelseg.errors import SteelsegError
from steelseg.model import pretrained
from steelseg.model.unet import UNet, count_parameters


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_parameter_count_is_the_papers():
    assert count_parameters(UNet(n_classes=4, in_channels=3)) == 17_800_004


@pytest.mark.parametrize(("height", "width"), [(32, 160), (64, 320), (96, 64)])
def test_output_shape_any_multiple_of_32(height, width):
    model = UNet().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, height, width)).shape == (2, 4, height, width)


def test_size_not_divisible_by_32_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 32, got 40x160"):
        UNet()(torch.randn(1, 3, 40, 160))


def test_channels_last_and_bf16_autocast():
    model = UNet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 160).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 32, 160)
    out.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_torchvision_state_dict_file_loads(resnet_file):
    model = UNet()
    pretrained.load_encoder_file(model, resnet_file)
    saved = torch.load(resnet_file, weights_only=True)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_wrong_state_dict_names_the_keys(resnet_file, tmp_path):
    state = torch.load(resnet_file, weights_only=True)
    state["layer9.weight"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SteelsegError) as info:
        pretrained.load_encoder_file(UNet(), tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys: layer1.0.conv1.weight" in message
    assert "unexpected keys: layer9.weight" in message
    assert "\n" not in message


def test_unreadable_or_missing_weights_file(tmp_path):
    (tmp_path / "junk.pth").write_text("not torch")
    with pytest.raises(SteelsegError, match="junk.pth: cannot read weights"):
        pretrained.load_encoder_file(UNet(), tmp_path / "junk.pth")
    with pytest.raises(SteelsegError, match="no such weights file"):
        pretrained.load_encoder_file(UNet(), tmp_path / "none.pth")


def test_a_weights_file_of_random_bytes_is_one_line(tmp_path):
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 4)  # pickle opcodes torch refuses
    with pytest.raises(SteelsegError) as info:
        pretrained.load_encoder_file(UNet(), tmp_path / "junk.pth")
    assert str(info.value) == (
        f"{tmp_path / 'junk.pth'}: cannot read weights (UnpicklingError: Weights only load failed)"
    )


def test_imagenet_offline_is_a_clear_message(monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(SteelsegError, match="cannot download ImageNet resnet18 weights"):
        pretrained.load_encoder(UNet(), "imagenet")


@pytest.mark.parametrize("in_channels", [4, 5])
def test_fusion_keeps_pretrained_weights_and_trains(resnet_file, in_channels):
    model = UNet(in_channels=in_channels)
    pretrained.load_encoder(model, str(resnet_file))
    rgb = torch.load(resnet_file, weights_only=True)["conv1.weight"]
    conv1 = model.encoder.conv1.weight
    assert conv1.shape == (64, in_channels, 7, 7)
    assert torch.equal(conv1[:, :3], rgb)
    for extra in range(3, in_channels):
        assert torch.allclose(conv1[:, extra], rgb.mean(dim=1))
    assert model.conv_original_size0[0].weight.shape[1] == in_channels
    saved = torch.load(resnet_file, weights_only=True)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    out = model(torch.randn(2, in_channels, 32, 64))
    out.mean().backward()
    assert conv1.grad is not None and conv1.grad[:, 3:].abs().sum() > 0


def test_encoder_is_torchvisions_resnet18_up_to_layer4(resnet_file):
    resnet = torchvision.models.resnet18(weights=None)
    resnet.load_state_dict(torch.load(resnet_file, weights_only=True))
    model = UNet()
    pretrained.load_encoder_file(model, resnet_file)
    resnet.eval(), model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = resnet.layer4(
            resnet.layer3(
                resnet.layer2(
                    resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
                )
            )
        )
        assert torch.allclose(model.encode(x)[-1], expected, atol=1e-5)
    assert set(model.encoder.state_dict()) == set(resnet.state_dict()) - {"fc.weight", "fc.bias"}
