"""A depthwise convolution whose backward pass is fast on CPUs in bfloat16.

PyTorch's CPU kernels (oneDNN) compute the forward pass of a depthwise convolution
quickly in any precision, but two of its gradients fall onto slow paths in bfloat16:
the input gradient of a strided convolution and the weight gradient of a 5x5 kernel,
30-100 ms each at batch 64 where the forward pass takes 0.4-2 ms
(``benchmarks/depthwise_backward.py``). In
EfficientNet-Lite0's trainable stages they made the backward pass about 8 times the
forward pass.

Both gradients can be written as forward depthwise convolutions, which are fast:

- input gradient: the output gradient, spread out to the input's stride (zeros between
  its values), correlated with the kernel turned by 180 degrees;
- weight gradient: with the batch folded into the channels, each image's input
  correlated with its own output gradient (a depthwise convolution whose kernel is the
  output gradient), then summed over the batch.

:func:`depthwise_conv2d` computes the forward pass as usual and uses these forms for
the slow cases only (reduced precision on a CPU); float32 and GPUs keep PyTorch's own
backward. The gradients agree with PyTorch's to bfloat16 rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["depthwise_conv2d", "depthwise_grad_input", "depthwise_grad_weight"]


def depthwise_grad_input(
    grad_out: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, input_hw: tuple[int, int]
) -> torch.Tensor:
    """Gradient of a depthwise convolution with respect to its input, as a forward convolution."""
    n, c, ho, wo = grad_out.shape
    k = weight.shape[-1]
    lead = k - 1 - padding
    if lead < 0:
        raise ValueError(f"padding {padding} larger than kernel size - 1 ({k - 1})")
    h, w = input_hw
    # rows/columns of the (padded) input that no output reads get no gradient
    tail_h = h + 2 * padding - ((ho - 1) * stride + k)
    tail_w = w + 2 * padding - ((wo - 1) * stride + k)
    flipped = weight.flip(-1, -2)
    if stride == 1 and tail_h == 0 and tail_w == 0:
        return F.conv2d(grad_out, flipped, None, 1, lead, 1, c)
    fmt = torch.channels_last if grad_out.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    spread = torch.zeros(
        (n, c, (ho - 1) * stride + 1 + 2 * lead + tail_h, (wo - 1) * stride + 1 + 2 * lead + tail_w),
        dtype=grad_out.dtype,
        device=grad_out.device,
    ).contiguous(memory_format=fmt)
    spread[:, :, lead : lead + (ho - 1) * stride + 1 : stride, lead : lead + (wo - 1) * stride + 1 : stride] = grad_out
    return F.conv2d(spread, flipped, None, 1, 0, 1, c)


def depthwise_grad_weight(
    grad_out: torch.Tensor, x: torch.Tensor, stride: int, padding: int, kernel_size: int
) -> torch.Tensor:
    """Gradient of a depthwise convolution with respect to its (C, 1, k, k) weight, summed in float32 or wider."""
    n, c, ho, wo = grad_out.shape
    h, w = x.shape[-2:]
    # batch folded into channels: channel (i, c) of image i is correlated with its own
    # output gradient, dilated by the stride; the k x k result is summed over images
    folded = x.reshape(1, n * c, h, w)
    kernels = grad_out.reshape(n * c, 1, ho, wo)
    out = F.conv2d(folded, kernels, None, 1, padding, stride, n * c)
    out = out.view(n, c, *out.shape[-2:])[:, :, :kernel_size, :kernel_size]
    return out.sum(0, dtype=torch.promote_types(out.dtype, torch.float32)).unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:  # type: ignore[override]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            xc, wc = x.to(dtype), weight.to(dtype)
        else:
            xc, wc = x, weight.to(x.dtype)
        with torch.autocast(device_type, enabled=False):
            out = F.conv2d(xc, wc, None, stride, padding, 1, wc.shape[0])
        ctx.save_for_backward(xc, wc)
        ctx.stride, ctx.padding = stride, padding
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        xc, wc = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        c, k = wc.shape[0], wc.shape[-1]
        grad_out = grad_out.to(xc.dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        # PyTorch's own kernels where they are fast: a stride-1 input gradient, a 3x3 weight gradient
        aten_mask = [need_x and s == 1, need_w and k <= 3, False]
        if any(aten_mask):
            ax, aw, _ = torch.ops.aten.convolution_backward(
                grad_out, xc, wc, None, [s, s], [p, p], [1, 1], False, [0, 0], c, aten_mask
            )
            gx = ax if aten_mask[0] else None
            gw = aw if aten_mask[1] else None
        if need_x and gx is None:
            gx = depthwise_grad_input(grad_out, wc, s, p, (xc.shape[-2], xc.shape[-1]))
        if need_w and gw is None:
            gw = depthwise_grad_weight(grad_out, xc, s, p, k)
        gx = gx.to(ctx.x_dtype) if gx is not None else None
        gw = gw.to(ctx.w_dtype) if gw is not None else None
        return gx, gw, None, None


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=channels)`` with a fast CPU backward.

    ``weight`` is (C, 1, k, k) for an input of C channels; square kernels, equal stride
    and padding on both axes. The fast backward is used where it is needed
    (a CPU, bfloat16 or float16 computation, gradients wanted); otherwise this is
    exactly ``F.conv2d``.
    """
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1] or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"depthwise_conv2d needs a (C, 1, k, k) weight for {x.shape[1]} channels, got {tuple(weight.shape)}")
    device_type = x.device.type
    low_precision = (
        torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in (torch.bfloat16, torch.float16)
    ) or x.dtype in (torch.bfloat16, torch.float16)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if device_type != "cpu" or not low_precision or not wants_grad:  # a bias-only gradient is cheap in PyTorch's
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])
    out = _DepthwiseConv2d.apply(x, weight, stride, padding)
    return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)
