import pytest
import torch

from mbdml.errors import ConfigError
from mbdml.neighbours import effective_k, knn_search


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
