"""The data set that ships with scikit-learn: 1,797 handwritten digits of 8x8 pixels."""

from __future__ import annotations

import numpy as np
import torch

from mbdml.data.imageset import ImageSet
from mbdml.errors import ConfigError

__all__ = ["load_digits_builtin"]


def load_digits_builtin(test_fraction: float = 0.25, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 1, 8, 8), split into (train, test).

    Values 0..16 are scaled to 0..255. The split is stratified and decided by
    ``seed`` alone, so the test set is the same on every call.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1; pass 0.25, say")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(np.asarray(bunch.data, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8).copy())
    labels_np = np.asarray(bunch.target, dtype=np.int64)
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == c)
        rng = np.random.default_rng([int(seed) % (2**63), int(c)])
        k = min(len(idx) - 1, max(1, int(round(test_fraction * len(idx)))))
        test_idx.append(np.sort(rng.permutation(idx)[:k]))
    test_sel = np.sort(np.concatenate(test_idx))
    mask = np.ones(len(labels_np), dtype=bool)
    mask[test_sel] = False
    classes = [str(i) for i in range(10)]
    labels = torch.from_numpy(labels_np)
    full = ImageSet(images, labels, classes)
    return full.subset(torch.from_numpy(np.flatnonzero(mask))), full.subset(torch.from_numpy(test_sel))
