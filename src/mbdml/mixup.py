"""Mixup (Zhang et al., ICLR 2018): mixing a batch, and the loss of a mixed prediction.

One lambda ~ Beta(alpha, alpha) per batch; a random permutation pairs each sample i
with p(i); inputs are mixed after augmentation and normalisation,
x~ = lambda x_i + (1 - lambda) x_p(i), and a prediction on x~ is scored
lambda L(pred, y_i) + (1 - lambda) L(pred, y_p(i)). ``alpha = 0`` turns mixing off
(lambda = 1). All randomness comes from an explicit ``torch.Generator`` so a run is
reproducible from its seed and resumable from a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError


def _standard_gamma(shape: float, generator: torch.Generator | None) -> float:
    """One Gamma(shape, 1) draw (Marsaglia and Tsang), driven by ``generator``."""
    if shape < 1.0:
        # Gamma(a) = Gamma(a + 1) * U^(1/a)
        u = float(torch.rand((), generator=generator))
        return _standard_gamma(shape + 1.0, generator) * max(u, 1e-300) ** (1.0 / shape)
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn((), generator=generator))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=generator))
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """lambda ~ Beta(alpha, alpha); alpha = 0 gives 1 (no mixing)."""
    if alpha < 0 or not math.isfinite(alpha):
        raise ConfigError(f"mixup alpha must be >= 0 (0 turns mixing off), got {alpha}; pass --alpha 1 (the paper's value)")
    if alpha == 0:
        return 1.0
    a = _standard_gamma(alpha, generator)
    b = _standard_gamma(alpha, generator)
    return a / (a + b) if a + b > 0 else 0.5


@dataclass
class MixedBatch:
    """A mixed batch: inputs, both label sets, lambda and the pairing."""

    inputs: torch.Tensor
    labels_a: torch.Tensor  # y_i
    labels_b: torch.Tensor  # y_p(i)
    lam: float
    permutation: torch.Tensor  # p


def mix(inputs: torch.Tensor, lam: float, permutation: torch.Tensor) -> torch.Tensor:
    """lambda x_i + (1 - lambda) x_p(i) for every i."""
    if lam == 1.0:
        return inputs
    return inputs.mul(lam).add_(inputs[permutation], alpha=1.0 - lam)


def mixup_batch(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Draw lambda and a pairing, and mix a (normalised, augmented) batch."""
    lam = sample_lambda(alpha, generator)
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    return MixedBatch(mix(inputs, lam, perm), labels, labels[perm], lam, perm)


def mixed_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prediction: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """lambda L(pred, y_a) + (1 - lambda) L(pred, y_b)."""
    if lam == 1.0:
        return loss_fn(prediction, labels_a)
    return lam * loss_fn(prediction, labels_a) + (1.0 - lam) * loss_fn(prediction, labels_b)


class MixupLoss(torch.nn.Module):
    """Wraps any ``loss(prediction, labels)`` into the lambda-weighted mixed loss.

    >>> crit = MixupLoss(torch.nn.CrossEntropyLoss())
    >>> loss = crit(logits, mixed.labels_a, mixed.labels_b, mixed.lam)
    """

    def __init__(self, base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base = base

    def forward(self, prediction: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, lam: float) -> torch.Tensor:
        return mixed_loss(self.base, prediction, labels_a, labels_b, lam)
