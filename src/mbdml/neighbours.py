"""Top-K nearest-neighbour search over a set of centres.

The NNGK classifier needs, at every centre refresh, the K nearest centres of every
labelled image (itself excluded), and at test time the K nearest centres of every
query. The authors' code built the full N x N distance matrix, which cannot go past a
few tens of thousands of centres. Here the search runs in blocks of queries and blocks
of centres, keeping a running top-K, so peak memory is about
``query_block x centre_block + queries x K`` whatever N is.

Backends:

- ``"torch"``: exact, blocked matrix products (any device).
- ``"faiss"``: exact flat L2 index (``pip install faiss-cpu``), CPU only.
- ``"faiss-ivf"``: approximate inverted-file index for millions of centres; trade recall
  for speed with ``nprobe``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

SEARCH_BACKENDS = ("torch", "faiss", "faiss-ivf")


@dataclass
class SearchResult:
    """Squared Euclidean distances and indices of the nearest centres, nearest first."""

    distances: torch.Tensor  # float (Q, k)
    indices: torch.Tensor  # int64 (Q, k)


def effective_k(k: int, num_centres: int, excluded_per_query: int = 0) -> int:
    """The number of neighbours that can actually be returned.

    With tiny labelled sets K may exceed the number of centres; a query then gets every
    centre except the ones it must not see (its own, for a training sample).
    """
    if k < 1:
        raise ConfigError(f"K (the number of neighbours) must be at least 1, got {k}; pass --k 1 or more")
    return max(0, min(k, num_centres - excluded_per_query))


def squared_distances(queries: torch.Tensor, centres: torch.Tensor, centre_sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """All squared Euclidean distances between two small blocks, (Q, D) x (N, D) -> (Q, N)."""
    if centre_sq_norms is None:
        centre_sq_norms = centres.pow(2).sum(1)
    d = torch.addmm(centre_sq_norms.unsqueeze(0), queries, centres.t(), beta=1.0, alpha=-2.0)
    d.add_(queries.pow(2).sum(1, keepdim=True))
    return d.clamp_min_(0.0)


def _check_exclude(exclude: torch.Tensor | None, num_queries: int) -> torch.Tensor | None:
    if exclude is None:
        return None
    if exclude.dim() == 1:
        exclude = exclude.unsqueeze(1)
    if exclude.shape[0] != num_queries:
        raise ValueError(f"exclude has {exclude.shape[0]} rows but there are {num_queries} queries")
    return exclude.long()


def knn_search(
    queries: torch.Tensor,
    centres: torch.Tensor,
    k: int,
    *,
    exclude: torch.Tensor | None = None,
    backend: str = "torch",
    query_block: int = 1024,
    centre_block: int = 65536,
    nprobe: int = 16,
) -> SearchResult:
    """The k nearest centres of each query by squared Euclidean distance.

    Args:
        queries: (Q, D) float.
        centres: (N, D) float.
        k: neighbours wanted; capped at what exists (see :func:`effective_k`).
        exclude: (Q,) or (Q, m) centre indices each query must not get back (its own
            centre, or a mixed pair's two centres). Negative entries are ignored.
        backend: ``"torch"`` (exact, blocked), ``"faiss"`` (exact) or ``"faiss-ivf"``
            (approximate).
    """
    if backend not in SEARCH_BACKENDS:
        raise ConfigError(f"unknown neighbour search backend {backend!r}; choose one of {', '.join(SEARCH_BACKENDS)}")
    exclude = _check_exclude(exclude, queries.shape[0])
    m = 0 if exclude is None else exclude.shape[1]
    k_eff = effective_k(k, centres.shape[0], m)
    if k_eff == 0 or queries.shape[0] == 0:
        empty = queries.new_zeros((queries.shape[0], k_eff))
        return SearchResult(empty, empty.long())
    if backend == "torch":
        with torch.autocast(device_type=queries.device.type, enabled=False):  # exact float32 ranking
            return _search_torch(queries.float(), centres.float(), k_eff, exclude, query_block, centre_block)
    return _search_faiss(queries, centres, k_eff, exclude, approximate=(backend == "faiss-ivf"), nprobe=nprobe)


@torch.no_grad()
def _search_torch(
    queries: torch.Tensor,
    centres: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    query_block: int,
    centre_block: int,
) -> SearchResult:
    queries = queries.detach()
    centres = centres.detach()
    n = centres.shape[0]
    sq_norms = centres.pow(2).sum(1)
    out_d = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=queries.device)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0 : q0 + query_block]
        ex = None if exclude is None else exclude[q0 : q0 + query_block]
        best_d = best_i = None
        for c0 in range(0, n, centre_block):
            c1 = min(n, c0 + centre_block)
            # ||c||^2 - 2 q.c ranks the centres like the full distance (||q||^2 is the
            # same along a row), so the query norms are added to the k winners only.
            d = torch.addmm(sq_norms[c0:c1].unsqueeze(0), q, centres[c0:c1].t(), beta=1.0, alpha=-2.0)
            if ex is not None:
                local = ex - c0
                inside = (local >= 0) & (local < c1 - c0) & (ex >= 0)
                rows = torch.arange(q.shape[0], device=q.device).unsqueeze(1).expand_as(local)
                d[rows[inside], local[inside]] = float("inf")
            kk = min(k, c1 - c0)
            blk_d, blk_i = torch.topk(d, kk, dim=1, largest=False, sorted=False)
            blk_i += c0
            if best_d is None:
                best_d, best_i = blk_d, blk_i
            else:
                cat_d = torch.cat([best_d, blk_d], 1)
                cat_i = torch.cat([best_i, blk_i], 1)
                best_d, pos = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False, sorted=False)
                best_i = cat_i.gather(1, pos)
        order = best_d.argsort(dim=1)
        best_d = best_d + q.pow(2).sum(1, keepdim=True)
        out_d[q0 : q0 + query_block] = best_d.gather(1, order).clamp_min_(0.0)
        out_i[q0 : q0 + query_block] = best_i.gather(1, order)
    return SearchResult(out_d, out_i)


def _import_faiss():
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the faiss search backend needs faiss: pip install faiss-cpu, or use --search torch") from exc
    return faiss


@torch.no_grad()
def _search_faiss(
    queries: torch.Tensor,
    centres: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    approximate: bool,
    nprobe: int,
) -> SearchResult:
    import numpy as np

    faiss = _import_faiss()
    device = queries.device
    c = np.ascontiguousarray(centres.detach().float().cpu().numpy())
    q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    n, dim = c.shape
    if approximate and n >= 1024:
        nlist = int(max(16, min(65536, 4 * round(n**0.5))))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist)
        rng = np.random.default_rng(0)
        sample = c[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(sample)
        index.add(c)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatL2(dim)
        index.add(c)
    m = 0 if exclude is None else exclude.shape[1]
    kk = min(n, k + m)
    dist, idx = index.search(q, kk)
    dist_t = torch.from_numpy(dist)
    idx_t = torch.from_numpy(idx).long()
    if exclude is not None:
        ex = exclude.cpu()
        bad = (idx_t.unsqueeze(2) == ex.unsqueeze(1)).any(2) | (idx_t < 0)
        # Keep the first k entries of each row that are not excluded (stable order).
        rank = torch.where(bad, torch.full_like(idx_t, kk + 1), torch.arange(kk).expand_as(idx_t))
        order = rank.argsort(dim=1, stable=True)[:, :k]
        dist_t = dist_t.gather(1, order)
        idx_t = idx_t.gather(1, order)
    else:
        dist_t, idx_t = dist_t[:, :k], idx_t[:, :k]
    return SearchResult(dist_t.clamp_min(0).to(device=device, dtype=queries.dtype), idx_t.to(device))
