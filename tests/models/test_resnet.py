"""SmallResNet, the torchvision-layout ResNet and checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from mbdml.errors import CheckpointError, ConfigError
from mbdml.models import ResNet, SmallResNet, describe_state_dict, load_pretrained, resnet18, resnet50


@pytest.fixture(scope="module")
def r50() -> ResNet:
    torch.manual_seed(1)
    return resnet50()


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A resnet18 checkpoint in torchvision's format (with an ImageNet fc)."""
    torch.manual_seed(2)
    model = resnet18()
    # non-trivial BN statistics, so that a load that skipped buffers would show
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    sd = dict(model.state_dict())
    sd["fc.weight"] = torch.randn(1000, 512)
    sd["fc.bias"] = torch.randn(1000)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-fake.pth"
    torch.save(sd, path)
    return model.eval(), sd, path


# --------------------------------------------------------------------- SmallResNet


@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28), (1, 8), (3, 9), (3, 40)])
def test_small_resnet_shapes(in_channels, size):
    model = SmallResNet(in_channels=in_channels, width=8)
    assert model.feature_dim == 64
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 64)
    assert torch.isfinite(out).all()
    assert (out >= 0).all()  # post-ReLU, pooled


def test_small_resnet_width_sets_feature_dim():
    assert SmallResNet(width=32).feature_dim == 256
    assert SmallResNet(width=4, in_channels=1).feature_dim == 32


def test_small_resnet_rejects_too_small_input_and_wrong_channels():
    model = SmallResNet(in_channels=3, width=4)
    with pytest.raises(ConfigError, match="at least 8x8"):
        model(torch.randn(1, 3, 7, 7))
    with pytest.raises(ConfigError, match="in_channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="width"):
        SmallResNet(width=0)


def test_small_resnet_channels_last_same_output():
    torch.manual_seed(0)
    model = SmallResNet(width=8).eval()
    x = torch.randn(3, 3, 16, 16)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x), ref, atol=1e-5)


# --------------------------------------------------------------------- ImageNet ResNet


@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8), (3, 17)])
def test_resnet18_shapes(in_channels, size):
    model = resnet18(in_channels=in_channels)
    assert model.feature_dim == 512
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 512)
    assert (out >= 0).all()


def test_resnet50_shape(r50):
    assert r50.feature_dim == 2048
    assert r50(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_torchvision_key_names(r50):
    k18 = set(resnet18().state_dict())
    for key in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_var",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.num_batches_tracked",
    ]:
        assert key in k18, key
    assert not any(k.startswith("fc.") for k in k18)
    assert "layer1.0.downsample.0.weight" not in k18  # torchvision's resnet18 has none there
    k50 = set(r50.state_dict())
    for key in [
        "layer1.0.downsample.0.weight",
        "layer1.2.conv3.weight",
        "layer3.5.bn3.bias",
        "layer4.0.downsample.1.weight",
        "layer4.2.bn3.running_var",
    ]:
        assert key in k50, key
    # torchvision: 122 / 320 state-dict entries, of which fc.weight and fc.bias
    assert len(k18) == 120 and len(k50) == 318
    # torchvision: 11,689,512 / 25,557,032 parameters, fc included
    assert sum(p.numel() for p in resnet18().parameters()) == 11_689_512 - 513_000
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032 - 2_049_000


def test_round_trip_torchvision_layout(r18_file, tmp_path):
    model, sd, path = r18_file
    x = torch.randn(2, 3, 32, 32)
    fresh = resnet18()
    assert load_pretrained(fresh, path) is fresh
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    # a plain load_state_dict of the torchvision file works too (fc is dropped)
    other = resnet18().eval()
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(other(x), model(x))
    # wrapped in {"state_dict": ...} with DataParallel's "module." prefix
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, wrapped)
    third = resnet18(pretrained=wrapped).eval()
    assert torch.equal(third(x), model(x))
    # {"model": ...}, and old torchvision files without num_batches_tracked
    old = tmp_path / "old.pth"
    torch.save({"model": {k: v for k, v in sd.items() if "num_batches" not in k}}, old)
    fourth = load_pretrained(resnet18(), old).eval()
    assert torch.equal(fourth(x), model(x))


def test_grey_input_adapts_stem(r18_file):
    model, _, path = r18_file
    grey = resnet18(in_channels=1, pretrained=path).eval()
    w3 = model.conv1.weight
    assert torch.allclose(grey.conv1.weight, w3.sum(dim=1, keepdim=True), atol=1e-6)
    x = torch.randn(2, 1, 32, 32)
    # a grey image equals the pretrained net on the image copied to RGB
    assert torch.allclose(grey(x), model(x.repeat(1, 3, 1, 1)), atol=1e-4)


def test_wrong_architecture_is_explained(r18_file, r50, tmp_path):
    _, _, path = r18_file
    with pytest.raises(CheckpointError) as info:
        load_pretrained(resnet50(), path)
    msg = str(info.value)
    assert "resnet18" in msg and "resnet50" in msg
    assert "missing" in msg and "wrong shape" in msg
    assert str(path) in msg
    f50 = tmp_path / "r50.pth"
    torch.save(r50.state_dict(), f50)
    with pytest.raises(CheckpointError, match=r"seems to be for resnet50"):
        load_pretrained(resnet18(), f50)
    small = tmp_path / "small.pth"
    torch.save(SmallResNet(width=4).state_dict(), small)
    with pytest.raises(CheckpointError, match="SmallResNet"):
        load_pretrained(resnet18(), small)


def test_extra_blocks_are_rejected(r18_file, tmp_path):
    # a resnet34-like file holds every resnet18 key with the right shape, plus more
    _, sd, _ = r18_file
    sd = dict(sd)
    for key in [k for k in sd if k.startswith("layer1.1.")]:
        sd[key.replace("layer1.1.", "layer1.2.")] = sd[key].clone()
    path = tmp_path / "more.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_pretrained(resnet18(), path)


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope" / "resnet50-0676ba61.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        load_pretrained(resnet18(), missing)
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read") as info:
        load_pretrained(resnet18(), garbage)
    assert str(garbage) in str(info.value)
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_pretrained(resnet18(), not_sd)
    bad_value = tmp_path / "bad_value.pth"
    torch.save({"conv1.weight": 3}, bad_value)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_pretrained(resnet18(), bad_value)


def test_describe_state_dict():
    assert "SmallResNet" in describe_state_dict(SmallResNet(width=4).state_dict())
    assert describe_state_dict({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}).startswith(
        "an EfficientNet"
    )
    assert "unknown" in describe_state_dict({"foo.weight": torch.zeros(1)})
