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
FIRST_BLOCK = 2048


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
    query_block: int = 2048,
    centre_block: int = 8192,
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
    """Exact blocked search with a running K-th-distance filter.

    Each block of queries meets the centres block by block. A running top-K is kept per
    query, and with it the K-th best distance so far: in a new block only the entries
    below it can enter, so after the first block a cheap comparison replaces a full
    top-K selection (the same idea as a heap in faiss). The centres are visited in a
    fixed pseudo-random order, so the filter tightens quickly even when the data came
    sorted by class. Distance blocks are written into one reused buffer.
    """
    queries = queries.detach()
    centres = centres.detach()
    n = centres.shape[0]
    device = queries.device
    order = None
    if n > centre_block:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
        centres = centres.index_select(0, order)
        if exclude is not None:
            position = torch.empty_like(order)
            position[order] = torch.arange(n, device=device)
            exclude = torch.where(exclude >= 0, position[exclude.clamp_min(0)], exclude)
    sq_norms = centres.pow(2).sum(1)
    out_d = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=device)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long, device=device)
    first = min(n, max(4 * k, FIRST_BLOCK))  # a small first block sets the filter cheaply
    bounds = [0, first] + list(range(first + centre_block, n, centre_block)) + [n]
    bounds = sorted(set(bounds))
    work = queries.new_empty(min(query_block, queries.shape[0]) * max(b - a for a, b in zip(bounds, bounds[1:])))
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0 : q0 + query_block]
        nq = q.shape[0]
        ex = None if exclude is None else exclude[q0 : q0 + query_block]
        best_d = best_i = None
        for c0, c1 in zip(bounds, bounds[1:]):
            # ||c||^2 - 2 q.c ranks the centres like the full distance (||q||^2 is the
            # same along a row), so the query norms are added to the k winners only.
            d = work[: nq * (c1 - c0)].view(nq, c1 - c0)
            torch.addmm(sq_norms[c0:c1].unsqueeze(0), q, centres[c0:c1].t(), beta=1.0, alpha=-2.0, out=d)
            if ex is not None:
                local = ex - c0
                inside = (local >= 0) & (local < c1 - c0) & (ex >= 0)
                rows = torch.arange(nq, device=device).unsqueeze(1).expand_as(local)
                d[rows[inside], local[inside]] = float("inf")
            if best_d is None:
                best_d, best_i = _merge_dense(None, None, d, c0, k)
                continue
            tau = best_d.amax(1, keepdim=True)
            flat = (d < tau).view(-1).nonzero().squeeze(1)
            if flat.numel() == 0:
                continue
            if flat.numel() * 8 > d.numel():  # many candidates: a plain top-K of the block
                best_d, best_i = _merge_dense(best_d, best_i, d, c0, k)
                continue
            width = c1 - c0
            rows = torch.div(flat, width, rounding_mode="floor")
            counts = torch.bincount(rows, minlength=nq)
            # slot of each candidate within its row's padded list (flat is row-major sorted)
            slot = torch.arange(flat.numel(), device=device) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
            cols = flat - rows * width
            pad = int(counts.max())
            target = rows * pad + slot
            cand_d = d.new_full((nq * pad,), float("inf")).index_copy_(0, target, d.view(-1).index_select(0, flat)).view(nq, pad)
            cand_i = torch.zeros(nq * pad, dtype=torch.long, device=device).index_copy_(0, target, cols + c0).view(nq, pad)
            best_d, pos = torch.topk(torch.cat([best_d, cand_d], 1), k, dim=1, largest=False, sorted=False)
            best_i = torch.cat([best_i, cand_i], 1).gather(1, pos)
        rank = best_d.argsort(dim=1)
        best_d = best_d.gather(1, rank) + q.pow(2).sum(1, keepdim=True)
        best_i = best_i.gather(1, rank)
        out_d[q0 : q0 + nq] = best_d.clamp_min_(0.0)
        out_i[q0 : q0 + nq] = best_i if order is None else order[best_i]
    return SearchResult(out_d, out_i)


def _merge_dense(
    best_d: torch.Tensor | None, best_i: torch.Tensor | None, d: torch.Tensor, c0: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-K updated with a full top-K selection of one distance block."""
    blk_d, blk_i = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=False)
    blk_i = blk_i + c0
    if best_d is None or best_i is None:
        return blk_d, blk_i
    cat_d = torch.cat([best_d, blk_d], 1)
    best_d, pos = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False, sorted=False)
    return best_d, torch.cat([best_i, blk_i], 1).gather(1, pos)


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
