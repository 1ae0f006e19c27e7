"""Pseudo-labels: a class and a confidence for each unlabelled image, and which to keep.

One labeller serves every way of training on unlabelled images: the semi-supervised
methods labelling at the centre refreshes or at each step (:mod:`mbdml.semi_supervised`)
and a self-training teacher labelling once (:mod:`mbdml.self_training`). What gives the
class and the confidence is ``--pseudo_labeller`` (:func:`labeller_probabilities`); the
surest images are kept by a confidence threshold or by rank, balanced per class
(:func:`select_pseudo_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import SINGLE, DistContext, all_gather_rows
from .embedder import Embedder
from .errors import ConfigError
from .kernel import NNGKClassifier
from .methods import PSEUDO_LABELLERS


def pseudo_label_hits(true_labels: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(right, known): how many pseudo-``labels`` equal the true label, among the images
    whose true label is known (>= 0; a real unlabelled image has -1). A logged
    diagnostic of the labelling, never used to choose anything."""
    known = true_labels >= 0
    return int((true_labels[known] == labels[known]).sum()), int(known.sum())


def pseudo_label_accuracy(true_labels: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The share of right pseudo-labels among the images of known true label
    (:func:`pseudo_label_hits`); None when no true label is known (real unlabelled images)."""
    right, known = pseudo_label_hits(true_labels, labels)
    return right / known if known else None


def labeller_probabilities(
    labeller: str,
    kernel: NNGKClassifier,
    embeddings: torch.Tensor,
    neighbours: torch.Tensor,
    head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Class probabilities (B, C) by which ``labeller`` (see ``--pseudo_labeller``) labels
    and ranks unlabelled images: the kernel classifier on the ``neighbours`` (K nearest
    centres), on every centre (``kernel_all``), the ``head``'s softmax, or the mean.

    The kernel classifier's probabilities saturate when all K nearest centres are of
    one class: the fine-tuned Lite0 of docs/unlabelled.md gives 83% of the unlabelled
    images a top probability of exactly 1.0 (K = 200), so a ranking by it cannot tell
    a sure image from a doubtful one. On every centre, and through the head, they keep
    that order (``benchmarks/pseudo_labellers.py`` measures them).
    """
    if labeller not in PSEUDO_LABELLERS:
        raise ConfigError(f"pseudo_labeller {labeller!r} is not known; choose one of: {', '.join(PSEUDO_LABELLERS)}")
    if labeller == "kernel_all":
        return kernel.log_probs_every_centre(embeddings).exp()
    if labeller == "kernel":
        return kernel.log_probs(embeddings, neighbours).exp()
    if head is None:
        raise ConfigError(f"pseudo_labeller {labeller} reads the mixup head's softmax, and this method has no head")
    soft = torch.softmax(head(embeddings).float(), dim=1)
    return soft if labeller == "head" else 0.5 * (kernel.log_probs(embeddings, neighbours).exp() + soft)


def select_by_rank(confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, share: float) -> torch.Tensor:
    """Mask of the images to keep: for each predicted class, its most confident images,
    up to ``share`` x (number of images) / (number of classes) of them.

    Balanced per class, so a class the classifier is unsure of still gets its share of
    pseudo-labels (a threshold on the kernel classifier's probabilities, which are
    smooth over K = 200 neighbours, keeps few images and those of the easy classes).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    per_class = int(round(share * labels.numel() / num_classes))
    if per_class <= 0:
        return keep
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel():
            top = confidence[members].topk(min(per_class, members.numel())).indices
            keep[members[top]] = True
    return keep


def select_pseudo_labels(confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, fraction: float | None, threshold: float) -> torch.Tensor:
    """Mask of the kept images: per predicted class, its surest images up to ``fraction``
    of the set over the classes (:func:`select_by_rank`), or, with no fraction, those
    whose confidence reaches ``threshold``."""
    if fraction is None:
        return confidence >= threshold
    return select_by_rank(confidence, labels, num_classes, fraction)


@dataclass
class Labelled:
    """Unlabelled images with their pseudo-labels: rows of the unlabelled set, the
    labeller's class and confidence, and each image's K nearest centres."""

    rows: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor
    neighbours: torch.Tensor

    def __getitem__(self, keep: torch.Tensor) -> "Labelled":
        return Labelled(self.rows[keep], self.labels[keep], self.confidence[keep], self.neighbours[keep])


class PseudoLabeller:
    """Labels unlabelled images with a kernel classifier (its centres set) and, for the
    ``head`` and ``mean`` labellers, a classifier head, by ``labeller`` (see
    :func:`labeller_probabilities`)."""

    def __init__(self, labeller: str, kernel: NNGKClassifier, head: torch.nn.Module | None = None) -> None:
        self.labeller = labeller
        self.kernel = kernel
        self.head = head

    def probabilities(self, embeddings: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C) of embedded images with their K nearest centres."""
        return labeller_probabilities(self.labeller, self.kernel, embeddings, neighbours, self.head)

    @torch.no_grad()
    def label_embeddings(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(confidence, class, K nearest centres) of each embedded image."""
        neighbours = self.kernel.neighbours(embeddings)
        confidence, labels = self.probabilities(embeddings, neighbours).max(1)
        return confidence, labels, neighbours

    @torch.no_grad()
    def label(self, images: torch.Tensor, embedder: Embedder, *, block: int = 4096, dist: DistContext = SINGLE,
              keep_neighbours: bool = True) -> Labelled:
        """Label every image of ``images`` (uint8), embedded by ``embedder``, ``block``
        images at a time. With several processes (``dist``) each labels its shard and the
        results are gathered, so every process holds the same labels. Without
        ``keep_neighbours`` the neighbour lists are left out (an (N, 0) tensor).

        The images go through the frozen-stage cache as one set when it can keep them
        (then a student trained with the same frozen stages can take their features over).
        """
        part = dist.shard(len(images)) if dist.enabled else slice(0, len(images))
        kept = embedder.kept_embeddings(images[part])
        rows, labels, confidence, neighbours = [], [], [], []
        for start in range(part.start, part.stop, block):
            stop = min(part.stop, start + block)
            emb = kept[start - part.start : stop - part.start] if kept is not None else embedder.embed(images[start:stop])
            conf, lab, nbrs = self.label_embeddings(emb)
            if not keep_neighbours:
                nbrs = nbrs[:, :0]
            rows.append(torch.arange(start, stop, device=emb.device))
            labels.append(lab)
            confidence.append(conf)
            neighbours.append(nbrs)
        device = embedder.device
        empty = torch.zeros(0, dtype=torch.long, device=device)

        def gather(parts: list[torch.Tensor], none: torch.Tensor) -> torch.Tensor:
            return all_gather_rows(torch.cat(parts) if parts else none, dist)

        return Labelled(
            gather(rows, empty), gather(labels, empty), gather(confidence, torch.zeros(0, device=device)),
            gather(neighbours, torch.zeros(0, self.kernel.k if keep_neighbours else 0, dtype=torch.long, device=device)),
        )
