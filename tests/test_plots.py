"""Tests for mbdml.plots: every figure is a readable PNG; t-SNE separates clusters."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from mbdml.plots import (
    plot_accuracy_curves,
    plot_method_curves,
    plot_tsne,
    save_tsne_pair,
    tsne_coordinates,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _single_openmp_thread():
    """t-SNE's OpenMP threads oversubscribe a small shared box (seconds -> tens of s)."""
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def assert_png(path: Path) -> None:
    """``path`` exists, starts with the PNG signature and reads back as an image."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0


def sparse_history(epochs: int = 10, every: int = 3, seed: int = 0) -> list[dict]:
    """Rows like metrics.csv: val/test measured every few epochs, else None/NaN/missing."""
    r = np.random.default_rng(seed)
    rows = []
    for e in range(1, epochs + 1):
        row: dict = {"epoch": e, "train_acc": min(1.0, 0.3 + 0.06 * e), "loss": 2.0 / e}
        if e % every == 0 or e == epochs:
            row["val_acc"] = float(0.2 + 0.05 * e + 0.01 * r.standard_normal())
            row["test_acc"] = float(0.2 + 0.05 * e + 0.01 * r.standard_normal())
        elif e % 2:
            row["val_acc"] = None
            row["test_acc"] = math.nan
        rows.append(row)
    return rows


def clusters(n: int, seed: int = 0, dim: int = 16, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in ``k`` well-separated Gaussian clusters."""
    r = np.random.default_rng(seed)
    centres = 10.0 * np.eye(k, dim)
    y = np.arange(n) % k
    return centres[y] + r.standard_normal((n, dim)), y


def loo_1nn_accuracy(coords: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy in the 2-D map."""
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


# ----------------------------------------------------------------------------- curves


def test_accuracy_curves_png_with_missing_values(tmp_path: Path) -> None:
    out = plot_accuracy_curves(sparse_history(), tmp_path / "a" / "b" / "curves.png", title="run")
    assert out == tmp_path / "a" / "b" / "curves.png"
    assert_png(out)


def test_accuracy_curves_accepts_csv_strings_and_str_path(tmp_path: Path) -> None:
    rows = [
        {"epoch": "1", "train_acc": "0.5", "val_acc": "", "test_acc": "", "loss": "1.2"},
        {"epoch": "2", "train_acc": "0.6", "val_acc": "0.55", "test_acc": "nan", "loss": "0.9"},
        {"epoch": "3", "train_acc": "0.7", "val_acc": "", "test_acc": "0.6", "loss": "0.7"},
    ]
    out = plot_accuracy_curves(rows, str(tmp_path / "csv.png"))
    assert isinstance(out, Path)
    assert_png(out)


@pytest.mark.parametrize("history", [[], [{"epoch": 1}], [{"epoch": 1, "loss": 1.0}]])
def test_accuracy_curves_without_series(tmp_path: Path, history: list[dict]) -> None:
    assert_png(plot_accuracy_curves(history, tmp_path / "empty.png"))


def test_method_curves_two_methods_three_runs(tmp_path: Path) -> None:
    curves = {m: [sparse_history(seed=10 * i + s) for s in range(3)]
              for i, m in enumerate(["MbDML1", "baseline"])}
    # one run evaluated at different epochs, and an all-NaN epoch in every run
    curves["baseline"][1] = sparse_history(every=4, seed=99)
    for runs in curves.values():
        for run in runs:
            run.append({"epoch": 11, "test_acc": math.nan, "loss": 0.1})
    out = plot_method_curves(curves, tmp_path / "cmp" / "methods.png", title="comparison")
    assert_png(out)
    assert_png(plot_method_curves(curves, tmp_path / "loss.png", metric="loss"))


def test_method_curves_missing_metric_does_not_crash(tmp_path: Path) -> None:
    curves = {"a": [[{"epoch": 1, "loss": 1.0}]], "b": []}
    assert_png(plot_method_curves(curves, tmp_path / "none.png"))


# ----------------------------------------------------------------------------- t-SNE


def test_tsne_tiny_input(tmp_path: Path) -> None:
    x, y = clusters(12, dim=5)
    coords, lab = tsne_coordinates(x, y, max_points=3000, seed=0)
    assert coords.shape == (12, 2) and np.isfinite(coords).all()
    np.testing.assert_array_equal(lab, y)
    assert_png(plot_tsne(x, y, tmp_path / "tiny.png", class_names=["a", "b", "c"]))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tsne_degenerate_sizes(n: int) -> None:
    coords, lab = tsne_coordinates(np.random.default_rng(0).standard_normal((n, 4)),
                                   np.zeros(n, dtype=int))
    assert coords.shape == (n, 2) and lab.shape == (n,)


def test_tsne_separates_clusters(tmp_path: Path) -> None:
    x, y = clusters(200)
    coords, lab = tsne_coordinates(x, y, max_points=3000, seed=0)
    assert coords.shape == (200, 2)
    np.testing.assert_array_equal(lab, y)
    assert loo_1nn_accuracy(coords, lab) > 0.95
    assert_png(plot_tsne(x, y, tmp_path / "sep.png", class_names=["x", "y", "z"], title="t"))


def test_tsne_subsample_is_seeded_and_keeps_labels_aligned() -> None:
    x, y = clusters(90, dim=4)
    x[:, -1] = y  # recoverable label in the features, to check alignment
    c1, l1 = tsne_coordinates(x, y, max_points=30, seed=3)
    c2, l2 = tsne_coordinates(x, y, max_points=30, seed=3)
    assert c1.shape == (30, 2) and l1.shape == (30,)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(c1, c2)
    assert loo_1nn_accuracy(c1, l1) > 0.95


def test_tsne_accepts_tensors_and_many_classes(tmp_path: Path) -> None:
    emb = torch.randn(30, 8, requires_grad=True)
    lab = torch.arange(30) % 25  # > 20 classes: no legend, sampled colours
    assert_png(plot_tsne(emb, lab, tmp_path / "many.png"))
    assert_png(plot_tsne(emb[:20], lab[:20] % 15, tmp_path / "tab20.png"))  # tab20
    coords, _ = tsne_coordinates(emb.to(torch.bfloat16), lab, max_points=12)
    assert coords.shape == (12, 2)


def test_tsne_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        tsne_coordinates(np.zeros((5, 3)), np.zeros(4))
    with pytest.raises(ValueError):
        tsne_coordinates(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError):
        tsne_coordinates(np.full((5, 3), np.nan), np.zeros(5))


def test_save_tsne_pair(tmp_path: Path) -> None:
    xtr, ytr = clusters(30, seed=1, dim=6)
    xte, yte = clusters(15, seed=2, dim=6)
    paths = save_tsne_pair(xtr, ytr, torch.from_numpy(xte), torch.from_numpy(yte),
                           tmp_path / "figs", class_names=["a", "b", "c"], prefix="ep5")
    assert paths == [tmp_path / "figs" / "ep5_train.png", tmp_path / "figs" / "ep5_test.png"]
    for p in paths:
        assert_png(p)


def test_no_global_backend_change(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    plot_accuracy_curves(sparse_history(), tmp_path / "c.png")
    assert matplotlib.get_backend() == before


def test_module_is_a_bottom_floor() -> None:
    """plots imports nothing else from mbdml and does not pull in pyplot."""
    import subprocess
    import sys

    code = ("import sys, mbdml.plots; "
            "bad = [m for m in sys.modules if m.startswith('mbdml.') and m != 'mbdml.plots'"
            " or m == 'matplotlib.pyplot']; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
