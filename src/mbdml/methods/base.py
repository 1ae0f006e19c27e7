"""What every method shares: its options, its output, and the base class.

A method is an ``nn.Module`` so its own parameters (the mixup head h, the kernel
weights, a baseline's proxies) are saved and optimised with the model. It needs no
trainer: ``method(model, images, labels, indices, generator)`` is all one step asks,
and returns a :class:`LossOutput`. The base class holds the terms several methods
are built from: the clean NNGK loss, the mixed samples' NNGK loss (their neighbour
lists from a :mod:`~mbdml.methods.mixed_neighbours` rule), and the split of one batch
between a clean and a mixed term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernel import NNGKClassifier
from ..mixup import MixedBatch, mixed_loss, mixup_batch
from .mixed_neighbours import class_absent_share, mixed_neighbour_rule

MIXUP_HEADS = ("linear", "features")


@dataclass
class MethodOptions:
    """Weights and choices shared by the methods (SPEC §3-4)."""

    scale_mixup: float = 1.0  # s
    beta: float = 1.0  # b, weight of the clean NNGK loss in MbDML1/3
    alpha: float = 1.0  # Beta(alpha, alpha); 0 turns mixing off
    mixup_head: str = "linear"  # "linear": h is a linear layer; "features": the authors' raw features as logits
    mixed_neighbours: str = "sample"  # neighbours of a mixed sample: "sample" (N_i), "union" (N_i u N_p(i)), "search"
    centre_momentum: float | None = None  # None: centres only change at refresh (SPEC); m: c_i <- m c_i + (1 - m) f_i after each step
    label_smoothing: float = 0.0  # epsilon of label smoothing, for the NNGK and the cross-entropy terms
    pseudo_weight: float = 1.0  # mbdml_semi, mbdml1_semi: weight of the NNGK loss of the pseudo-labelled images
    # MbDML1/3 and the semi-supervised methods: the clean term on one half of each batch, the
    # mixed term on the other half (one forward pass per image, a Mixup step's cost)
    # instead of both on the whole batch
    split_batch: bool = False

    def __post_init__(self) -> None:
        if self.mixup_head not in MIXUP_HEADS:
            raise ConfigError(f"unknown mixup head {self.mixup_head!r}; choose one of {', '.join(MIXUP_HEADS)}")
        mixed_neighbour_rule(self.mixed_neighbours)  # a ConfigError for an unknown rule
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0 (0 turns mixing off), got {self.alpha}; pass --alpha 1")
        if self.centre_momentum is not None and not 0 <= self.centre_momentum < 1:
            raise ConfigError(f"centre_momentum must be in [0, 1) (or none), got {self.centre_momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}; pass --label_smoothing 0.1, say")
        if self.pseudo_weight < 0:
            raise ConfigError(f"pseudo_weight must be >= 0, got {self.pseudo_weight}")
        if self.scale_mixup < 0 or self.beta < 0:
            raise ConfigError(f"loss weights must be >= 0, got scale_mixup={self.scale_mixup}, beta={self.beta}")


@dataclass
class LossOutput:
    """A step's loss, its named parts (detached scalars, for logging) and training predictions."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor | float] = field(default_factory=dict)
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None


EmbeddingModel = Callable[[torch.Tensor], torch.Tensor]


def smoothed_nll(log_probs: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """NLL of log-probabilities with label smoothing: (1 - e) NLL + e * mean over classes of -log p."""
    nll = F.nll_loss(log_probs, labels)
    if smoothing == 0.0:
        return nll
    return (1.0 - smoothing) * nll - smoothing * log_probs.mean(1).mean()


class Method(nn.Module):
    """Base class: owns the kernel classifier (used by every method for evaluation)."""

    name: ClassVar[str] = ""
    uses_kernel_loss: ClassVar[bool] = False  # kernel weights are trained
    uses_mixup: ClassVar[bool] = False
    uses_unlabelled: ClassVar[bool] = False  # the trainer feeds it pseudo-labelled images
    can_split_batch: ClassVar[bool] = False  # has a clean and a mixed term that ``split_batch`` can share a batch between
    has_head: ClassVar[bool] = False  # has a classifier head ``self.head`` (embeddings to class logits)

    def __init__(self, kernel: NNGKClassifier, embedding_dim: int, num_classes: int, options: MethodOptions | None = None) -> None:
        super().__init__()
        self.kernel = kernel
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.options = options or MethodOptions()
        self.mixed_neighbour_rule = mixed_neighbour_rule(self.options.mixed_neighbours)
        if not self.uses_kernel_loss:
            kernel.log_weights.requires_grad_(False)

    def forward(
        self,
        model: EmbeddingModel,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The loss of one batch. ``indices`` are the samples' centre indices."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _clean_and_mixed(
        self, model: EmbeddingModel, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, MixedBatch, torch.Tensor, torch.Tensor]:
        """For a clean term and a mixed term: ((clean images, labels, indices), the mixed
        samples' indices, the mixed batch, clean embeddings, mixed embeddings), in one forward pass.

        By default (the paper's) both terms see the whole batch: two passes per image.
        With ``split_batch`` the first half of the (shuffled) batch is the clean part and
        the second half is mixed among itself: one pass per image, as in a Mixup step.
        """
        clean = rest = (images, labels, indices)
        if self.options.split_batch and images.shape[0] >= 4:
            half = images.shape[0] // 2
            clean = (images[:half], labels[:half], indices[:half])
            rest = (images[half:], labels[half:], indices[half:])
        mixed = mixup_batch(rest[0], rest[1], self.options.alpha, generator)
        both = model(torch.cat([clean[0], mixed.inputs]))
        n = clean[0].shape[0]
        return clean, rest[2], mixed, both[:n], both[n:]

    def _nll(self, log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return smoothed_nll(log_p, labels, self.options.label_smoothing)

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.options.label_smoothing)

    def _nngk_clean(self, f: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = self.kernel.log_probs(f, self.kernel.training_neighbours(indices))
        return self._nll(log_p, labels), log_p.detach().argmax(1)

    def _follow_centres(self, indices: torch.Tensor, f: torch.Tensor) -> None:
        """With ``centre_momentum``, move these images' centres towards their embeddings.

        Called last in a step: the kernel writes the move at its next read of the
        centres, and a read later in the same step would change centres that this
        step's backward pass still needs.
        """
        if self.training and self.options.centre_momentum is not None:
            self.kernel.update_centres(indices, f.detach(), self.options.centre_momentum)

    def _mixed_nngk(self, f_mixed: torch.Tensor, indices: torch.Tensor, mixed: MixedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The lambda-weighted NNGK loss of the mixed samples, their predictions, and the
        share of them whose neighbour list lacks one of their two classes."""
        lists = self.mixed_neighbour_rule(self.kernel, f_mixed, indices, mixed.permutation)
        log_p = self.kernel.log_probs(f_mixed, lists.neighbours, lists.valid)
        loss = mixed_loss(self._nll, log_p, mixed.labels_a, mixed.labels_b, mixed.lam)
        absent = class_absent_share(self.kernel.centre_labels, lists.neighbours, lists.valid, mixed.labels_a, mixed.labels_b)
        return loss, log_p.detach().argmax(1), absent
