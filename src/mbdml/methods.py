"""The training methods: each turns (model, batch) into a loss.

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

and two semi-supervised methods (ours, SPEC §8) that also train on unlabelled images u
pseudo-labelled by the kernel classifier, each labelled image mixed with one of them:
``mbdml_semi`` (MbDML3 + w * NNGK(u) with the mixed term through the kernel) and
``mbdml1_semi`` (MbDML1 + w * NNGK(u) with the mixed term through the head h).

MbDML1 and MbDML3 (and the semi-supervised methods) evaluate their clean and mixed
terms on the whole batch: two forward passes per image. ``split_batch`` (ours) puts the
clean term on one half of the shuffled batch and mixes the other half among itself: one
pass per image, so in a fixed time budget they get as many epochs as Mixup, NNGK or
MbDML2.

plus the paper's pytorch-metric-learning baselines (contrastive, proxyanchor,
softtriple, supcon, triplet), trained on the same backbone and evaluated with the
same (untrained-weight) kernel classifier and k-NN.

A method is an ``nn.Module`` so its own parameters (the mixup head h, the kernel
weights, a baseline's proxies) are saved and optimised with the model. It needs no
trainer: ``method(model, images, labels, indices, generator)`` is all one step asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernel import NNGKClassifier
from .mixup import MixedBatch, mixed_loss, mixup_batch, sample_lambda

MIXUP_HEADS = ("linear", "features")
MIXED_NEIGHBOURS = ("sample", "union", "search")
# what labels the unlabelled images of the semi-supervised methods (see RunConfig.pseudo_labeller)
PSEUDO_LABELLERS = ("kernel", "kernel_all", "head", "mean")


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
        if self.mixed_neighbours not in MIXED_NEIGHBOURS:
            raise ConfigError(f"unknown mixed-sample neighbour rule {self.mixed_neighbours!r}; choose one of {', '.join(MIXED_NEIGHBOURS)}")
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


@dataclass
class PseudoBatch:
    """Unlabelled images with pseudo-labels from the kernel classifier (``mbdml_semi``, ``mbdml1_semi``).

    ``neighbours`` are each image's K nearest centres, found when it was pseudo-labelled.
    """

    images: torch.Tensor
    labels: torch.Tensor
    neighbours: torch.Tensor


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
        if self.training and self.options.centre_momentum is not None:
            self.kernel.update_centres(indices, f.detach(), self.options.centre_momentum)
        return self._nll(log_p, labels), log_p.detach().argmax(1)

    def _mixed_neighbour_lists(self, f_mixed: torch.Tensor, indices: torch.Tensor, mixed: MixedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Neighbour lists (and a validity mask) for the mixed samples."""
        rule = self.options.mixed_neighbours
        own_a = indices
        own_b = indices[mixed.permutation]
        if rule == "sample":  # the authors' choice: sample i's list
            return self.kernel.training_neighbours(own_a), None
        if rule == "search":  # a fresh search, both source images' centres excluded
            exclude = torch.stack([own_a, own_b], 1)
            return self.kernel.neighbours(f_mixed, exclude=exclude), None
        # union of both lists, duplicates and both own centres dropped
        merged = torch.cat([self.kernel.training_neighbours(own_a), self.kernel.training_neighbours(own_b)], 1)
        merged, _ = merged.sort(dim=1)
        valid = torch.ones_like(merged, dtype=torch.bool)
        valid[:, 1:] = merged[:, 1:] != merged[:, :-1]
        valid &= (merged != own_a.unsqueeze(1)) & (merged != own_b.unsqueeze(1))
        return merged, valid

    def _mixed_nngk(self, f_mixed: torch.Tensor, indices: torch.Tensor, mixed: MixedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The lambda-weighted NNGK loss of the mixed samples, their predictions, and the
        share of them whose neighbour list lacks one of their two classes."""
        nbrs, valid = self._mixed_neighbour_lists(f_mixed, indices, mixed)
        log_p = self.kernel.log_probs(f_mixed, nbrs, valid)
        loss = mixed_loss(self._nll, log_p, mixed.labels_a, mixed.labels_b, mixed.lam)
        absent = class_absent_share(self.kernel.centre_labels, nbrs, valid, mixed.labels_a, mixed.labels_b)
        return loss, log_p.detach().argmax(1), absent


def class_absent_share(
    centre_labels: torch.Tensor, neighbours: torch.Tensor, valid: torch.Tensor | None, labels_a: torch.Tensor, labels_b: torch.Tensor
) -> torch.Tensor:
    """The share of mixed samples whose neighbour list holds no centre of ``labels_a``
    or none of ``labels_b``.

    The kernel classifier gives such a class only its floor probability (1e-10), so
    that part of the mixed loss is a constant with no gradient. With the authors'
    lists (``mixed_neighbours`` "sample") this happens to most mixed pairs once
    training has separated the classes: logged as ``mixed_class_absent``."""
    neighbour_labels = centre_labels.index_select(0, neighbours.reshape(-1)).view_as(neighbours)
    has_a = neighbour_labels == labels_a.unsqueeze(1)
    has_b = neighbour_labels == labels_b.unsqueeze(1)
    if valid is not None:
        has_a &= valid
        has_b &= valid
    return (~(has_a.any(1) & has_b.any(1))).float().mean()


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
        return LossOutput(loss, parts, pred, y)


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
        own = self.kernel.training_neighbours(p.mixed_indices)
        if self.options.mixed_neighbours == "sample":
            nbrs, valid = own, None
        else:
            nbrs, _ = torch.cat([own, p.mixed_pseudo_neighbours], 1).sort(dim=1)
            valid = torch.ones_like(nbrs, dtype=torch.bool)
            valid[:, 1:] = nbrs[:, 1:] != nbrs[:, :-1]
            valid &= nbrs != p.mixed_indices.unsqueeze(1)
        log_p = self.kernel.log_probs(p.f_mixed, nbrs, valid)
        absent = class_absent_share(self.kernel.centre_labels, nbrs, valid, p.mixed_labels, p.mixed_pseudo_labels)
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


class MetricLearningBaseline(Method):
    """A pytorch-metric-learning loss on the embeddings (the paper's baselines)."""

    def __init__(self, kernel, embedding_dim, num_classes, options=None):
        super().__init__(kernel, embedding_dim, num_classes, options)
        self.loss_fn = self.make_loss(embedding_dim, num_classes)

    def make_loss(self, embedding_dim: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, model, images, labels, indices, generator=None):
        f = model(images)
        loss = self.loss_fn(f, labels)
        return LossOutput(loss, {self.name: loss.detach()})


def _pml_losses():
    try:
        from pytorch_metric_learning import losses
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("the baseline losses need pytorch-metric-learning: pip install pytorch-metric-learning") from exc
    return losses


class ContrastiveBaseline(MetricLearningBaseline):
    name = "contrastive"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)


class ProxyAnchorBaseline(MetricLearningBaseline):
    name = "proxyanchor"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().ProxyAnchorLoss(num_classes, embedding_dim, margin=0.1, alpha=32)


class SoftTripleBaseline(MetricLearningBaseline):
    name = "softtriple"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().SoftTripleLoss(num_classes, embedding_dim, centers_per_class=10, la=20, gamma=0.1, margin=0.01)


class SupConBaseline(MetricLearningBaseline):
    name = "supcon"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().SupConLoss(temperature=0.1)


class TripletBaseline(MetricLearningBaseline):
    name = "triplet"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().TripletMarginLoss(margin=0.1)


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        NNGKMethod,
        MixupMethod,
        MbDML1,
        MbDML2,
        MbDML3,
        MbDMLSemi,
        MbDML1Semi,
        SoftmaxMethod,
        ContrastiveBaseline,
        ProxyAnchorBaseline,
        SoftTripleBaseline,
        SupConBaseline,
        TripletBaseline,
    )
}
PAPER_METHODS = ("nngk", "mixup", "mbdml1", "mbdml2", "mbdml3")
SEMI_SUPERVISED = ("mbdml_semi", "mbdml1_semi")
BASELINES = ("contrastive", "proxyanchor", "softtriple", "supcon", "triplet")


def build_method(name: str, kernel: NNGKClassifier, embedding_dim: int, num_classes: int, options: MethodOptions | None = None) -> Method:
    """A method by its registry name (case-insensitive)."""
    key = name.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key](kernel, embedding_dim, num_classes, options)
