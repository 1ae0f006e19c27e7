"""Seeded, stratified splits of a training set into labelled / validation parts.

Incomplete supervision: only a fraction of the training images keep their
labels. How the paper drew its ten 10% subsets is unknown, so two modes exist:
a fresh stratified random draw per seed, and disjoint stratified folds (run r
takes fold r). Every function draws from its own ``numpy.random.default_rng``
seeded per class by ``(seed, class)``, never from global RNG state, so a class's
draw does not depend on which other classes are present. All indices returned
are sorted int64 tensors.

A training set may also hold images whose class nobody knows (label -1, the
unlabelled images of a data folder appended after the labelled ones):
:func:`semi_supervised_split` draws the labelled and validation parts from the
known labels only and gives every other image to the unlabelled part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mbdml.errors import ConfigError, DataError

__all__ = [
    "labelled_split",
    "validation_split",
    "cross_validation_split",
    "check_every_class_labelled",
    "semi_supervised_split",
    "SemiSupervisedSplit",
    "SPLIT_MODES",
]

SPLIT_MODES = ("random", "folds")
_EPS = 1e-9


def _labels_np(labels: torch.Tensor) -> np.ndarray:
    t = torch.as_tensor(labels)
    if t.dim() != 1:
        raise DataError(f"labels must be a 1-d tensor, got shape {tuple(t.shape)}; pass one label per image")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise DataError(f"labels must be integers, got {t.dtype}; pass class indices (int64)")
    return t.detach().to("cpu", torch.int64).numpy()


def _rng(seed: int, *stream: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed {seed!r} is not an integer; pass --seed 0, say")
    return np.random.default_rng([int(seed) % (2**63), *[int(s) % (2**63) for s in stream]])


def _as_index_tensor(idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.asarray(idx, dtype=np.int64)))


def labelled_split(
    labels: torch.Tensor, fraction: float, seed: int, mode: str = "random", run: int = 0
) -> torch.Tensor:
    """Indices of the images that keep their label, stratified per class.

    mode "random": per class ``max(1, round(fraction * n_c))`` images (Python's
    round, half to even), drawn afresh from ``seed``; ``run`` is ignored (vary the
    seed per run). mode "folds": ``num_folds = round(1 / fraction)``; each class is
    permuted with ``seed`` and cut into ``num_folds`` nearly-equal disjoint chunks,
    run r takes chunk ``r % num_folds``, so runs 0..num_folds-1 are disjoint and
    cover the training set. A class too small to have an image in that fold still
    gets one (then folds overlap for that class). ``fraction`` must be in (0, 1];
    1 keeps every image.
    """
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"labelled fraction {fraction!r} is not a number; pass a value in (0, 1], e.g. 0.1") from None
    if not (0.0 < f <= 1.0):
        raise ConfigError(f"labelled fraction {fraction!r} is outside (0, 1]; pass a value like 0.1 (10% labelled)")
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode {mode!r} is not known; pass one of {', '.join(SPLIT_MODES)}")
    if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or run < 0:
        raise ConfigError(f"run {run!r} must be an integer >= 0; pass --run 0, say")
    y = _labels_np(labels)
    num_folds = max(1, round(1.0 / f))
    chosen: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = _rng(seed, int(c)).permutation(idx)
        if mode == "random":
            k = max(1, round(f * len(idx)))
            chosen.append(perm[:k])
        else:
            fold = np.array_split(perm, num_folds)[int(run) % num_folds]
            if len(fold) == 0:
                fold = perm[[int(run) % len(perm)]]
            chosen.append(fold)
    if not chosen:
        return torch.empty(0, dtype=torch.int64)
    return _as_index_tensor(np.concatenate(chosen))


def validation_split(
    labels: torch.Tensor, indices: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carve a stratified validation set out of the labelled ``indices``.

    Per class ``floor(val_fraction * n_c)`` images go to validation, but never the
    last one of a class: every class with a labelled image keeps one in training.
    Returns (train_indices, val_indices), disjoint, whose union is ``indices``
    (duplicates removed). ``val_fraction`` must be in [0, 1); 0 gives an empty
    validation set. The validation set is for model selection without the test set.
    """
    try:
        vf = float(val_fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"validation fraction {val_fraction!r} is not a number; pass a value in [0, 1)") from None
    if not (0.0 <= vf < 1.0):
        raise ConfigError(f"validation fraction {val_fraction!r} is outside [0, 1); pass 0.1, say, or 0 for none")
    y = _labels_np(labels)
    idx_all = torch.as_tensor(indices)
    if idx_all.dim() != 1 or idx_all.dtype.is_floating_point or idx_all.dtype == torch.bool:
        raise DataError(f"indices must be a 1-d integer tensor, got {idx_all.dtype} of shape {tuple(idx_all.shape)}")
    ids = np.unique(idx_all.detach().to("cpu", torch.int64).numpy())
    if ids.size and (ids[0] < 0 or ids[-1] >= len(y)):
        raise DataError(
            f"indices run from {int(ids[0])} to {int(ids[-1])} but there are {len(y)} labels; pass indices of "
            f"this training set"
        )
    train: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    val: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    sub = y[ids]
    for c in np.unique(sub):
        members = ids[sub == c]
        n_val = min(int(math.floor(vf * len(members) + _EPS)), len(members) - 1)
        perm = _rng(seed, int(c), 1).permutation(members)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return _as_index_tensor(np.concatenate(train)), _as_index_tensor(np.concatenate(val))


def cross_validation_split(
    labels: torch.Tensor, indices: torch.Tensor, folds: int, fold: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``fold`` of a stratified ``folds``-fold cross-validation of the labelled ``indices``.

    Each class's labelled images are permuted once from ``seed`` (the same permutation
    for every fold) and cut into ``folds`` nearly-equal chunks; fold f validates on
    chunk f of every class and trains on the rest. So the ``folds`` validation sets
    are disjoint and cover the labelled images, and two settings run with the same
    seed are scored on the same folds (paired by fold). A class with fewer images than
    folds has some empty chunks, and a class is never left without a training image:
    with one image it stays in training in every fold. Returns (train_indices,
    val_indices), sorted, disjoint, their union ``indices``.
    """
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds!r}; pass --cv 5, say")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < folds:
        raise ConfigError(f"fold {fold!r} is outside 0..{folds - 1} for {folds}-fold cross-validation")
    y = _labels_np(labels)
    ids = np.unique(torch.as_tensor(indices).detach().to("cpu", torch.int64).numpy().reshape(-1))
    if ids.size and (ids[0] < 0 or ids[-1] >= len(y)):
        raise DataError(f"indices run from {int(ids[0])} to {int(ids[-1])} but there are {len(y)} labels; pass indices of this training set")
    train: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    val: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    sub = y[ids]
    for c in np.unique(sub):
        members = ids[sub == c]
        perm = _rng(seed, int(c), 2).permutation(members)
        chunk = np.array_split(perm, int(folds))[int(fold)] if len(members) > 1 else perm[:0]
        val.append(chunk)
        train.append(np.setdiff1d(perm, chunk))
    return _as_index_tensor(np.concatenate(train)), _as_index_tensor(np.concatenate(val))


def check_every_class_labelled(
    labels: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> None:
    """Raise :class:`DataError` naming the classes that have no image among ``indices``.

    The NNGK classifier can never predict a class without a centre, so training
    on such a split would silently lose that class.
    """
    y = _labels_np(labels)
    ids = torch.as_tensor(indices).detach().to("cpu", torch.int64).numpy().reshape(-1)
    present = set(np.unique(y[ids]).tolist()) if ids.size else set()
    missing = [c for c in range(int(num_classes)) if c not in present]
    if not missing:
        return
    names = [
        f"'{class_names[c]}'" if class_names is not None and c < len(class_names) else f"class {c}" for c in missing
    ]
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    raise DataError(
        f"{len(missing)} of {num_classes} classes have no labelled image: {shown}; raise the labelled fraction, "
        f"or add training images of those classes"
    )


@dataclass(frozen=True)
class SemiSupervisedSplit:
    """Indices into one training set, sorted, disjoint, covering it.

    ``train``: labelled images that train (the kernel's centres); ``val``: labelled
    images kept for validation; ``unlabelled``: the rest, the images whose label is
    unknown (label < 0) and the labelled ones whose label the fraction hid (their
    true label is known, so a pseudo-label's accuracy can be measured on them).
    """

    train: torch.Tensor
    val: torch.Tensor
    unlabelled: torch.Tensor


def semi_supervised_split(
    labels: torch.Tensor,
    labelled_fraction: float | None,
    val_fraction: float,
    seed: int,
    mode: str = "random",
    run: int = 0,
) -> SemiSupervisedSplit:
    """Split a training set whose unknown labels are -1 (any negative label) into train, validation
    and unlabelled parts.

    Only images of known label can be labelled or validate: :func:`labelled_split`
    (``labelled_fraction``, ``mode``, ``run``) picks the labelled ones among them,
    ``labelled_fraction`` None keeping all of them (the default a trainer should use
    when real unlabelled images are present), and :func:`validation_split` carves the
    validation part out of those. Every other image is unlabelled. With no unknown
    label this gives exactly ``labelled_split`` + ``validation_split`` and their
    complement, so a fully labelled set splits as it always did.
    """
    y = _labels_np(labels)
    known = np.flatnonzero(y >= 0)
    if known.size == 0:
        raise DataError(
            f"none of the {len(y)} training images has a label; give labelled images (class folders) as well"
        )
    fraction = 1.0 if labelled_fraction is None else labelled_fraction
    chosen = labelled_split(torch.from_numpy(y[known]), fraction, seed, mode, run).numpy()
    labelled = torch.from_numpy(known[chosen])
    train, val = validation_split(torch.from_numpy(y), labelled, val_fraction, seed)
    rest = np.ones(len(y), dtype=bool)
    rest[labelled.numpy()] = False
    return SemiSupervisedSplit(train, val, _as_index_tensor(np.flatnonzero(rest)))
