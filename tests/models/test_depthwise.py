"""The depthwise convolution's own backward against PyTorch's, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbdml.models.depthwise import depthwise_conv2d, depthwise_grad_input, depthwise_grad_weight
from mbdml.models.efficientnet import SameConv2d, efficientnet_lite0

# (channels, input side, kernel, stride, padding): the shapes of Lite0's depthwise
# convolutions, odd sides (TensorFlow "SAME" leaves an unread last row), and padding 0
SHAPES = [
    (8, 16, 3, 1, 1),
    (8, 17, 3, 2, 0),
    (8, 16, 3, 2, 1),
    (6, 12, 5, 1, 2),
    (6, 11, 5, 2, 0),
    (6, 13, 5, 2, 2),
    (4, 9, 5, 1, 0),
]


def _reference(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, g: torch.Tensor):
    return torch.ops.aten.convolution_backward(
        g, x, w, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], w.shape[0], [True, True, False]
    )[:2]


@pytest.mark.parametrize("channels,side,k,stride,padding", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_as_forward_convolutions_match_pytorch_in_float64(channels, side, k, stride, padding, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, channels, side, side, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, 1, k, k, dtype=torch.float64)
    out = F.conv2d(x, w, None, stride, padding, 1, channels)
    g = torch.randn_like(out)
    ref_x, ref_w = _reference(x, w, stride, padding, g)
    gx = depthwise_grad_input(g, w, stride, padding, (side, side))
    gw = depthwise_grad_weight(g, x, stride, padding, k)
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gx, ref_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, ref_w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels,side,k,stride,padding", SHAPES)
def test_bfloat16_autocast_gradients_match_pytorch_to_rounding(channels, side, k, stride, padding):
    torch.manual_seed(1)
    x = torch.randn(4, channels, side, side, requires_grad=True)
    w = torch.randn(channels, 1, k, k, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = depthwise_conv2d(x, w, stride, padding)
        theirs = F.conv2d(x, w, None, stride, padding, 1, channels)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same forward computation
    g = torch.randn_like(ours)
    gx, gw = torch.autograd.grad(ours, (x, w), g)
    rx, rw = torch.autograd.grad(theirs, (x, w), g)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype  # gradients in the leaves' precision
    # exact float64 gradients of the same bfloat16 inputs: both must be within rounding of them
    xb, wb = x.detach().bfloat16().double(), w.detach().bfloat16().double()
    ex, ew = _reference(xb, wb, stride, padding, g.double())
    for got in (gx, rx):
        assert (got.double() - ex).norm() / ex.norm() < 2e-2
    for got in (gw, rw):
        assert (got.double() - ew).norm() / ew.norm() < 2e-2


def test_plain_conv2d_where_the_fast_backward_is_not_needed():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    # float32: PyTorch's own graph (no custom node)
    assert depthwise_conv2d(x, w, 1, 1).grad_fn.name() == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Depthwise" in depthwise_conv2d(x, w, 1, 1).grad_fn.name()
        with torch.no_grad():
            assert depthwise_conv2d(x, w, 1, 1).grad_fn is None


def test_rejects_a_weight_that_is_not_depthwise():
    with pytest.raises(ValueError, match=r"\(C, 1, k, k\) weight for 4 channels"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 2, 3, 3))


def test_same_conv_routes_only_depthwise_layers():
    assert SameConv2d(8, 8, 3, stride=2, groups=8).is_depthwise
    assert not SameConv2d(8, 16, 1).is_depthwise
    assert not SameConv2d(8, 8, 3, groups=2).is_depthwise


def test_lite0_training_gradients_under_bfloat16_match_pytorch_backward(monkeypatch):
    """A whole Lite0 step: the fast backward gives the parameter gradients PyTorch's gives."""
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=None).train()
    x = torch.randn(2, 3, 64, 64)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout draws
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours = grads()
    import mbdml.models.efficientnet as eff

    monkeypatch.setattr(eff, "depthwise_conv2d", lambda x, w, s, p, b=None: F.conv2d(x, w, b, s, p, 1, w.shape[0]))
    theirs = grads()
    assert len(ours) == len(theirs) > 50
    flat_o = torch.cat([g.flatten() for g in ours])
    flat_t = torch.cat([g.flatten() for g in theirs])
    assert (flat_o - flat_t).norm() / flat_t.norm() < 5e-2
    assert torch.nn.functional.cosine_similarity(flat_o, flat_t, dim=0) > 0.999


@pytest.mark.parametrize("depthwise,stride", [(False, 1), (True, 2), (True, 1)])
def test_conv_bn_folds_batchnorm_in_eval_mode_with_the_same_values_and_gradients(depthwise, stride):
    from mbdml.models.efficientnet import batch_norm, conv_bn

    torch.manual_seed(0)
    conv = SameConv2d(6, 6 if depthwise else 4, 3, stride=stride, groups=6 if depthwise else 1).double()
    bn = batch_norm(conv.out_channels).double()
    with torch.no_grad():  # statistics and affine parameters far from the identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64, requires_grad=True)
    bn.eval()
    folded, plain = conv_bn(conv, bn, x), bn(conv(x))
    torch.testing.assert_close(folded, plain)
    params = (x, conv.weight, bn.weight, bn.bias)
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(folded, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b)
    bn.train()  # training mode: the batch statistics, not folded
    torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)))


def test_lite0_eval_outputs_with_folded_batchnorm_match_the_layer_by_layer_network():
    import mbdml.models.efficientnet as eff

    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        folded = model(x)
        original = eff.conv_bn
        try:
            eff.conv_bn = lambda conv, bn, x: bn(conv(x))
            plain = model(x)
        finally:
            eff.conv_bn = original
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)
