"""Labelled-fraction and validation splits: exact class balance, seeds, folds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mbdml.data import check_every_class_labelled, labelled_split, validation_split
from mbdml.errors import ConfigError, DataError


def make_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Labels with counts[c] images of class c, in shuffled order."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]) if counts else np.zeros(0, int)
    return torch.from_numpy(np.random.default_rng(seed).permutation(y).astype(np.int64))


def per_class(labels: torch.Tensor, idx: torch.Tensor, k: int) -> list[int]:
    return torch.bincount(labels[idx], minlength=k).tolist()


# --------------------------------------------------------------------------- labelled_split


def test_random_split_exact_per_class_counts() -> None:
    labels = make_labels([100, 50, 7, 3, 1])
    idx = labelled_split(labels, 0.1, seed=0)
    # round(10)=10, round(5)=5, round(0.7)=1, round(0.3)->0->1, 1 image -> 1
    assert per_class(labels, idx, 5) == [10, 5, 1, 1, 1]
    assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    assert len(set(idx.tolist())) == len(idx)


def test_random_split_seed_decides() -> None:
    labels = make_labels([200, 200, 200])
    a = labelled_split(labels, 0.1, seed=3)
    b = labelled_split(labels, 0.1, seed=3)
    c = labelled_split(labels, 0.1, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # global RNG state plays no part
    torch.manual_seed(99)
    np.random.seed(99)
    assert torch.equal(labelled_split(labels, 0.1, seed=3), a)
    # run is ignored in random mode
    assert torch.equal(labelled_split(labels, 0.1, seed=3, run=5), a)


def test_fraction_one_keeps_everything() -> None:
    labels = make_labels([5, 3, 1])
    assert labelled_split(labels, 1.0, seed=0).tolist() == list(range(9))
    assert labelled_split(labels, 1.0, seed=0, mode="folds", run=3).tolist() == list(range(9))


def test_absent_class_stays_absent() -> None:
    labels = torch.tensor([0, 0, 0, 2, 2, 2, 2])  # class 1 has no image
    idx = labelled_split(labels, 0.5, seed=0)
    assert per_class(labels, idx, 3) == [2, 0, 2]  # round(1.5)=2, round(2.0)=2


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_fraction(fraction: object) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        labelled_split(torch.tensor([0, 1]), fraction, seed=0)  # type: ignore[arg-type]


def test_bad_mode_and_run() -> None:
    with pytest.raises(ConfigError, match="random, folds"):
        labelled_split(torch.tensor([0, 1]), 0.5, seed=0, mode="kfold")
    with pytest.raises(ConfigError, match="run"):
        labelled_split(torch.tensor([0, 1]), 0.5, seed=0, mode="folds", run=-1)
    with pytest.raises(DataError, match="integers"):
        labelled_split(torch.tensor([0.0, 1.0]), 0.5, seed=0)


def test_folds_disjoint_and_covering() -> None:
    labels = make_labels([103, 50, 27, 10])
    folds = [labelled_split(labels, 0.1, seed=7, mode="folds", run=r) for r in range(10)]
    flat = torch.cat(folds)
    assert len(flat) == len(labels) and sorted(flat.tolist()) == list(range(len(labels)))
    for f in folds:  # nearly equal, stratified
        counts = per_class(labels, f, 4)
        assert counts[0] in (10, 11) and counts[1] == 5 and counts[2] in (2, 3) and counts[3] == 1
    # run r and r + num_folds are the same fold
    assert torch.equal(labelled_split(labels, 0.1, seed=7, mode="folds", run=13), folds[3])
    # another seed gives other folds
    assert not torch.equal(labelled_split(labels, 0.1, seed=8, mode="folds", run=0), folds[0])


def test_folds_small_class_still_gets_one() -> None:
    labels = make_labels([20, 3])
    for r in range(10):
        idx = labelled_split(labels, 0.1, seed=0, mode="folds", run=r)
        assert per_class(labels, idx, 2)[1] == 1


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31),
)
def test_random_split_property(counts: list[int], fraction: float, seed: int) -> None:
    labels = make_labels(counts, seed=seed % 97)
    idx = labelled_split(labels, fraction, seed)
    assert torch.equal(idx, labelled_split(labels, fraction, seed))
    got = per_class(labels, idx, len(counts))
    want = [max(1, round(fraction * n)) if n else 0 for n in counts]
    assert got == want
    assert len(set(idx.tolist())) == len(idx) and torch.equal(idx, idx.sort().values)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    num_folds=st.integers(1, 8),
    seed=st.integers(0, 2**31),
)
def test_folds_property(counts: list[int], num_folds: int, seed: int) -> None:
    labels = make_labels(counts, seed=seed % 89)
    fraction = 1.0 / num_folds
    folds = [labelled_split(labels, fraction, seed, mode="folds", run=r) for r in range(num_folds)]
    seen = torch.cat(folds).tolist()
    assert set(seen) == set(range(len(labels)))  # covering
    for c, n in enumerate(counts):
        sizes = [per_class(labels, f, len(counts))[c] for f in folds]
        if n >= num_folds:  # disjoint and nearly equal
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        else:  # a fold too small for the class still gets one image
            assert min(sizes) == 1


# --------------------------------------------------------------------------- validation_split


def test_validation_split_counts() -> None:
    labels = make_labels([50, 20, 3, 1, 2])
    idx = torch.arange(len(labels))
    tr, va = validation_split(labels, idx, 0.2, seed=0)
    assert per_class(labels, va, 5) == [10, 4, 0, 0, 0]
    assert per_class(labels, tr, 5) == [40, 16, 3, 1, 2]
    tr, va = validation_split(labels, idx, 0.5, seed=0)
    assert per_class(labels, va, 5) == [25, 10, 1, 0, 1]  # floor, but never the last image
    tr, va = validation_split(labels, idx, 0.9, seed=0)
    assert per_class(labels, va, 5) == [45, 18, 2, 0, 1]
    assert min(per_class(labels, tr, 5)) >= 1


def test_validation_zero_and_bad_fraction() -> None:
    labels = make_labels([5, 5])
    idx = torch.tensor([0, 3, 5, 9])
    tr, va = validation_split(labels, idx, 0.0, seed=0)
    assert tr.tolist() == [0, 3, 5, 9] and va.numel() == 0 and va.dtype == torch.int64
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ConfigError, match="validation fraction"):
            validation_split(labels, idx, bad, seed=0)
    with pytest.raises(DataError, match="indices"):
        validation_split(labels, torch.tensor([0, 10]), 0.1, seed=0)


def test_validation_seeded() -> None:
    labels = make_labels([40, 40])
    idx = labelled_split(labels, 0.5, seed=1)
    a = validation_split(labels, idx, 0.25, seed=2)
    b = validation_split(labels, idx, 0.25, seed=2)
    c = validation_split(labels, idx, 0.25, seed=3)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    fraction=st.floats(0.05, 1.0),
    val_fraction=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31),
)
def test_validation_property(counts: list[int], fraction: float, val_fraction: float, seed: int) -> None:
    labels = make_labels(counts, seed=seed % 83)
    idx = labelled_split(labels, fraction, seed)
    tr, va = validation_split(labels, idx, val_fraction, seed)
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == idx.tolist()
    k = len(counts)
    n_lab = per_class(labels, idx, k)
    n_tr, n_va = per_class(labels, tr, k), per_class(labels, va, k)
    for c in range(k):
        if n_lab[c]:
            assert n_tr[c] >= 1
            assert n_va[c] == min(math.floor(val_fraction * n_lab[c] + 1e-9), n_lab[c] - 1)
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)


# --------------------------------------------------------------------------- check_every_class_labelled


def test_check_every_class_labelled() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    check_every_class_labelled(labels, torch.tensor([0, 2, 3, 5]), 4, ["a", "b", "c", "d"])
    with pytest.raises(DataError) as err:
        check_every_class_labelled(labels, torch.tensor([0, 3]), 4, ["a", "b", "c", "d"])
    msg = str(err.value)
    assert "'b'" in msg and "'d'" in msg and "'a'" not in msg and "raise the labelled fraction" in msg
    with pytest.raises(DataError, match="class 5"):  # a class with no image at all
        check_every_class_labelled(labels, torch.arange(6), 6, None)


# ----------------------------------------------------------------- cross-validation
def test_cross_validation_folds_are_disjoint_stratified_and_cover_the_labelled_images():
    from mbdml.data.split import cross_validation_split

    labels = torch.arange(1000) % 10
    labelled = labelled_split(labels, 0.1, seed=3)
    vals = []
    for f in range(5):
        train, val = cross_validation_split(labels, labelled, 5, f, seed=3)
        assert torch.equal(torch.sort(torch.cat([train, val])).values, labelled)
        assert not set(train.tolist()) & set(val.tolist())
        assert torch.bincount(labels[val], minlength=10).tolist() == [2] * 10  # 10 a class, a fifth each
        vals.append(set(val.tolist()))
        # the same seed gives the same fold: two settings are scored on the same images
        assert torch.equal(cross_validation_split(labels, labelled, 5, f, seed=3)[1], val)
    assert set().union(*vals) == set(labelled.tolist())
    assert sum(len(v) for v in vals) == len(labelled)
    assert not torch.equal(cross_validation_split(labels, labelled, 5, 0, seed=4)[1], cross_validation_split(labels, labelled, 5, 0, seed=3)[1])


def test_cross_validation_keeps_a_training_image_of_every_class_and_checks_its_arguments():
    from mbdml.data.split import cross_validation_split

    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    for f in range(3):
        train, val = cross_validation_split(labels, torch.arange(6), 3, f, seed=0)
        assert set(labels[train].tolist()) == {0, 1, 2}  # class 1 has one image: never validated on
        assert 3 not in val.tolist()
    with pytest.raises(ConfigError, match="at least 2 folds"):
        cross_validation_split(labels, torch.arange(6), 1, 0, seed=0)
    with pytest.raises(ConfigError, match="outside 0..4"):
        cross_validation_split(labels, torch.arange(6), 5, 5, seed=0)


# --------------------------------------------------------------------------- semi_supervised_split


def with_unknown(labels: torch.Tensor, n_unknown: int) -> torch.Tensor:
    """The labelled images, then n_unknown images of unknown label (-1), as a data folder's
    unlabelled/ images are appended."""
    return torch.cat([labels, torch.full((n_unknown,), -1, dtype=torch.int64)])


def test_semi_supervised_split_keeps_unknown_images_out_of_train_and_validation() -> None:
    from mbdml.data import semi_supervised_split

    labelled = make_labels([40, 20, 9, 1])
    labels = with_unknown(labelled, 33)
    s = semi_supervised_split(labels, None, 0.25, seed=3)
    train, val, unl = (set(t.tolist()) for t in (s.train, s.val, s.unlabelled))
    appended = set(range(len(labelled), len(labels)))
    # a partition of the whole set; no image of unknown label is trained on or validates
    assert not (train & val) and not (train & unl) and not (val & unl)
    assert train | val | unl == set(range(len(labels)))
    assert not ((train | val) & appended) and (labels[s.train] >= 0).all() and (labels[s.val] >= 0).all()
    # fraction None: every labelled image is labelled, so the unlabelled part is exactly the appended images
    assert unl == appended
    # validation: floor(0.25 * n_c) per class, never a class's last image
    assert per_class(labels, s.val, 4) == [10, 5, 2, 0]
    assert per_class(labels, s.train, 4) == [30, 15, 7, 1]
    for t in (s.train, s.val, s.unlabelled):
        assert t.dtype == torch.int64 and torch.equal(t, t.sort().values)


def test_semi_supervised_split_with_a_fraction_hides_labelled_images_too() -> None:
    from mbdml.data import semi_supervised_split

    labelled = make_labels([30, 10])
    labels = with_unknown(labelled, 7)
    s = semi_supervised_split(labels, 0.5, 0.2, seed=0)
    # labelled_split on the known labels alone: round(0.5 * n_c) per class, then the validation part of those
    assert per_class(labels, torch.cat([s.train, s.val]), 2) == [15, 5]
    assert per_class(labels, s.val, 2) == [3, 1]
    unl = s.unlabelled.tolist()
    assert set(range(40, 47)) <= set(unl) and len(unl) == 47 - 20
    # the hidden labelled images keep their true label (for the pseudo-label accuracy), the appended ones have none
    assert int((labels[s.unlabelled] >= 0).sum()) == 20 and int((labels[s.unlabelled] < 0).sum()) == 7


def test_semi_supervised_split_without_unknown_labels_is_the_usual_split() -> None:
    from mbdml.data import semi_supervised_split

    labels = make_labels([50, 31, 12], seed=5)
    for fraction, mode, run in ((0.1, "random", 0), (0.25, "folds", 2), (None, "random", 0)):
        s = semi_supervised_split(labels, fraction, 0.2, seed=7, mode=mode, run=run)
        chosen = labelled_split(labels, 1.0 if fraction is None else fraction, 7, mode, run)
        train, val = validation_split(labels, chosen, 0.2, 7)
        assert torch.equal(s.train, train) and torch.equal(s.val, val)
        rest = sorted(set(range(len(labels))) - set(chosen.tolist()))
        assert s.unlabelled.tolist() == rest


def test_semi_supervised_split_needs_a_labelled_image() -> None:
    from mbdml.data import semi_supervised_split

    with pytest.raises(DataError, match="none of the 5 training images has a label"):
        semi_supervised_split(torch.full((5,), -1, dtype=torch.int64), None, 0.1, seed=0)
    with pytest.raises(ConfigError, match="labelled fraction"):
        semi_supervised_split(with_unknown(make_labels([4, 4]), 2), 0.0, 0.1, seed=0)
