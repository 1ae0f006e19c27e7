"""Residual networks used as embedding trunks.

Two families live here:

* :class:`SmallResNet`: a CIFAR-style "ResNet-9" that trains from scratch on a
  CPU in reasonable time (32x32 inputs; any input of at least 8x8 pixels works,
  e.g. 8x8 digits or 28x28 MNIST).
* :class:`ResNet` (:func:`resnet18`, :func:`resnet50`): the ImageNet layout with
  exactly torchvision's parameter names, so a torchvision checkpoint file
  (``resnet18-*.pth``, ``resnet50-*.pth``) loads into it.  The classifier ``fc``
  is removed: the trunk returns the post-ReLU, globally average-pooled feature
  (512-d for ResNet-18, 2048-d for ResNet-50), which is the paper's embedding.

:func:`load_pretrained` loads a local checkpoint into any of the trunks of this
package (nothing is ever downloaded).

Every trunk outputs a tensor of shape ``(B, feature_dim)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mbdml.errors import CheckpointError, ConfigError

__all__ = [
    "SmallResNet",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "load_pretrained",
    "describe_state_dict",
]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; pass e.g. {name}=3")
    return value


def drop_classifier_keys(state_dict: dict[str, Any], prefix: str) -> None:
    """Remove an ImageNet classifier's keys (``prefix`` + ...) from a state dict in place.

    The trunks here have no classifier, so a torchvision or EfficientNet checkpoint's
    ``fc.*`` / ``_fc.*`` entries are dropped while loading instead of failing.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def check_input(x: torch.Tensor, in_channels: int, arch: str) -> None:
    """A clear error for an input that is not (B, in_channels, H, W)."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ConfigError(
            f"{arch} expects input of shape (B, {in_channels}, H, W), got "
            f"{tuple(x.shape)}; build the model with the right in_channels or fix the data"
        )


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, identity for batch norm (as torchvision)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------
# SmallResNet (CIFAR-style ResNet-9)
# ----------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """3x3 convolution (no bias), batch norm, ReLU; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; ReLU after the sum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SmallStage(nn.Module):
    """Conv-BN-ReLU to widen, 2x2 max-pool to halve the size, one residual block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.block = ResidualBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(self.conv(x)))


class SmallResNet(nn.Module):
    """A ResNet-9-like network for small images, trained from scratch.

    Layout (``w = width``)::

        stem    conv3x3(in_channels -> w)   BN ReLU            H x W
        layer1  conv3x3(w  -> 2w) BN ReLU, maxpool 2, residual  H/2
        layer2  conv3x3(2w -> 4w) BN ReLU, maxpool 2, residual  H/4
        layer3  conv3x3(4w -> 8w) BN ReLU, maxpool 2, residual  H/8
        global average pool -> (B, 8w)

    ``feature_dim`` is ``8 * width`` (256 for the default width 32).  Inputs must
    be at least 8x8 pixels.  On a CPU the network is faster in
    ``channels_last`` memory format: call
    ``model.to(memory_format=torch.channels_last)``; the forward pass then
    converts its input to the same format.
    """

    min_input_size = 8

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.width = _check_positive_int("width", width)
        w = width
        self.stem = ConvBNReLU(in_channels, w)
        self.layer1 = SmallStage(w, 2 * w)
        self.layer2 = SmallStage(2 * w, 4 * w)
        self.layer3 = SmallStage(4 * w, 8 * w)
        self.feature_dim = 8 * w
        _init_weights(self)

    def stages(self) -> list[list[nn.Module]]:
        """The stem, then each stage, input side first (see ``freeze_stages``)."""
        return [[self.stem], [self.layer1], [self.layer2], [self.layer3]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x, 0), 0)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"SmallResNet expects input of shape (B, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}; build the model with in_channels={x.shape[1] if x.dim() == 4 else '?'}"
                " or fix the data"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ConfigError(
                f"SmallResNet needs inputs of at least {self.min_input_size}x{self.min_input_size} "
                f"pixels, got {x.shape[-2]}x{x.shape[-1]}; resize the images (input_size >= 8)"
            )

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The feature map after the stem and the first ``n`` stages (see :meth:`suffix`)."""
        self._check_input(x)
        if self.stem.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3)[:n]:
            x = layer(x)
        return x

    def suffix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of the trunk from :meth:`prefix`'s output: ``suffix(prefix(x, n), n) == forward(x)``."""
        for layer in (self.layer1, self.layer2, self.layer3)[n:]:
            x = layer(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# ----------------------------------------------------------------------------
# ImageNet ResNet with torchvision's parameter names
# ----------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); names as torchvision's."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck (ResNet-50), stride on the 3x3 as torchvision ("v1.5")."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet without its classifier, parameter names as torchvision's.

    ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` (blocks with ``conv1/bn1/conv2/bn2``
    and, for bottlenecks, ``conv3/bn3``; shortcuts ``downsample.0`` (conv) and
    ``downsample.1`` (BN)).  There is no ``fc``: ``forward`` returns the post-ReLU,
    globally average-pooled feature of size ``feature_dim``.  ``fc.*`` entries of a
    torchvision checkpoint are dropped when loading, so
    ``model.load_state_dict(torch.load("resnet50-0676ba61.pth"))`` works as is.

    torchvision's ImageNet weights were trained on inputs normalised with the
    ImageNet mean and std; the paper feeds them inputs normalised with
    mean = std = 0.5 and fine-tunes.
    """

    # the checkpoint keys that load_pretrained ignores, and the stem conv's weight
    ignored_checkpoint_prefixes: tuple[str, ...] = ("fc.",)
    stem_weight_key = "conv1.weight"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int] | tuple[int, ...],
        in_channels: int = 3,
        arch: str = "resnet",
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int("in_channels", in_channels)
        if len(layers) != 4:
            raise ConfigError(f"ResNet needs 4 stage depths, got {list(layers)}; e.g. [2, 2, 2, 2]")
        self.arch = arch
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * block.expansion
        _init_weights(self)

    def stages(self) -> list[list[nn.Module]]:
        """The stem, then each stage, input side first (see ``freeze_stages``)."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        drop_classifier_keys(state_dict, prefix + "fc.")  # a torchvision checkpoint's classifier
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The feature map after the stem and the first ``n`` stages (see :meth:`suffix`)."""
        check_input(x, self.in_channels, self.arch)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:n]:
            x = layer(x)
        return x

    def suffix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The rest of the trunk from :meth:`prefix`'s output: ``suffix(prefix(x, n), n) == forward(x)``."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[n:]:
            x = layer(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x, 0), 0)


def resnet18(in_channels: int = 3, pretrained: str | os.PathLike | None = None) -> ResNet:
    """ResNet-18 trunk (``feature_dim`` 512); ``pretrained`` is a local checkpoint path."""
    model = ResNet(BasicBlock, [2, 2, 2, 2], in_channels=in_channels, arch="resnet18")
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def resnet50(in_channels: int = 3, pretrained: str | os.PathLike | None = None) -> ResNet:
    """ResNet-50 trunk (``feature_dim`` 2048); ``pretrained`` is a local checkpoint path."""
    model = ResNet(Bottleneck, [3, 4, 6, 3], in_channels=in_channels, arch="resnet50")
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


# ----------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------

_RESNET_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """Guess, from its keys and shapes, which architecture a state dict is for."""
    keys = list(state_dict)
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in keys):
        n_blocks = len({k.split(".")[1] for k in keys if k.startswith("_blocks.")})
        head = state_dict.get("_conv_head.weight")
        extra = f", head {tuple(head.shape)[0]} channels" if hasattr(head, "shape") else ""
        lite = "" if any("_se_reduce" in k for k in keys) else " (Lite: no squeeze-excite)"
        return f"an EfficientNet{lite} with {n_blocks} MBConv blocks{extra}"
    if "layer1.0.conv1.weight" in state_dict:
        depths = []
        for i in range(1, 5):
            pat = re.compile(rf"^layer{i}\.(\d+)\.")
            depths.append(len({m.group(1) for k in keys if (m := pat.match(k))}))
        kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
        name = _RESNET_NAMES.get((kind, tuple(depths)))
        w = state_dict.get("layer1.0.conv2.weight")
        if name and hasattr(w, "shape") and kind == "bottleneck":
            if w.shape[1] != w.shape[0]:
                name = f"a ResNeXt variant of {name}"
            elif w.shape[0] != 64:
                name = f"a wide variant of {name}"
        c1 = state_dict.get("conv1.weight")
        chans = f", {c1.shape[1]} input channels" if hasattr(c1, "shape") and c1.dim() == 4 else ""
        desc = f"{kind} blocks {depths}{chans}"
        return f"{name} ({desc})" if name else f"a ResNet with {desc}"
    if "stem.conv.weight" in state_dict and "layer3.block.conv1.weight" in state_dict:
        w = state_dict["stem.conv.weight"]
        return f"an mbdml SmallResNet (width {w.shape[0]}, {w.shape[1]} input channels)"
    if any(k.startswith(("trunk.", "head.")) for k in keys):
        return "an mbdml EmbeddingNet (keys start with 'trunk.'; load it with load_state_dict)"
    return f"an unknown architecture (first keys: {', '.join(keys[:4])})"


def _model_name(model: nn.Module) -> str:
    return getattr(model, "arch", None) or type(model).__name__


def _read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path_s = os.fspath(path)
    if not os.path.isfile(path_s):
        raise CheckpointError(
            f"checkpoint file not found: {path_s!r}; pass the path of a local weights file "
            "(e.g. torchvision's resnet50-0676ba61.pth); nothing is downloaded"
        )
    try:
        obj = torch.load(path_s, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors alike
        raise CheckpointError(
            f"cannot read checkpoint {path_s!r}: {type(err).__name__}: {str(err)[:300]}; "
            "it must be a state dict saved with torch.save (tensors only)"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"checkpoint {path_s!r} holds a {type(obj).__name__}, not a state dict; save "
            "model.state_dict() (or a dict with a 'state_dict' or 'model' entry)"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path_s!r} is not a state dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained stem weight (out, c, k, k) -> (out, in_channels, k, k).

    The weight is averaged over its input channels and repeated ``in_channels``
    times, then scaled by ``c / in_channels`` so that an image whose channels are
    all equal gives the same response as the pretrained net on that grey image
    copied to all ``c`` channels (the frozen BatchNorm statistics stay valid).
    """
    c = weight.shape[1]
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (c / in_channels)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local checkpoint into a trunk of this package; returns ``model``.

    ``path`` holds a plain state dict, or a dict with a ``"state_dict"`` or
    ``"model"`` entry; ``"module."`` prefixes (DataParallel) are stripped.  Keys
    under ``model.ignored_checkpoint_prefixes`` (``fc.`` for ResNet, ``_fc.`` for
    EfficientNet) are ignored.  Missing ``num_batches_tracked`` buffers (old
    torchvision files) are kept at their current value.

    When the model has ``in_channels != 3`` and the checkpoint's stem convolution
    has 3, the stem weight is averaged over its input channels, repeated
    ``in_channels`` times and scaled by ``3 / in_channels`` (see
    :func:`_adapt_stem`).

    Raises :class:`~mbdml.errors.CheckpointError` when the file is missing or
    unreadable, or when a backbone key is missing, unexpected or of the wrong
    shape (the message says which architecture the file seems to be for).
    """
    path_s = os.fspath(path)
    state = _read_checkpoint(path_s)
    ignored = tuple(getattr(model, "ignored_checkpoint_prefixes", ("fc.",)))
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    own = model.state_dict()

    stem_key = getattr(model, "stem_weight_key", None)
    if stem_key and stem_key in state and stem_key in own:
        src, dst = state[stem_key], own[stem_key]
        if src.dim() == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
            if src.shape[1] != dst.shape[1]:
                state[stem_key] = _adapt_stem(src, dst.shape[1])

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            problems.append(
                f"{len(wrong)} keys of the wrong shape, file vs model (e.g. {'; '.join(wrong[:3])})"
            )
        raise CheckpointError(
            f"checkpoint {path_s!r} does not fit {_model_name(model)}: {', '.join(problems)}. "
            f"The file seems to be for {describe_state_dict(state)}; pick the model that "
            "matches it, or the checkpoint that matches the model"
        )
    for k in own:
        if k not in state:  # num_batches_tracked only
            state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model
