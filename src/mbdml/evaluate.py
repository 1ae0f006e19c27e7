"""Evaluation of an embedding: NNGK accuracy, k-NN accuracy, retrieval metrics.

The reference set is the labelled training images (the kernel classifier's centres);
the queries are the test (or validation) images. Retrieval metrics (precision@1,
MAP@R, NMI) are pytorch-metric-learning's ``AccuracyCalculator``, given our own
blocked k-NN search and scikit-learn's k-means so that faiss is not required.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .kernel import NNGKClassifier
from .neighbours import knn_search


@torch.no_grad()
def compute_embeddings(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
    channels_last: bool = False,
    flip_average: bool = False,
) -> torch.Tensor:
    """Embeddings (N, D), float32 on ``device``, of uint8 images (N, C, H, W).

    The caller puts the model in eval mode (test-time behaviour, no gradient).
    ``flip_average`` averages the embeddings of each image and its mirror image.
    """
    from .data.batches import normalized_batches

    out = []
    for x in normalized_batches(images, batch_size, device=device, mean=mean, std=std, channels_last=channels_last):
        f = model(x).float()
        if flip_average:
            f = 0.5 * (f + model(x.flip(3)).float())
        out.append(f)
    if not out:
        return torch.zeros(0, 0, device=device)
    return torch.cat(out)


def knn_accuracy(
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 10,
    num_classes: int | None = None,
) -> float:
    """Plain k-NN accuracy: majority vote of the k nearest references (ties: nearest wins)."""
    if queries.shape[0] == 0:
        return float("nan")
    num_classes = num_classes or int(max(reference_labels.max(), query_labels.max())) + 1
    res = knn_search(queries, reference, k)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    nbr_labels = reference_labels[res.indices]
    # Each vote is 1 plus a tiny bonus decreasing with rank, so ties go to the nearer class.
    rank_bonus = 1e-3 / (1 + torch.arange(res.indices.shape[1], device=queries.device, dtype=votes.dtype))
    votes.scatter_add_(1, nbr_labels, (1.0 + rank_bonus).expand_as(nbr_labels).contiguous())
    return (votes.argmax(1) == query_labels).float().mean().item()


def nngk_accuracy(kernel: NNGKClassifier, queries: torch.Tensor, query_labels: torch.Tensor) -> float:
    """Accuracy of the kernel classifier (K nearest of all its centres)."""
    if queries.shape[0] == 0:
        return float("nan")
    return (kernel.predict(queries) == query_labels).float().mean().item()


class _SearchKNN:
    """pytorch-metric-learning's knn_func protocol over our blocked search."""

    def __call__(self, query: torch.Tensor, k: int, reference: torch.Tensor, ref_includes_query: bool = False):
        exclude = torch.arange(query.shape[0], device=query.device) if ref_includes_query else None
        res = knn_search(query, reference, k, exclude=exclude)
        return res.distances, res.indices


def _kmeans(seed: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def run(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed)
        return torch.from_numpy(km.fit_predict(x.detach().cpu().numpy().astype(np.float64))).to(x.device)

    return run


def retrieval_metrics(
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """precision@1, MAP@R and NMI from pytorch-metric-learning's AccuracyCalculator."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=queries.device,
        knn_func=_SearchKNN(),
        kmeans_func=_kmeans(seed),
    )
    res = calc.get_accuracy(queries.float(), query_labels, reference.float(), reference_labels, ref_includes_query=False)
    return {"precision_at_1": float(res["precision_at_1"]), "map_at_r": float(res["mean_average_precision_at_r"]), "nmi": float(res["NMI"])}


def evaluate_embeddings(
    kernel: NNGKClassifier,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    knn_k: int = 10,
    retrieval: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of queries against the kernel's centres (the labelled training set)."""
    query_labels = query_labels.to(queries.device)
    out: dict[str, Any] = {
        "nngk_acc": nngk_accuracy(kernel, queries, query_labels),
        "knn_acc": knn_accuracy(kernel.centres, kernel.centre_labels, queries, query_labels, knn_k, kernel.num_classes),
    }
    if retrieval and queries.shape[0] > 1:
        out.update(retrieval_metrics(kernel.centres, kernel.centre_labels, queries, query_labels, seed))
    return out
