"""Which centres a mixed sample is classified against: the ``mixed_neighbours`` rules.

A mixed sample x~ = lam x_i + (1 - lam) x_p(i) has no neighbour list of its own. The
kernel terms of MbDML2, MbDML3 and ``mbdml_semi`` ask a rule for one, the way a
pytorch-metric-learning loss asks its miner for pairs: given the kernel, the batch's
centre indices and the mixing permutation, a rule returns each mixed sample's
neighbour list and which entries of it count.

=========  ==================================================================
sample     N_i, sample i's training list (the authors' choice, SPEC §4)
union      N_i u N_p(i), duplicates and both source images' centres left out
search     the K nearest centres of f(x~), both source images' centres excluded
=========  ==================================================================

When the partner is a pseudo-labelled image (``mbdml_semi``) it has no centre, and
its list is the search made when it was labelled: "union" and "search" then both
take the union of the two lists, leaving out the labelled image's centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..kernel import NNGKClassifier


@dataclass
class MixedNeighbourLists:
    """Neighbour lists of mixed samples: centre indices (B, L) and, where some entries
    must not count (a duplicate, a source image's own centre), a mask (B, L) of those
    that do; None when every entry counts."""

    neighbours: torch.Tensor
    valid: torch.Tensor | None = None


class MixedNeighbourRule:
    """How a mixed sample finds its neighbour list; stateless, one instance per method."""

    name: ClassVar[str] = ""

    def __call__(self, kernel: NNGKClassifier, embeddings: torch.Tensor, indices: torch.Tensor, permutation: torch.Tensor) -> MixedNeighbourLists:
        """Lists for x~_i = lam x_i + (1 - lam) x_p(i), two labelled images.

        Args:
            kernel: the kernel classifier with its centres and training lists.
            embeddings: (B, D) embeddings of the mixed samples (used by "search").
            indices: (B,) centre indices of the samples x_i.
            permutation: (B,) the mixing permutation p, positions in the batch.
        """
        raise NotImplementedError

    def with_pseudo_labelled(self, kernel: NNGKClassifier, indices: torch.Tensor, pseudo_neighbours: torch.Tensor) -> MixedNeighbourLists:
        """Lists for x~_i = lam x_i + (1 - lam) u_i, u_i a pseudo-labelled image with no
        centre: ``indices`` (B,) are the centres of the x_i and ``pseudo_neighbours``
        (B, K) the lists the u_i got when they were labelled."""
        return _union([kernel.training_neighbours(indices), pseudo_neighbours], [indices])


class SampleNeighbours(MixedNeighbourRule):
    """N_i: the mixed sample uses its first source image's training list."""

    name = "sample"

    def __call__(self, kernel, embeddings, indices, permutation):
        return MixedNeighbourLists(kernel.training_neighbours(indices))

    def with_pseudo_labelled(self, kernel, indices, pseudo_neighbours):
        return MixedNeighbourLists(kernel.training_neighbours(indices))


class UnionNeighbours(MixedNeighbourRule):
    """N_i u N_p(i): both source images' training lists, each centre once, neither
    source image's own centre."""

    name = "union"

    def __call__(self, kernel, embeddings, indices, permutation):
        partners = indices[permutation]
        return _union([kernel.training_neighbours(indices), kernel.training_neighbours(partners)], [indices, partners])


class SearchNeighbours(MixedNeighbourRule):
    """A fresh search: the K nearest centres of the mixed embedding, neither source
    image's own centre among them."""

    name = "search"

    def __call__(self, kernel, embeddings, indices, permutation):
        exclude = torch.stack([indices, indices[permutation]], 1)
        return MixedNeighbourLists(kernel.neighbours(embeddings, exclude=exclude))


MIXED_NEIGHBOUR_RULES: dict[str, type[MixedNeighbourRule]] = {cls.name: cls for cls in (SampleNeighbours, UnionNeighbours, SearchNeighbours)}
MIXED_NEIGHBOURS: tuple[str, ...] = tuple(MIXED_NEIGHBOUR_RULES)


def mixed_neighbour_rule(name: str) -> MixedNeighbourRule:
    """The rule called ``name`` (one of :data:`MIXED_NEIGHBOURS`)."""
    if name not in MIXED_NEIGHBOUR_RULES:
        raise ConfigError(f"unknown mixed-sample neighbour rule {name!r}; choose one of {', '.join(MIXED_NEIGHBOURS)}")
    return MIXED_NEIGHBOUR_RULES[name]()


def _union(lists: list[torch.Tensor], own: list[torch.Tensor]) -> MixedNeighbourLists:
    """The lists side by side, sorted per row; a repeated centre and the ``own`` centres
    (one (B,) tensor per source image) are masked out."""
    merged, _ = torch.cat(lists, 1).sort(dim=1)
    valid = torch.ones_like(merged, dtype=torch.bool)
    valid[:, 1:] = merged[:, 1:] != merged[:, :-1]
    for centre in own:
        valid &= merged != centre.unsqueeze(1)
    return MixedNeighbourLists(merged, valid)


def class_absent_share(
    centre_labels: torch.Tensor, neighbours: torch.Tensor, valid: torch.Tensor | None, labels_a: torch.Tensor, labels_b: torch.Tensor
) -> torch.Tensor:
    """The share of mixed samples whose neighbour list holds no centre of ``labels_a``
    or none of ``labels_b``.

    The kernel classifier gives such a class only its floor (1e-10, see the kernel's
    ``class_floor``): with the "normalised" floor that part of the mixed loss is a
    constant with no gradient. With the authors' lists (``mixed_neighbours`` "sample")
    this happens to most mixed pairs once training has separated the classes: logged
    as ``mixed_class_absent``."""
    neighbour_labels = centre_labels.index_select(0, neighbours.reshape(-1)).view_as(neighbours)
    has_a = neighbour_labels == labels_a.unsqueeze(1)
    has_b = neighbour_labels == labels_b.unsqueeze(1)
    if valid is not None:
        has_a &= valid
        has_b &= valid
    return (~(has_a.any(1) & has_b.any(1))).float().mean()
