import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mbdml.errors import ConfigError
from mbdml.kernel import NNGKClassifier
from mbdml.neighbours import effective_k, knn_search, plan_self_knn, self_knn


def brute_force(q, c, k, exclude=None):
    d = torch.cdist(q.double(), c.double()).pow(2)
    if exclude is not None:
        d[torch.arange(q.shape[0]), exclude] = float("inf")
    dist, idx = d.topk(k, largest=False)
    return dist, idx


@pytest.mark.parametrize("query_block,centre_block", [(1024, 65536), (7, 13), (1, 1000)])
def test_blocked_search_matches_brute_force(query_block, centre_block):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(50, 16, generator=g)
    c = torch.randn(300, 16, generator=g)
    res = knn_search(q, c, 20, query_block=query_block, centre_block=centre_block)
    dist, idx = brute_force(q, c, 20)
    assert torch.equal(res.indices, idx)
    assert torch.allclose(res.distances.double(), dist, atol=1e-4)


@pytest.mark.parametrize("centre_block", [64, 256, 4096])
def test_filtered_search_on_class_sorted_data_matches_brute_force(centre_block):
    """Clusters stored class by class (as image folders load them), so without the
    shuffled visiting order the nearest centres would all come in the last blocks.
    Exercises the first-block top-K, the K-th-distance filter, the padded merge, the
    dense fallback and the own-centre exclusion across blocks."""
    g = torch.Generator().manual_seed(4)
    means = 4 * torch.randn(10, 12, generator=g)
    c = torch.cat([means[i] + torch.randn(300, 12, generator=g) for i in range(10)])
    own = torch.arange(c.shape[0])
    res = knn_search(c, c, 40, exclude=own, query_block=500, centre_block=centre_block)
    dist, idx = brute_force(c, c, 40, exclude=own)
    assert not (res.indices == own.unsqueeze(1)).any()
    assert torch.allclose(res.distances.double(), dist, atol=1e-3)
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(res.indices, idx)) / idx.numel()
    assert same > 0.999  # only exact ties may differ
    two = torch.stack([own, (own + 1) % c.shape[0]], 1)
    res2 = knn_search(c, c, 40, exclude=two, query_block=500, centre_block=centre_block)
    assert not (res2.indices.unsqueeze(2) == two.unsqueeze(1)).any()


def test_exclude_own_centre_and_k_capped():
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, 3, generator=g)
    own = torch.arange(5)
    res = knn_search(c, c, 200, exclude=own, centre_block=2)
    assert res.indices.shape == (5, 4)  # K >= N: every other centre, never itself
    for i in range(5):
        assert i not in res.indices[i].tolist()
        assert sorted(res.indices[i].tolist()) == [j for j in range(5) if j != i]


def test_exclude_two_per_query():
    c = torch.arange(10.0).unsqueeze(1)
    q = torch.tensor([[0.0], [9.0]])
    res = knn_search(q, c, 2, exclude=torch.tensor([[0, 1], [9, 8]]))
    assert res.indices.tolist() == [[2, 3], [7, 6]]


def test_faiss_backends_agree_with_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    c = torch.randn(2000, 8, generator=g)
    own = torch.arange(2000)
    t = knn_search(c, c, 10, exclude=own)
    f = knn_search(c, c, 10, exclude=own, backend="faiss")
    assert (t.indices == f.indices).float().mean() > 0.999
    approx = knn_search(c, c, 10, exclude=own, backend="faiss-ivf", nprobe=64)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx.indices, t.indices)) / t.indices.numel()
    assert recall > 0.9
    assert not (approx.indices == own.unsqueeze(1)).any()


def test_bad_k_and_backend():
    with pytest.raises(ConfigError, match="at least 1"):
        effective_k(0, 10)
    with pytest.raises(ConfigError, match="backend"):
        knn_search(torch.zeros(1, 2), torch.zeros(3, 2), 1, backend="annoy")


# ------------------------------------------------------------------ self search


def class_sorted_clusters(seed=4, classes=10, per_class=300, dim=12):
    """Clusters stored class by class, as image folders load them."""
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(classes, dim, generator=g)
    return torch.cat([means[i] + torch.randn(per_class, dim, generator=g) for i in range(classes)])


def brute_force_self(c, k):
    d = torch.cdist(c.double(), c.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    return d.topk(min(k, c.shape[0] - 1), largest=False)


def overlap(a, b):
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / max(1, b.numel())


@pytest.mark.parametrize(
    "block,first_block,pending",
    [(None, None, None), (256, 256, None), (64, 64, 5), (100, 37, 1), (512, 160, 200), (31, 7, 3)],
)
def test_self_knn_matches_brute_force_on_class_sorted_clusters(block, first_block, pending):
    """Many tiles (up to hundreds), thresholds per row and per column, pending slots
    that overflow every few tiles, bursts wider than them, and the dense fallback."""
    c = class_sorted_clusters()
    res = self_knn(c, 40, block=block, first_block=first_block, pending=pending)
    dist, idx = brute_force_self(c, 40)
    assert res.indices.shape == res.distances.shape == (3000, 40)
    assert res.indices.dtype == torch.long
    assert not (res.indices == torch.arange(3000).unsqueeze(1)).any()
    assert torch.allclose(res.distances.double(), dist, atol=1e-3)
    assert (res.distances[:, 1:] >= res.distances[:, :-1]).all()  # nearest first
    assert overlap(res.indices, idx) > 0.999  # only exact ties may differ
    assert (res.indices >= 0).all()
    assert all(len(set(row.tolist())) == 40 for row in res.indices)  # no centre twice


def test_self_knn_agrees_with_the_generic_search():
    c = class_sorted_clusters(seed=7, per_class=150)
    own = torch.arange(c.shape[0])
    a = self_knn(c, 25, block=128, first_block=128)
    b = knn_search(c, c, 25, exclude=own, query_block=100, centre_block=128)
    assert torch.allclose(a.distances, b.distances, atol=1e-4)
    assert overlap(a.indices, b.indices) > 0.999


def test_self_knn_k_at_least_n_and_tiny_sets():
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, 3, generator=g)
    for k in (4, 5, 200):
        res = self_knn(c, k, block=2, first_block=2)
        assert res.indices.shape == (5, 4)  # every other centre, never itself
        for i in range(5):
            assert sorted(res.indices[i].tolist()) == [j for j in range(5) if j != i]
    one = self_knn(torch.zeros(1, 3), 200)
    assert one.indices.shape == one.distances.shape == (1, 0)
    two = self_knn(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), 200)
    assert two.indices.tolist() == [[1], [0]]
    assert torch.allclose(two.distances, torch.tensor([[25.0], [25.0]]))
    with pytest.raises(ConfigError, match="at least 1"):
        self_knn(c, 0)
    with pytest.raises(ConfigError, match="backend"):
        self_knn(c, 2, backend="annoy")


def test_self_knn_duplicates():
    """Exact copies are each other's nearest neighbours at distance 0; a centre never
    gets itself back even when a copy of it is as close."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(400, 6, generator=g)
    c = torch.cat([base, base, base[:100]])  # 100 centres with two copies each
    res = self_knn(c, 3, block=64, first_block=64, pending=4)
    n = c.shape[0]
    assert not (res.indices == torch.arange(n).unsqueeze(1)).any()
    for i in range(100):
        copies = {i, i + 400, i + 800} - {i}
        assert set(res.indices[i, :2].tolist()) == copies
        assert res.distances[i, :2].abs().max() < 1e-4
    for i in range(100, 400):
        assert res.indices[i, 0].item() == i + 400
    spots = torch.randn(200, 6, generator=g)
    c = spots.repeat(10, 1)  # 2,000 centres on 200 spots: ties everywhere in the first selection
    res = self_knn(c, 30)
    n = c.shape[0]
    assert not (res.indices == torch.arange(n).unsqueeze(1)).any()
    assert all(len(set(r.tolist())) == 30 for r in res.indices)
    assert (res.distances[:, :9] < 1e-4).all() and (res.indices[:, :9] % 200 == torch.arange(n).unsqueeze(1) % 200).all()
    dist, _ = brute_force_self(c, 30)
    assert torch.allclose(res.distances.double(), dist, atol=1e-4)
    same = torch.zeros(50, 4)  # all identical: any 10 others are right
    res = self_knn(same, 10, block=8, first_block=8)
    assert not (res.indices == torch.arange(50).unsqueeze(1)).any()
    assert all(len(set(r.tolist())) == 10 for r in res.indices)
    assert (res.distances == 0).all()


def test_self_knn_plan_never_n_by_n():
    plan = plan_self_knn(1_000_000, 200, 128, block=4096, first_block=2048, pending=100)
    assert plan.state_shape == (1_000_000, 300)
    assert plan.tile_shape == (4096, 4096)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == 1_000_000 and plan.bounds[1] == 2048
    assert all(0 < b - a <= 4096 for a, b in zip(plan.bounds, plan.bounds[1:]))
    nb = len(plan.bounds) - 1
    assert plan.num_tiles == nb * (nb + 1) // 2  # J >= I only
    n = 1_000_000
    assert plan.extra_bytes() < 8 * (12 * n * 200 + 12 * n * 130)  # a small multiple of N x (K + D)
    assert plan.extra_bytes() < n * n * 4 / 500
    small = plan_self_knn(50, 10, 4)
    assert small.bounds == (0, 50) and small.state_shape == (50, 10 + small.pending) and small.pending == 8


def test_self_knn_peak_memory_is_n_by_k_not_n_by_n(tmp_path):
    """In a fresh process: 20,000 centres, K 20. An N x N float matrix would take 1.6 GB;
    the search may only add about the state, a tile and the centre copies."""
    code = textwrap.dedent(
        """
        import json, resource, torch
        from mbdml.neighbours import self_knn, plan_self_knn
        torch.set_num_threads(1)
        c = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
        self_knn(c[:3000], 20, block=1024)  # warm up the allocator and the kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res = self_knn(c, 20, block=1024)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plan = plan_self_knn(20000, 20, 16, block=1024)
        print(json.dumps({"extra": after - before, "planned": plan.extra_bytes(), "shape": list(res.indices.shape)}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["shape"] == [20000, 20]
    assert r["extra"] < 20000 * 20000 * 4 / 10  # far from N x N (1.6 GB)
    assert r["extra"] < 3 * r["planned"] + 32 * 2**20


def test_self_knn_faiss_backends():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    c = torch.randn(2000, 8, generator=g)
    t = self_knn(c, 10)
    f = self_knn(c, 10, backend="faiss")
    assert (t.indices == f.indices).float().mean() > 0.999
    assert torch.allclose(t.distances, f.distances, atol=1e-4)
    approx = self_knn(c, 10, backend="faiss-ivf", nprobe=64)
    assert overlap(approx.indices, t.indices) > 0.9
    assert not (approx.indices == torch.arange(2000).unsqueeze(1)).any()


def test_set_centres_uses_the_self_search():
    c = class_sorted_clusters(seed=9, per_class=60, dim=5)
    labels = torch.arange(10).repeat_interleave(60)
    kernel = NNGKClassifier(num_classes=10, sigma=1.0, k=30)
    kernel.set_centres(c, labels)
    assert torch.equal(kernel.train_neighbours, self_knn(c, 30).indices)
    dist, idx = brute_force_self(c, 30)
    assert overlap(kernel.train_neighbours, idx) > 0.999


def test_generic_search_with_small_pending_slots():
    """Pending slots overflow and bursts exceed them in the generic blocked search too."""
    c = class_sorted_clusters(seed=11, per_class=200)
    q = c[::7] + 0.01
    res = knn_search(q, c, 30, query_block=64, centre_block=100, first_block=40, pending=3)
    d = torch.cdist(q.double(), c.double()).pow(2)
    dist, idx = d.topk(30, largest=False)
    assert torch.allclose(res.distances.double(), dist, atol=1e-3)
    assert overlap(res.indices, idx) > 0.999


def test_faiss_ivf_never_returns_missing_neighbours():
    """With one inverted list visited, most lists hold fewer than K centres: those rows
    are searched again with more lists instead of coming back with -1."""
    pytest.importorskip("faiss")
    c = torch.randn(2000, 8, generator=torch.Generator().manual_seed(6))
    own = torch.arange(2000)
    res = knn_search(c, c, 100, exclude=own, backend="faiss-ivf", nprobe=1)
    assert res.indices.shape == (2000, 100)
    assert (res.indices >= 0).all()
    assert not (res.indices == own.unsqueeze(1)).any()
    assert all(len(set(r.tolist())) == 100 for r in res.indices[:200])


def test_generic_search_rare_candidates_grouped_filter():
    """Late blocks of a large search, where few entries can still enter a row's top-K,
    are filtered through the minimum of d - threshold over 8 rows; results stay exact,
    with exclusions, duplicates of the queries among the centres, and a row count that
    is not a multiple of 8 in the last query block."""
    from mbdml.neighbours import CentreSearch

    g = torch.Generator().manual_seed(8)
    c = torch.randn(40000, 6, generator=g)
    qi = torch.arange(0, 40000, 77)[:300]  # 300 queries: blocks of 128, 128 and 44
    search = CentreSearch(c, "torch")
    res = search.search(c[qi], 5, exclude=qi, query_block=128, centre_block=1024)
    d = torch.cdist(c[qi].double(), c.double()).pow(2)
    d[torch.arange(300), qi] = float("inf")
    dist, idx = d.topk(5, largest=False)
    assert search.grouped_tiles > 0, "the grouped filter was not used"
    assert torch.allclose(res.distances.double(), dist, atol=1e-4)
    assert overlap(res.indices, idx) > 0.999
    assert not (res.indices == qi.unsqueeze(1)).any()
    few = CentreSearch(c[:2000], "torch")  # two blocks: no late block where candidates are rare
    few.search(c[qi], 5, query_block=128, centre_block=1024)
    assert few.grouped_tiles == 0


def test_centre_search_builds_and_trains_one_ivf_index_for_every_block():
    """One CentreSearch per refresh: the training lists and every block of queries after
    them use one inverted-file index, trained once, and the blocks' answers are those
    of a single search of all the queries."""
    pytest.importorskip("faiss")
    from mbdml.neighbours import CentreSearch

    g = torch.Generator().manual_seed(12)
    c = torch.randn(3000, 8, generator=g)
    q = torch.randn(700, 8, generator=g)
    search = CentreSearch(c, "faiss-ivf", nprobe=8)
    own = search.self_search(10)
    blocks = [search.search(part, 10).indices for part in q.split(100)]
    assert (search.index_builds, search.ivf_trainings, search.searches) == (1, 1, 1 + 7)
    assert torch.equal(torch.cat(blocks), search.search(q, 10).indices)
    assert torch.equal(own.indices, self_knn(c, 10, backend="faiss-ivf", nprobe=8).indices)
    assert search.ivf_trainings == 1


def test_centre_search_flat_index_in_blocks_is_the_exact_search():
    pytest.importorskip("faiss")
    from mbdml.neighbours import CentreSearch

    g = torch.Generator().manual_seed(13)
    c = torch.randn(1500, 8, generator=g)
    q = torch.randn(300, 8, generator=g)
    ex = torch.randint(0, 1500, (300, 2), generator=g)
    search = CentreSearch(c, "faiss")
    got = [search.search(q[s : s + 64], 15, exclude=ex[s : s + 64]) for s in range(0, 300, 64)]
    d = torch.cdist(q.double(), c.double()).pow(2)
    d.scatter_(1, ex, float("inf"))
    dist, idx = d.topk(15, largest=False)
    assert (search.index_builds, search.ivf_trainings, search.searches) == (1, 0, 5)
    assert torch.equal(torch.cat([r.indices for r in got]), idx)
    assert torch.allclose(torch.cat([r.distances for r in got]).double(), dist, atol=1e-4)
    assert torch.equal(torch.cat([r.indices for r in got]), knn_search(q, c, 15, exclude=ex, backend="torch").indices)


@pytest.mark.parametrize("backend", ["faiss", "faiss-ivf"])
def test_kernel_keeps_one_search_per_refresh(backend):
    """The kernel classifier's refresh, its test-time predictions in blocks and its fresh
    searches share one index; a refresh or a centre update makes a new one, so a search
    never sees stale centres."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(14)
    c = torch.randn(2000, 8, generator=g)
    labels = torch.arange(2000) % 5
    q = torch.randn(500, 8, generator=g)
    kernel = NNGKClassifier(num_classes=5, sigma=1.0, k=20, search_backend=backend)
    kernel.set_centres(c, labels)
    search = kernel.centre_search
    kernel.predict(q, batch_size=128)  # 4 blocks
    kernel.neighbours(q[:10])
    assert kernel.centre_search is search
    assert (search.index_builds, search.ivf_trainings, search.searches) == (1, int(backend == "faiss-ivf"), 1 + 4 + 1)
    kernel.set_centres(c + 1.0, labels)  # a refresh
    assert kernel.centre_search is not search and kernel.centre_search.index_builds == 1
    kernel.update_centres(torch.arange(50), torch.zeros(50, 8))  # momentum 0: these centres move to the origin
    nearest = kernel.neighbours(torch.zeros(1, 8))
    assert set(nearest[0].tolist()) <= set(range(50))  # the moved centres, not the index's old ones
