"""The semi-supervised methods (ours, SPEC §8): MbDML that also trains on unlabelled
images pseudo-labelled by the kernel classifier, each labelled image mixed with one.

``mbdml_semi`` is MbDML3 + w * NNGK(u) with the mixed term through the kernel;
``mbdml1_semi`` is MbDML1 + w * NNGK(u) with the mixed term through the head h. Given
no pseudo-labelled images (the warm-up) each is exactly its supervised method. Which
images get a pseudo-label, and from what, is the trainer's business
(:data:`PSEUDO_LABELLERS`, ``RunConfig.pseudo_labeller``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kernel import NNGKClassifier
from ..mixup import mixed_loss, sample_lambda
from .base import EmbeddingModel, LossOutput, MethodOptions
from .mbdml import MbDML1, MbDML3
from .mixed_neighbours import MixedNeighbourRule, class_absent_share

# what labels the unlabelled images of the semi-supervised methods (see RunConfig.pseudo_labeller)
PSEUDO_LABELLERS = ("kernel", "kernel_all", "head", "mean")


@dataclass
class PseudoBatch:
    """Unlabelled images with pseudo-labels from the kernel classifier (``mbdml_semi``, ``mbdml1_semi``).

    ``neighbours`` are each image's K nearest centres, found when it was pseudo-labelled.
    """

    images: torch.Tensor
    labels: torch.Tensor
    neighbours: torch.Tensor


@dataclass
class _SemiParts:
    """The embeddings of one semi-supervised step and what each term needs."""

    f: torch.Tensor  # clean labelled images
    labels: torch.Tensor
    indices: torch.Tensor
    f_pseudo: torch.Tensor  # clean pseudo-labelled images
    pseudo_labels: torch.Tensor
    pseudo_neighbours: torch.Tensor
    f_mixed: torch.Tensor  # lam x + (1 - lam) u, labelled image x paired with pseudo-labelled image u
    mixed_labels: torch.Tensor
    mixed_indices: torch.Tensor
    mixed_pseudo_labels: torch.Tensor
    mixed_pseudo_neighbours: torch.Tensor
    lam: float


class _SemiSupervisedMixin:
    """Shared by the semi-supervised methods: one forward pass for the clean labelled,
    clean pseudo-labelled and mixed (labelled x pseudo-labelled) images.

    By default every labelled image x_i and every pseudo-labelled image u_i appears
    clean and in the mix x~_i = lam x_i + (1 - lam) u_i (three passes per labelled
    image). With ``split_batch`` the first halves of both batches are the clean parts
    and the second halves are mixed pairwise: 1.5 passes per labelled image.

    The pseudo-labelled batch may hold r times as many images as the labelled one
    (``pseudo_ratio``): the labelled images of the mix are then repeated r times, so
    each is paired with r pseudo-labelled images, and every pseudo-labelled image is
    still used once, clean or mixed (r + 0.5 passes per labelled image with
    ``split_batch``, 2r + 1 without).
    """

    options: MethodOptions
    kernel: NNGKClassifier
    mixed_neighbour_rule: MixedNeighbourRule
    uses_unlabelled = True
    mixed_term_name: ClassVar[str] = ""

    def forward(self, model, images, labels, indices, generator=None, pseudo: PseudoBatch | None = None):
        if pseudo is None or pseudo.images.shape[0] == 0:  # the warm-up: the supervised method
            return super().forward(model, images, labels, indices, generator)  # type: ignore[misc]
        p = self._semi_parts(model, images, labels, indices, pseudo, generator)
        nngk, pred = self._nngk_clean(p.f, p.labels, p.indices)  # type: ignore[attr-defined]
        nngk_u = self._nll(self.kernel.log_probs(p.f_pseudo, p.pseudo_neighbours), p.pseudo_labels)  # type: ignore[attr-defined]
        term, diagnostics = self._mixed_term(p)
        loss = self.options.beta * nngk + self.options.pseudo_weight * nngk_u + self.options.scale_mixup * term
        parts = {"nngk": nngk.detach(), "pseudo_nngk": nngk_u.detach(), self.mixed_term_name: term.detach(), **diagnostics, "lam": p.lam}
        self._follow_centres(p.indices, p.f)  # type: ignore[attr-defined]
        return LossOutput(loss, parts, pred, p.labels)

    def _mixed_term(self, p: _SemiParts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The lambda-weighted loss of the mixed (labelled x pseudo-labelled) images, and
        any diagnostics to log beside it."""
        raise NotImplementedError

    def _semi_parts(self, model: EmbeddingModel, images, labels, indices, pseudo: PseudoBatch, generator) -> _SemiParts:
        b, n_u = images.shape[0], pseudo.images.shape[0]
        if n_u % b:
            raise ValueError(
                f"the pseudo-labelled batch has {n_u} images for {b} labelled ones: it must hold a whole number of "
                "times as many (the trainer draws pseudo_ratio times the labelled batch)"
            )
        ratio = n_u // b
        lab = (images, labels, indices)
        unl = (pseudo.images, pseudo.labels, pseudo.neighbours)
        clean_l = mix_l = lab
        clean_u = mix_u = unl
        if self.options.split_batch and b >= 4:
            half = b // 2
            n_mixed = (b - half) * ratio
            clean_l, mix_l = tuple(t[:half] for t in lab), tuple(t[half:] for t in lab)
            clean_u, mix_u = tuple(t[: n_u - n_mixed] for t in unl), tuple(t[n_u - n_mixed :] for t in unl)
        if ratio > 1:  # each labelled image of the mix meets `ratio` pseudo-labelled ones
            mix_l = tuple(torch.cat([t] * ratio) for t in mix_l)
        lam = sample_lambda(self.options.alpha, generator)
        mixed_inputs = mix_l[0] * lam + mix_u[0] * (1.0 - lam)
        f_all = model(torch.cat([clean_l[0], clean_u[0], mixed_inputs]))
        n_l, n_u = clean_l[0].shape[0], clean_u[0].shape[0]
        return _SemiParts(
            f_all[:n_l], clean_l[1], clean_l[2],
            f_all[n_l : n_l + n_u], clean_u[1], clean_u[2],
            f_all[n_l + n_u :], mix_l[1], mix_l[2], mix_u[1], mix_u[2],
            lam,
        )  # fmt: skip


class MbDMLSemi(_SemiSupervisedMixin, MbDML3):
    """MbDML3 that also learns from unlabelled images pseudo-labelled by the kernel classifier.

    With a :class:`PseudoBatch` ``u`` (as many images as the labelled batch, or
    ``pseudo_ratio`` times as many), each labelled image x_i is mixed with the
    pseudo-labelled image u_i:

        b * NNGK(x) + w * NNGK(u, pseudo labels) + s * [lam NLL(G(f(x~), N), y) + (1 - lam) NLL(G(f(x~), N), y_u)]

    with x~ = lam x + (1 - lam) u. N is the labelled sample's training list
    (``mixed_neighbours`` "sample"), or the union of both images' lists ("union" and
    "search"; the labelled image's own centre is always left out). Before any image
    is pseudo-labelled (the warm-up) it is exactly MbDML3. The trainer picks the
    confident images at each refresh (``pseudo_threshold``, ``pseudo_start``).
    """

    name = "mbdml_semi"
    mixed_term_name = "mixup_nngk"

    def _mixed_term(self, p: _SemiParts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lists = self.mixed_neighbour_rule.with_pseudo_labelled(self.kernel, p.mixed_indices, p.mixed_pseudo_neighbours)
        log_p = self.kernel.log_probs(p.f_mixed, lists.neighbours, lists.valid)
        absent = class_absent_share(self.kernel.centre_labels, lists.neighbours, lists.valid, p.mixed_labels, p.mixed_pseudo_labels)
        return mixed_loss(self._nll, log_p, p.mixed_labels, p.mixed_pseudo_labels, p.lam), {"mixed_class_absent": absent}


class MbDML1Semi(_SemiSupervisedMixin, MbDML1):
    """MbDML1 (NNGK + Mixup) that also learns from pseudo-labelled unlabelled images.

    With a :class:`PseudoBatch` ``u`` (as many images as the labelled batch, or
    ``pseudo_ratio`` times as many), each labelled image x_i is mixed with the
    pseudo-labelled image u_i and the mixup head h is trained on the pair's labels:

        b * NNGK(x) + w * NNGK(u, pseudo labels) + s * [lam CE(h(f(x~)), y) + (1 - lam) CE(h(f(x~)), y_u)]

    with x~ = lam x + (1 - lam) u. Before any image is pseudo-labelled it is exactly
    MbDML1. With ``split_batch`` it costs 1.5 forward passes per labelled image.
    """

    name = "mbdml1_semi"
    mixed_term_name = "mixup_ce"

    def _mixed_term(self, p: _SemiParts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return mixed_loss(self._ce, self.head(p.f_mixed), p.mixed_labels, p.mixed_pseudo_labels, p.lam), {}
