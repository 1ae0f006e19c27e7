"""Top-K nearest-neighbour search over a set of centres.

The NNGK classifier needs, at every centre refresh, the K nearest centres of every
labelled image (itself excluded), and at test time the K nearest centres of every
query. The authors' code built the full N x N distance matrix, which cannot go past a
few tens of thousands of centres. Here the search runs in blocks of queries and blocks
of centres, keeping a running top-K, so peak memory is about
``query_block x centre_block + queries x K`` whatever N is.

:func:`knn_search` finds the nearest centres of any queries; :func:`self_knn` finds the
nearest other centres of every centre (the training neighbour lists), computing each
pair of centres once (d(i, j) = d(j, i)). Each makes a one-off :class:`CentreSearch`; the
kernel classifier keeps one for each refresh, so a faiss index is built once for the
training lists and every later block of queries.

Backends:

- ``"torch"``: exact, blocked matrix products (any device).
- ``"faiss"``: exact flat L2 index (``pip install faiss-cpu``), CPU only.
- ``"faiss-ivf"``: approximate inverted-file index for millions of centres; trade recall
  for speed with ``nprobe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

SEARCH_BACKENDS = ("torch", "faiss", "faiss-ivf")
FIRST_BLOCK = 16384
SELF_BLOCK = 2048


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
    query_block: int | None = None,
    centre_block: int | None = None,
    first_block: int | None = None,
    pending: int | None = None,
    nprobe: int = 16,
) -> SearchResult:
    """The k nearest centres of each query by squared Euclidean distance.

    A one-off search; to search the same centres again (blocks of queries), keep a
    :class:`CentreSearch`, which builds a faiss index once.

    Args:
        queries: (Q, D) float.
        centres: (N, D) float.
        k: neighbours wanted; capped at what exists (see :func:`effective_k`).
        exclude: (Q,) or (Q, m) centre indices each query must not get back (its own
            centre, or a mixed pair's two centres). Negative entries are ignored.
        backend: ``"torch"`` (exact, blocked), ``"faiss"`` (exact) or ``"faiss-ivf"``
            (approximate).
        query_block, centre_block: block sizes of the torch backend; default 2048 x
            2048 on a CPU (a distance block that stays in the last-level cache), 8192 x
            8192 on a GPU.
        first_block: centres in the first block (torch), whose full top-K selection
            sets each query's first threshold; default max(16384, 4 k).
        pending: candidate slots per query between two top-K selections (torch);
            default k / 2 (at least 8).
        nprobe: inverted lists visited per query (``"faiss-ivf"``).
    """
    return CentreSearch(centres, backend, nprobe=nprobe).search(
        queries, k, exclude=exclude, query_block=query_block, centre_block=centre_block, first_block=first_block, pending=pending,
    )


class CentreSearch:
    """Nearest-centre searches over one fixed set of centres, for any number of queries.

    The kernel classifier keeps one per centre refresh and asks it for the training
    lists and for every block of queries. The faiss backends build their index on the
    first search (``"faiss-ivf"`` trains its k-means quantizer then) and reuse it for
    every later one: one index per refresh, not one per block. The centres must not
    change while it is in use; after a refresh, make a new one.

    Attributes:
        index_builds: faiss indexes built (0 or 1).
        ivf_trainings: k-means trainings of an inverted-file index (0 or 1).
        searches: calls of :meth:`search` that reached the backend.
        grouped_tiles: distance tiles of :meth:`search` (torch) whose few candidates
            were found through the minimum over groups of 8 queries (late blocks of a
            large search), not by a comparison of every entry.
    """

    def __init__(self, centres: torch.Tensor, backend: str = "torch", *, nprobe: int = 16) -> None:
        if backend not in SEARCH_BACKENDS:
            raise ConfigError(f"unknown neighbour search backend {backend!r}; choose one of {', '.join(SEARCH_BACKENDS)}")
        self.centres = centres
        self.backend = backend
        self.nprobe = nprobe
        self.index_builds = 0
        self.ivf_trainings = 0
        self.searches = 0
        self.grouped_tiles = 0
        self._faiss_index = None

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        *,
        exclude: torch.Tensor | None = None,
        query_block: int | None = None,
        centre_block: int | None = None,
        first_block: int | None = None,
        pending: int | None = None,
    ) -> SearchResult:
        """The k nearest centres of each query; arguments as in :func:`knn_search`."""
        centres = self.centres
        exclude = _check_exclude(exclude, queries.shape[0])
        m = 0 if exclude is None else exclude.shape[1]
        k_eff = effective_k(k, centres.shape[0], m)
        if k_eff == 0 or queries.shape[0] == 0:
            empty = queries.new_zeros((queries.shape[0], k_eff))
            return SearchResult(empty, empty.long())
        self.searches += 1
        if self.backend == "torch":
            big = 8192 if queries.device.type == "cuda" else 2048
            with torch.autocast(device_type=queries.device.type, enabled=False):  # exact float32 ranking
                result, grouped = _search_torch(
                    queries.float(), centres.float(), k_eff, exclude, query_block or big, centre_block or big, first_block, pending,
                )
            self.grouped_tiles += grouped
            return result
        return _search_faiss(self._index(), queries, k_eff, exclude, approximate=(self.backend == "faiss-ivf"), nprobe=self.nprobe)

    def self_search(self, k: int, *, block: int | None = None, first_block: int | None = None, pending: int | None = None) -> SearchResult:
        """The k nearest OTHER centres of each centre; arguments as in :func:`self_knn`."""
        centres = self.centres
        if centres.dim() != 2:
            raise ValueError(f"centres must be (N, D), got shape {tuple(centres.shape)}")
        n = centres.shape[0]
        k_eff = effective_k(k, n, 1)
        if k_eff == 0:
            empty = centres.new_zeros((n, 0), dtype=torch.float32)
            return SearchResult(empty, empty.long())
        if self.backend != "torch":
            return self.search(centres, k, exclude=torch.arange(n, device=centres.device))
        with torch.autocast(device_type=centres.device.type, enabled=False):  # exact float32 ranking
            plan = plan_self_knn(n, k_eff, centres.shape[1], block, first_block, pending, centres.device)
            return _self_knn_torch(centres.detach().float(), plan)

    def _index(self) -> Any:
        if self._faiss_index is None:
            self._faiss_index, trained = _build_faiss_index(self.centres, self.backend == "faiss-ivf", self.nprobe)
            self.index_builds += 1
            self.ivf_trainings += int(trained)
        return self._faiss_index


@torch.no_grad()
def _search_torch(
    queries: torch.Tensor,
    centres: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    query_block: int,
    centre_block: int,
    first_block: int | None = None,
    pending: int | None = None,
) -> tuple[SearchResult, int]:
    """Exact blocked search with a running K-th-distance filter; returns the result and
    how many tiles took the grouped filter (see :meth:`_RunningTopK.update_shifted`).

    Each block of queries meets the centres block by block. A running top-K is kept per
    query, and with it the K-th best distance so far: in a new block only the entries
    below it can enter, so after a small first block (a full top-K selection) a cheap
    comparison replaces a selection (the same idea as a heap in faiss), and the few
    entries that pass wait in pending slots until a row has gathered enough of them to
    be worth a selection (see :class:`_RunningTopK`). The centres are visited in a fixed
    pseudo-random order, so the filter tightens quickly even when the data came sorted
    by class. Distance blocks are written into one reused buffer.
    """
    queries = queries.detach()
    centres = centres.detach()
    n = centres.shape[0]
    nq_all = queries.shape[0]
    device = queries.device
    order = None
    if n > centre_block:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
        if exclude is not None:
            position = torch.empty_like(order)
            position[order] = torch.arange(n, device=device)
            exclude = torch.where(exclude >= 0, position[exclude.clamp_min(0)], exclude)
    # [q, |q|^2, 1, -t] . [-2 c, 1, |c|^2, 1] = |q - c|^2 - t in one matrix product, t the
    # query's running threshold when the block starts (0 while unset).
    dim = queries.shape[1]
    left = _augmented(queries, None, "left", shift=True)
    right = _augmented(centres, order, "right", shift=True)
    first = min(n, max(4 * k, FIRST_BLOCK) if first_block is None else first_block)
    bounds = sorted(set([0, first] + list(range(first + centre_block, n, centre_block)) + [n]))
    width = max(b - a for a, b in zip(bounds, bounds[1:]))
    state = _RunningTopK(nq_all, k, max(8, k // 2) if pending is None else pending, min(query_block, nq_all) * width, device)
    for q0 in range(0, nq_all, query_block):
        q = left[q0 : q0 + query_block]
        nq = q.shape[0]
        ex = None if exclude is None else exclude[q0 : q0 + query_block]
        for c0, c1 in zip(bounds, bounds[1:]):
            tau = state.tau[q0 : q0 + nq]
            shift = torch.where(torch.isinf(tau), torch.zeros_like(tau), tau)
            torch.neg(shift, out=q[:, dim + 2])
            z = state.work[: nq * (c1 - c0)].view(nq, c1 - c0)
            torch.mm(q, right[c0:c1].t(), out=z)
            if ex is not None:
                local = ex - c0
                inside = (local >= 0) & (local < c1 - c0) & (ex >= 0)
                rows = torch.arange(nq, device=device).unsqueeze(1).expand_as(local)
                z[rows[inside], local[inside]] = float("inf")
            state.update_shifted(z, q0, c0, shift)
    return state.result(None, order), state.grouped_tiles


# --------------------------------------------------------------------------- self search


@dataclass(frozen=True)
class SelfSearchPlan:
    """How :func:`self_knn` cuts N centres into tiles, and what it keeps in memory.

    The centres (in a shuffled order) are split at ``bounds``; every tile (I, J) with
    J >= I is computed once. Besides the centres (two augmented shuffled copies,
    2 N (D + 2) float32) it keeps the running state, (N, K + P) distances
    (float32) and indices (int32), and one tile of distances with its bool mask; the
    final (N, K) distances and int64 indices are written beside the state.
    """

    n: int
    k: int
    dim: int
    bounds: tuple[int, ...]
    pending: int
    block: int

    @property
    def state_shape(self) -> tuple[int, int]:
        """(N, K + P): K kept entries and P pending slots per centre."""
        return (self.n, self.k + self.pending)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Largest tile: at most ``block`` rows (the first block is taken in slabs of
        rows), as many columns as the widest block."""
        widest = max([b - a for a, b in zip(self.bounds, self.bounds[1:])] or [0])
        return (min(self.block, widest), widest)

    @property
    def tile_elements(self) -> int:
        return self.tile_shape[0] * self.tile_shape[1]

    @property
    def num_tiles(self) -> int:
        nb = len(self.bounds) - 1
        return nb * (nb + 1) // 2

    def extra_bytes(self) -> int:
        """Planned peak bytes beyond the caller's centres: the centre copies, then either
        the state with one tile and its mask (during the search) or the state with the
        (N, K) result (at the end), whichever is larger."""
        state = 8 * self.n * (self.k + self.pending)
        tile = self.tile_elements
        copies = 8 * self.n * (self.dim + 2)
        return copies + state + max(5 * tile + 8, 12 * self.n * self.k)


def default_self_block(device: torch.device | str) -> int:
    """Tile side for :func:`self_knn`: cache-sized tiles on a CPU, larger ones on a GPU
    (fewer kernel launches and host synchronisations)."""
    return 8192 if torch.device(device).type == "cuda" else SELF_BLOCK


def plan_self_knn(
    n: int,
    k: int,
    dim: int = 0,
    block: int | None = None,
    first_block: int | None = None,
    pending: int | None = None,
    device: torch.device | str = "cpu",
) -> SelfSearchPlan:
    """Tile boundaries and state size for a self search of n centres (k already capped,
    see :func:`effective_k`).

    The first block (``first_block`` centres, taken in slabs of ``block`` rows) is
    every row's first selection, a full one made cheap by a tournament of group minima
    (see :meth:`_RunningTopK._merge_tournament`); the following tiles, ``block`` wide,
    only pass entries below each row's running K-th distance.
    """
    block = default_self_block(device) if block is None else int(block)
    first_block = max(FIRST_BLOCK, 4 * k) if first_block is None else int(first_block)
    pending = max(8, k // 2) if pending is None else int(pending)
    if block < 1 or first_block < 1 or pending < 1:
        raise ValueError(f"block sizes and pending slots must be positive, got block={block}, first_block={first_block}, pending={pending}")
    first = min(n, first_block)
    bounds = [0, first] + list(range(first + block, n, block)) + [n]
    return SelfSearchPlan(n=n, k=k, dim=dim, bounds=tuple(sorted(set(bounds))), pending=pending, block=block)


def self_knn(
    centres: torch.Tensor,
    k: int,
    *,
    backend: str = "torch",
    block: int | None = None,
    first_block: int | None = None,
    pending: int | None = None,
    nprobe: int = 16,
) -> SearchResult:
    """The k nearest OTHER centres of each centre (its own index excluded), nearest first.

    Used at every centre refresh for the training neighbour lists. Returns squared
    Euclidean distances (N, k') and indices (N, k') with k' = :func:`effective_k`
    (k, N, 1): with k >= N every other centre is returned.

    The torch backend is exact and uses symmetry, d(i, j) = d(j, i): the centres are cut
    into tiles and only the tiles (I, J) with J >= I are computed (one matrix product
    each, about half the arithmetic of a plain search). Each tile updates the running
    top-K of rows I (a threshold per row) and of rows J (a threshold per column of the
    same tile, so no transposed copy is made). The product of augmented centres gives the
    full squared distance (the same value for both rows of a pair), not the
    ``|c|^2 - 2 q.c`` ranking of :func:`knn_search`. Memory: the (N, k + k/2) state, the
    (N, k) result and one tile, never N x N; see :func:`plan_self_knn`. The faiss
    backends search the centres against themselves with the own index excluded
    (:func:`knn_search`).

    Args:
        centres: (N, D) float.
        k: neighbours wanted per centre.
        backend: ``"torch"``, ``"faiss"`` or ``"faiss-ivf"``.
        block: tile side (torch); default 2048 on a CPU, 8192 on a GPU.
        first_block: side of the first tile (torch); default max(16384, 4 k).
        pending: candidate slots per centre between two top-K selections (torch);
            default k / 2.
        nprobe: inverted lists visited per query (``"faiss-ivf"``).
    """
    return CentreSearch(centres, backend, nprobe=nprobe).self_search(k, block=block, first_block=first_block, pending=pending)


@torch.no_grad()
def _self_knn_torch(centres: torch.Tensor, plan: SelfSearchPlan) -> SearchResult:
    """Symmetric blocked self search; see :func:`self_knn`.

    Everything runs in the shuffled order (rows and indices); only the final
    (N, k) result is mapped back to the caller's order.
    """
    n, dim = centres.shape
    k = plan.k
    device = centres.device
    bounds = plan.bounds
    order = None
    if len(bounds) > 2:  # a fixed pseudo-random visiting order: thresholds tighten early on sorted data
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    # [c_i, |c_i|^2, 1] . [-2 c_j, 1, |c_j|^2] = |c_i - c_j|^2: one product gives the full,
    # symmetric distance, which both the row and the column thresholds compare against.
    left = _augmented(centres, order, "left")
    right = _augmented(centres, order, "right")
    del centres
    state = _RunningTopK(n, k, plan.pending, plan.tile_elements, device)
    first, slab = bounds[1], plan.tile_shape[0]
    # The first block against itself, in slabs of rows: every row's first selection.
    for s0 in range(0, first, slab):
        s1 = min(first, s0 + slab)
        d = state.work[: (s1 - s0) * first].view(s1 - s0, first)
        torch.mm(left[s0:s1], right[:first].t(), out=d)
        d.diagonal(offset=s0).fill_(float("inf"))  # a centre is not its own neighbour
        state.update(d, s0, 0, columns=False)
    nb = len(bounds) - 1
    for a in range(nb):
        for b in range(max(a, 1), nb):
            # Tile (a, b), b >= a. The first block meets every other block while those
            # rows hold no neighbour yet: that tile is computed transposed, so their first
            # selection runs along contiguous rows, and the first block's rows take the
            # columns (a threshold per column of the same tile).
            p, q = (b, a) if a == 0 else (a, b)
            r0, r1, c0, c1 = bounds[p], bounds[p + 1], bounds[q], bounds[q + 1]
            d = state.work[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(left[r0:r1], right[c0:c1].t(), out=d)
            if p == q:
                d.fill_diagonal_(float("inf"))
            state.update(d, r0, c0, columns=False)
            if p != q:
                state.update(d, c0, r0, columns=True)
    del left, right
    return state.result(order, order)


def _augmented(x: torch.Tensor, order: torch.Tensor | None, side: str, shift: bool = False, chunk: int = 1 << 14) -> torch.Tensor:
    """The rows ``x[order]`` augmented, built chunk by chunk (no full-size temporary):
    ``side="left"`` gives [x, |x|^2, 1], ``"right"`` gives [-2 x, 1, |x|^2], so the product
    of a left row with a right row is the squared distance of the two points. With
    ``shift`` a last column is added, 0 on the left (to be set to minus a per-row shift)
    and 1 on the right, so that the product is the distance less the shift."""
    n, dim = x.shape
    out = x.new_empty(n, dim + 2 + int(shift))
    for s in range(0, n, chunk):
        rows = x[s : s + chunk] if order is None else x.index_select(0, order[s : s + chunk])
        sq = torch.einsum("ij,ij->i", rows, rows)
        part = out[s : s + chunk]
        part[:, :dim] = rows
        if side == "left":
            part[:, dim] = sq
            part[:, dim + 1] = 1.0
        else:
            part[:, :dim].mul_(-2.0)
            part[:, dim] = 1.0
            part[:, dim + 1] = sq
        if shift:
            part[:, dim + 2] = 0.0 if side == "left" else 1.0
    return out


class _RunningTopK:
    """Running top-K of every row (query or centre) during a blocked search, and its
    updates from a tile of distances.

    Each row of ``dist`` (float32) and ``idx`` (int32), in the shuffled order, holds
    K kept entries (its best so far, unordered) then P pending slots. Candidates found
    in a tile are appended to the pending slots; only when a row's slots would overflow
    are its kept and pending entries folded into a new best K (a top-K selection), so
    a row pays for a selection every P candidates rather than for every tile. ``tau``
    is the largest kept distance of each row (inf until K centres were seen): a valid
    bound on its final K-th distance, so nothing below the final K-th is ever missed.
    Workspaces are allocated once and reused (fresh multi-megabyte tensors each tile
    would cost page faults).
    """

    def __init__(self, n: int, k: int, pending: int, tile: int, device: torch.device) -> None:
        self.n, self.k, self.p = n, k, pending
        self.w = k + pending
        self.dist = torch.full((n, self.w), float("inf"), dtype=torch.float32, device=device)
        self.idx = torch.full((n, self.w), -1, dtype=torch.int32, device=device)
        self.fill = torch.zeros(n, dtype=torch.long, device=device)
        self.tau = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
        self.work = torch.empty(tile, dtype=torch.float32, device=device)
        self.mask = torch.zeros((tile + 7) // 8 * 8, dtype=torch.bool, device=device)
        self.density: dict[int, float] = {}  # last row-side candidate fraction per row block
        self.low = torch.empty(0, dtype=torch.float32, device=device)  # group minima (update_shifted)
        self.grouped_tiles = 0  # tiles whose candidates the group minima found (update_shifted)

    def update(self, d: torch.Tensor, r0: int, c0: int, columns: bool) -> None:
        """Offer tile ``d`` to rows r0.. (its rows) or, with ``columns``, to rows r0.. as
        its columns (the tile read transposed); the other side's centres start at c0."""
        nr = d.shape[1] if columns else d.shape[0]
        tau = self.tau[r0 : r0 + nr]
        if bool(torch.isinf(tau).any()):  # some rows have seen fewer than K centres
            self._merge_dense(d, r0, c0, columns)
            return
        e = d.numel()
        torch.lt(d, tau.unsqueeze(0) if columns else tau.unsqueeze(1), out=self.mask[:e].view(d.shape))
        flat = _true_positions(self.mask, e)
        if flat.numel() == 0:
            return
        if flat.numel() * 4 > e:  # many candidates: a plain top-K of the tile
            self.density[r0] = 1.0
            self._merge_dense(d, r0, c0, columns)
            return
        width = d.shape[1]
        i = torch.div(flat, width, rounding_mode="floor")
        j = flat - i * width
        if columns:  # group the candidates by column: a stable sort of small integer keys
            key_type = torch.int16 if width <= 32767 else torch.int32
            rows, perm = torch.sort(j.to(key_type), stable=True)
            rows = rows.long()
            flat = torch.take(flat, perm)
            ids = torch.take(i, perm).add_(c0).to(torch.int32)
        else:
            rows, ids = i, j.add_(c0).to(torch.int32)
            self.density[r0] = flat.numel() / e
        self._append(r0, nr, rows, ids, torch.take(d, flat))

    def update_shifted(self, z: torch.Tensor, r0: int, c0: int, shift: torch.Tensor) -> None:
        """Like ``update(d, r0, c0, columns=False)`` for a tile holding z = d - shift, shift
        being each row's threshold when the tile was computed (0 where it was still unset).

        Where candidates are rare, the minimum of z over each group of 8 rows (a
        reduction along the slow axis, several times cheaper than a comparison pass) is
        negative exactly when one of the 8 entries is a candidate, and only those few
        (group, column) hits are looked at row by row. Elsewhere the distances are
        restored (z + shift) and the tile takes the plain path. Candidate distances come
        back as z + shift, which can differ from d in the last bit.
        """
        nr, width = z.shape
        tau = self.tau[r0 : r0 + nr]
        if nr >= 64 and nr % 8 == 0 and self.density.get(r0, 1.0) < 0.005 and not bool(torch.isinf(tau).any()):
            found = self._candidates_grouped(z, shift)
            if found is not None:
                self.grouped_tiles += 1
                rows, cols, vals = found
                self.density[r0] = rows.numel() / z.numel()
                if rows.numel():
                    self._append(r0, nr, rows, cols.add_(c0).to(torch.int32), vals)
                return
        z.add_(shift.unsqueeze(1))
        self.update(z, r0, c0, columns=False)

    def _candidates_grouped(self, z: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        nr, width = z.shape
        groups = nr // 8
        if self.low.numel() < groups * width:
            self.low = z.new_empty(groups * width)
        low = self.low[: groups * width].view(groups, width)
        torch.amin(z.view(groups, 8, width), dim=1, out=low)
        torch.lt(low, 0.0, out=self.mask[: groups * width].view(groups, width))
        hit = _true_positions(self.mask, groups * width)
        if hit.numel() * 16 > groups * width:  # not rare after all
            return None
        g = torch.div(hit, width, rounding_mode="floor")
        col = hit - g * width
        row8 = (g * 8).unsqueeze(1) + torch.arange(8, device=z.device)  # (hits, 8): the rows of each hit group
        val8 = torch.take(z, row8 * width + col.unsqueeze(1))
        keep = (val8 < 0).view(-1).nonzero().squeeze(1)
        rows, perm = torch.sort(torch.take(row8, keep).to(torch.int16 if nr <= 32767 else torch.int32), stable=True)
        rows = rows.long()
        keep = torch.take(keep, perm)
        return rows, torch.take(col, keep >> 3), torch.take(val8, keep).add_(torch.take(shift, rows))

    def _append(self, r0: int, nr: int, rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor) -> None:
        """Candidates (rows in ascending order) into their rows' pending slots."""
        counts = torch.bincount(rows, minlength=nr)
        fill = self.fill[r0 : r0 + nr]
        over = (fill + counts) > self.p
        if bool(over.any()):  # fold these rows' pending entries into their kept K first
            self._compact(over.nonzero().squeeze(1) + r0)
            if int(counts.max()) > self.p:  # a burst wider than the pending slots
                self._merge_wide(r0, nr, rows, counts, vals, ids)
                return
        # Candidate m of row r goes to pending slot fill[r] + (m - first candidate of r).
        offset = torch.arange(r0 * self.w + self.k, (r0 + nr) * self.w + self.k, self.w, device=rows.device)
        offset += fill
        offset -= torch.cumsum(counts, 0) - counts
        target = offset.index_select(0, rows).add_(torch.arange(rows.numel(), device=rows.device))
        self.dist.view(-1).index_copy_(0, target, vals)
        self.idx.view(-1).index_copy_(0, target, ids)
        fill += counts

    def _compact(self, rows: torch.Tensor) -> None:
        """Kept and pending entries of these rows -> their best K; pending slots emptied."""
        sub_d = self.dist.index_select(0, rows)
        sub_i = self.idx.index_select(0, rows)
        best_d, pos = torch.topk(sub_d, self.k, dim=1, largest=False, sorted=False)
        sub_i[:, : self.k] = sub_i.gather(1, pos)
        sub_d[:, : self.k] = best_d
        sub_d[:, self.k :] = float("inf")
        self.dist.index_copy_(0, rows, sub_d)
        self.idx.index_copy_(0, rows, sub_i)
        self.fill.index_fill_(0, rows, 0)
        self.tau.index_copy_(0, rows, best_d.amax(1))

    def _store(self, r0: int, nr: int, cand_d: torch.Tensor, cand_i: torch.Tensor) -> None:
        """The best K of each row among its kept and pending entries and (nr, m) candidates."""
        rows_d = self.dist[r0 : r0 + nr]
        rows_i = self.idx[r0 : r0 + nr]
        best_d, pos = torch.topk(torch.cat([rows_d, cand_d], 1), self.k, dim=1, largest=False, sorted=False)
        best_i = torch.cat([rows_i, cand_i], 1).gather(1, pos)
        rows_d[:, : self.k] = best_d
        rows_d[:, self.k :] = float("inf")
        rows_i[:, : self.k] = best_i
        self.fill[r0 : r0 + nr] = 0
        torch.amax(best_d, 1, out=self.tau[r0 : r0 + nr])

    def _merge_wide(self, r0: int, nr: int, rows: torch.Tensor, counts: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor) -> None:
        pad = int(counts.max())
        offset = torch.arange(0, nr * pad, pad, device=rows.device) - (torch.cumsum(counts, 0) - counts)
        target = offset.index_select(0, rows).add_(torch.arange(rows.numel(), device=rows.device))
        cand_d = vals.new_full((nr * pad,), float("inf")).index_copy_(0, target, vals).view(nr, pad)
        cand_i = ids.new_full((nr * pad,), -1).index_copy_(0, target, ids).view(nr, pad)
        self._store(r0, nr, cand_d, cand_i)

    def _merge_dense(self, d: torch.Tensor, r0: int, c0: int, columns: bool) -> None:
        """Offer a whole tile when the rows' thresholds are still loose or unset."""
        if not columns and d.shape[1] >= 8 * self.k:
            self._merge_tournament(d, r0, c0)
            return
        dim = 0 if columns else 1
        kk = min(self.k, d.shape[dim])
        blk_d, blk_i = torch.topk(d, kk, dim=dim, largest=False, sorted=False)
        if columns:
            blk_d, blk_i = blk_d.t(), blk_i.t()
        self._store(r0, blk_d.shape[0], blk_d, (blk_i + c0).to(torch.int32))

    def _merge_tournament(self, d: torch.Tensor, r0: int, c0: int) -> None:
        """Each row's best K of a wide tile, with the top-K selection on a fraction of it.

        The tile's columns are cut into g slices; the element-wise minimum of the slices
        gives, per row, W / g group minima, each an actual distance to a distinct centre.
        So the K-th smallest group minimum t bounds the row's K-th smallest distance in
        the tile: at least K entries are <= t. The entries <= t (about K, a few more
        where two of the best fall in one group) then go through the usual merge. A
        top-K of W / g values replaces a top-K of W.
        """
        nr, width = d.shape
        g = 2
        while width // (2 * g) >= 4 * self.k and g < 16:
            g *= 2
        q = width // g
        mins = torch.minimum(d[:, :q], d[:, q : 2 * q])
        for i in range(2, g):
            torch.minimum(mins, d[:, i * q : (i + 1) * q], out=mins)
        if width > g * q:  # leftover columns count as groups of one
            mins = torch.cat([mins, d[:, g * q :]], 1)
        bound = torch.topk(mins, self.k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
        e = d.numel()
        torch.le(d, bound, out=self.mask[:e].view(d.shape))
        flat = _true_positions(self.mask, e)
        rows = torch.div(flat, width, rounding_mode="floor")
        ids = (flat - rows * width).add_(c0).to(torch.int32)
        counts = torch.bincount(rows, minlength=nr)
        self._merge_wide(r0, nr, rows, counts, torch.take(d, flat), ids)

    def result(self, row_order: torch.Tensor | None, id_order: torch.Tensor | None) -> SearchResult:
        """Each row's best K sorted nearest first. Row s of the state belongs to row
        ``row_order[s]`` of the output and index j to ``id_order[j]`` (None: identity)."""
        n, k = self.n, self.k
        del self.work, self.mask
        chunk = max(1, (1 << 20) // self.w)
        out_i = torch.empty(n, k, dtype=torch.long, device=self.idx.device)
        for s in range(0, n, chunk):
            best_d, pos = torch.topk(self.dist[s : s + chunk], k, dim=1, largest=False, sorted=True)
            self.dist[s : s + chunk, :k] = best_d.clamp_min_(0.0)
            ids = self.idx[s : s + chunk].gather(1, pos).long()
            if id_order is not None:
                ids = id_order[ids]
            if row_order is None:
                out_i[s : s + chunk] = ids
            else:
                out_i.index_copy_(0, row_order[s : s + chunk], ids)
        del self.idx
        out_d = torch.empty(n, k, dtype=torch.float32, device=self.dist.device)
        for s in range(0, n, chunk):
            if row_order is None:
                out_d[s : s + chunk] = self.dist[s : s + chunk, :k]
            else:
                out_d.index_copy_(0, row_order[s : s + chunk], self.dist[s : s + chunk, :k])
        del self.dist
        return SearchResult(out_d, out_i)


def _true_positions(mask: torch.Tensor, e: int) -> torch.Tensor:
    """Positions of the True entries among the first e of a flat bool buffer, ascending.

    When few are set, scanning 8-byte words first is several times cheaper than a
    nonzero over the bytes; only the non-zero words are then decoded. ``mask`` must
    hold a multiple of 8 entries.
    """
    e8 = (e + 7) // 8 * 8
    if e8 > e:
        mask[e:e8] = False
    words = mask[:e8].view(torch.int64)
    hit = words.nonzero().squeeze(1)
    if hit.numel() * 4 > words.numel():  # dense: decoding word by word would cost more
        return mask[:e].nonzero().squeeze(1)
    byte = torch.take(words, hit).view(torch.bool).nonzero().squeeze(1)  # over the hit words' bytes
    return torch.take(hit, byte >> 3).mul_(8).add_(byte & 7)


def _import_faiss():
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the faiss search backend needs faiss: pip install faiss-cpu, or use --search torch") from exc
    return faiss


@torch.no_grad()
def _build_faiss_index(centres: torch.Tensor, approximate: bool, nprobe: int) -> tuple[Any, bool]:
    """A faiss index holding the centres, and whether it was trained: an exact flat
    index, or (``approximate``, from 1024 centres on) an inverted-file index whose
    k-means quantizer is trained on a seeded sample of them."""
    import numpy as np

    faiss = _import_faiss()
    c = np.ascontiguousarray(centres.detach().float().cpu().numpy())
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
        return index, True
    index = faiss.IndexFlatL2(dim)
    index.add(c)
    return index, False


@torch.no_grad()
def _search_faiss(
    index: Any,
    queries: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    approximate: bool,
    nprobe: int,
) -> SearchResult:
    import numpy as np

    device = queries.device
    q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    n = index.ntotal
    m = 0 if exclude is None else exclude.shape[1]
    kk = min(n, k + m)
    nq = q.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float32)
    out_i = torch.empty(nq, k, dtype=torch.long)
    ex_all = None if exclude is None else exclude.cpu()
    chunk = max(1, (1 << 22) // max(1, kk))  # queries per search call: temporaries stay small
    for s in range(0, nq, chunk):
        dist, idx = index.search(q[s : s + chunk], kk)
        if approximate:  # an inverted list too short: visit more lists for those rows
            probe = nprobe
            while (idx < 0).any() and probe < index.nlist:
                probe = min(index.nlist, probe * 4)
                short = np.nonzero((idx < 0).any(1))[0]
                index.nprobe = probe
                dist[short], idx[short] = index.search(q[s : s + chunk][short], kk)
                index.nprobe = nprobe
        dist_t = torch.from_numpy(dist)
        idx_t = torch.from_numpy(idx).long()
        if ex_all is not None:
            ex = ex_all[s : s + chunk]
            bad = (idx_t.unsqueeze(2) == ex.unsqueeze(1)).any(2) | (idx_t < 0)
            # Keep the first k entries of each row that are not excluded (stable order).
            rank = torch.where(bad, torch.full_like(idx_t, kk + 1), torch.arange(kk).expand_as(idx_t))
            keep = rank.argsort(dim=1, stable=True)[:, :k]
            dist_t = dist_t.gather(1, keep)
            idx_t = idx_t.gather(1, keep)
        out_d[s : s + chunk] = dist_t[:, :k].clamp_min(0)
        out_i[s : s + chunk] = idx_t[:, :k]
    return SearchResult(out_d.to(device=device, dtype=queries.dtype), out_i.to(device))
