"""The MbDML family: the kernel classifier's loss, Mixup, and the paper's three ways of
combining them, with plain softmax training as a reference point.

Notation of SPEC §4: G(f, N) are the NNGK log-probabilities of embedding f with
neighbour lists N; N_i the training neighbours of the un-mixed sample i; ``s`` =
``scale_mixup``; ``b`` = ``beta`` (a loss weight, not the Beta distribution).

=========  ==================================================================
nngk       NLL(G(f(x), N_i), y)
mixup      s * [lam CE(h(f(x~)), y_i) + (1 - lam) CE(h(f(x~)), y_p(i))]
mbdml1     b * NNGK loss + s * the Mixup loss            ("NNGK + Mixup")
mbdml2     s * [lam NLL(G(f(x~), N_i), y_i) + (1 - lam) NLL(G(f(x~), N_i), y_p(i))]
mbdml3     b * NNGK loss + the MbDML2 term               ("Mixup(NNGK) + NNGK")
softmax    CE(h(f(x)), y): plain supervised training, a reference point
=========  ==================================================================

The mixed samples of MbDML2 and MbDML3 use N_i by default; ``mixed_neighbours``
picks another rule (:mod:`mbdml.methods.mixed_neighbours`).

MbDML1 and MbDML3 evaluate their clean and mixed terms on the whole batch: two
forward passes per image. ``split_batch`` (ours) puts the clean term on one half of
the shuffled batch and mixes the other half among itself: one pass per image, so in a
fixed time budget they get as many epochs as Mixup, NNGK or MbDML2.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..mixup import MixedBatch, mixed_loss, mixup_batch
from .base import LossOutput, Method


def _dominant_labels(mixed: MixedBatch) -> torch.Tensor:
    return mixed.labels_a if mixed.lam >= 0.5 else mixed.labels_b


class _HeadMixin:
    """The mixup classifier h: a linear layer, or the authors' raw features as logits."""

    has_head: ClassVar[bool] = True

    def _make_head(self, embedding_dim: int, num_classes: int, kind: str) -> nn.Module:
        if kind == "features":
            if embedding_dim < num_classes:
                raise ConfigError(
                    f"--mixup_head features uses the {embedding_dim}-d embedding as logits, which needs at least "
                    f"{num_classes} dimensions (one per class); use --mixup_head linear or a larger --embedding_dim"
                )
            return nn.Identity()
        return nn.Linear(embedding_dim, num_classes)


class NNGKMethod(Method):
    """NNGK alone: NLL of the true class under the kernel classifier."""

    name = "nngk"
    uses_kernel_loss = True

    def forward(self, model, images, labels, indices, generator=None):
        f = model(images)
        loss, pred = self._nngk_clean(f, labels, indices)
        self._follow_centres(indices, f)
        return LossOutput(loss, {"nngk": loss.detach()}, pred, labels)


class SoftmaxMethod(_HeadMixin, Method):
    """Plain cross-entropy through a linear head: the supervised reference."""

    name = "softmax"

    def __init__(self, kernel, embedding_dim, num_classes, options=None):
        super().__init__(kernel, embedding_dim, num_classes, options)
        self.head = self._make_head(embedding_dim, num_classes, self.options.mixup_head)

    def forward(self, model, images, labels, indices, generator=None):
        logits = self.head(model(images))
        loss = self._ce(logits, labels)
        return LossOutput(loss, {"ce": loss.detach()}, logits.detach().argmax(1), labels)


class MixupMethod(_HeadMixin, Method):
    """Mixup with a classifier head, evaluated with the kernel classifier."""

    name = "mixup"
    uses_mixup = True

    def __init__(self, kernel, embedding_dim, num_classes, options=None):
        super().__init__(kernel, embedding_dim, num_classes, options)
        self.head = self._make_head(embedding_dim, num_classes, self.options.mixup_head)

    def _mixup_ce(self, f_mixed: torch.Tensor, mixed: MixedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(f_mixed)
        return mixed_loss(self._ce, logits, mixed.labels_a, mixed.labels_b, mixed.lam), logits.detach().argmax(1)

    def forward(self, model, images, labels, indices, generator=None):
        mixed = mixup_batch(images, labels, self.options.alpha, generator)
        f_mixed = model(mixed.inputs)
        ce, pred = self._mixup_ce(f_mixed, mixed)
        loss = self.options.scale_mixup * ce
        return LossOutput(loss, {"mixup_ce": ce.detach(), "lam": mixed.lam}, pred, _dominant_labels(mixed))


class MbDML1(MixupMethod):
    """NNGK + Mixup: b * NNGK(clean) + s * mixup cross-entropy."""

    name = "mbdml1"
    uses_kernel_loss = True
    can_split_batch = True

    def forward(self, model, images, labels, indices, generator=None):
        (_, y, idx), _, mixed, f, f_mixed = self._clean_and_mixed(model, images, labels, indices, generator)
        nngk, pred = self._nngk_clean(f, y, idx)
        ce, _ = self._mixup_ce(f_mixed, mixed)
        loss = self.options.beta * nngk + self.options.scale_mixup * ce
        self._follow_centres(idx, f)
        return LossOutput(loss, {"nngk": nngk.detach(), "mixup_ce": ce.detach(), "lam": mixed.lam}, pred, y)


class MbDML2(Method):
    """Mixup(NNGK): the kernel classifier's NLL on mixed samples, lambda-weighted."""

    name = "mbdml2"
    uses_kernel_loss = True
    uses_mixup = True

    def forward(self, model, images, labels, indices, generator=None):
        mixed = mixup_batch(images, labels, self.options.alpha, generator)
        f_mixed = model(mixed.inputs)
        term, pred, absent = self._mixed_nngk(f_mixed, indices, mixed)
        loss = self.options.scale_mixup * term
        parts = {"mixup_nngk": term.detach(), "mixed_class_absent": absent, "lam": mixed.lam}
        return LossOutput(loss, parts, pred, _dominant_labels(mixed))


class MbDML3(Method):
    """Mixup(NNGK) + NNGK: b * NNGK(clean) + s * the MbDML2 term."""

    name = "mbdml3"
    uses_kernel_loss = True
    uses_mixup = True
    can_split_batch = True

    def forward(self, model, images, labels, indices, generator=None):
        (_, y, idx), mixed_idx, mixed, f, f_mixed = self._clean_and_mixed(model, images, labels, indices, generator)
        nngk, pred = self._nngk_clean(f, y, idx)
        term, _, absent = self._mixed_nngk(f_mixed, mixed_idx, mixed)
        loss = self.options.beta * nngk + self.options.scale_mixup * term
        parts = {"nngk": nngk.detach(), "mixup_nngk": term.detach(), "mixed_class_absent": absent, "lam": mixed.lam}
        self._follow_centres(idx, f)
        return LossOutput(loss, parts, pred, y)
