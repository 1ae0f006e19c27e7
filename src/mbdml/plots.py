"""Figures for runs: accuracy/loss curves, method comparisons and t-SNE maps.

Everything is drawn on a private ``matplotlib.figure.Figure`` with the Agg canvas,
so nothing global in matplotlib changes (no backend switch, no pyplot state) and
it works on machines without a display. Every function writes a PNG, creating the
parent folders, and returns its path.

History rows are the per-epoch dicts of a run's ``metrics.csv``: ``epoch`` and any
of ``train_acc``, ``val_acc``, ``test_acc`` (in [0, 1]) and ``loss``. Values may be
missing, ``None``, NaN or an empty string (validation and test accuracy are only
measured every few epochs); such points are skipped. Strings, as read back by
``csv.DictReader``, are accepted.

This module is a bottom floor: it imports nothing else from mbdml.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:  # only for the annotations; torch is not needed at run time
    import torch

__all__ = [
    "plot_accuracy_curves",
    "plot_method_curves",
    "plot_tsne",
    "save_tsne_pair",
    "tsne_coordinates",
]

ACC_KEYS: tuple[str, ...] = ("train_acc", "val_acc", "test_acc")
_ACC_LABELS = {"train_acc": "train", "val_acc": "validation", "test_acc": "test"}
DPI = 120

History = Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------- helpers


def _value(row: Mapping[str, Any], key: str) -> float:
    """``row[key]`` as a float, NaN when missing, None, empty or not a number."""
    v = row.get(key)
    if v is None:
        return math.nan
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _epoch(row: Mapping[str, Any], index: int) -> float:
    """The row's epoch; its 1-based position when the row has none."""
    e = _value(row, "epoch")
    return float(index + 1) if math.isnan(e) else e


def _series(history: History, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of ``key`` over the rows where it was measured, by epoch."""
    pts = [(_epoch(r, i), _value(r, key)) for i, r in enumerate(history)]
    pts = sorted((e, v) for e, v in pts if not math.isnan(v))
    if not pts:
        return np.empty(0), np.empty(0)
    arr = np.asarray(pts, dtype=float)
    return arr[:, 0], arr[:, 1]


def _is_accuracy(metric: str) -> bool:
    return "acc" in metric.lower()


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Any]]:
    """A figure on its own Agg canvas (no pyplot, no global backend change)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at ``path`` (parents created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def _no_data(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or a (possibly GPU, grad-tracking) torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # bfloat16 has no numpy dtype
        x = x.numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- curves


def plot_accuracy_curves(history: History, path: str | Path, title: str = "") -> Path:
    """Plot one run's accuracy (%) and training loss against epoch; save a PNG.

    Left panel: one line per accuracy series present (train / val / test), with
    markers on the epochs where it was actually measured, so sparse validation
    and test evaluations are visible as such. Right panel: the training loss.
    Returns ``Path(path)``.
    """
    fig, (ax_acc, ax_loss) = _new_figure(11.0, 4.2, ncols=2)

    drawn = 0
    for key in ACC_KEYS:
        ep, val = _series(history, key)
        if ep.size:
            ax_acc.plot(ep, 100.0 * val, marker="o", markersize=3.5, linewidth=1.4,
                        label=_ACC_LABELS[key])
            drawn += 1
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    ax_acc.grid(True, alpha=0.3)
    if drawn:
        ax_acc.legend(loc="lower right")
    else:
        _no_data(ax_acc, "no accuracy recorded")

    ep, loss = _series(history, "loss")
    if ep.size:
        ax_loss.plot(ep, loss, marker="o", markersize=3.0, linewidth=1.4, color="tab:red")
    else:
        _no_data(ax_loss, "no loss recorded")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(True, alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _mean_std(runs: Sequence[History], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and std of ``metric`` over runs, at epochs some run measured."""
    per_run = [dict(zip(*_series(run, metric))) for run in runs]
    epochs = sorted(set().union(*per_run)) if per_run else []
    if not epochs:
        return np.empty(0), np.empty(0), np.empty(0)
    table = np.array([[r.get(e, np.nan) for e in epochs] for r in per_run], dtype=float)
    with warnings.catch_warnings():  # every column has at least one value; be safe anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(table, axis=0)
        std = np.nanstd(table, axis=0)
    return np.asarray(epochs, dtype=float), mean, np.nan_to_num(std)


def plot_method_curves(
    curves: Mapping[str, Sequence[History]],
    path: str | Path,
    metric: str = "test_acc",
    title: str = "",
) -> Path:
    """Compare methods: mean of ``metric`` over runs per epoch, with a ± std band.

    ``curves[method]`` is a list of runs, each a history (list of per-epoch rows).
    At each epoch the mean/std use the runs that measured it there; epochs where
    no run has a value are left out. Accuracy metrics (names containing "acc") are
    shown in %. Returns ``Path(path)``.
    """
    fig, (ax,) = _new_figure(7.5, 4.8)
    scale = 100.0 if _is_accuracy(metric) else 1.0

    drawn = 0
    for method, runs in curves.items():
        ep, mean, std = _mean_std(list(runs), metric)
        if not ep.size:
            continue
        n = len(runs)
        (line,) = ax.plot(ep, scale * mean, marker="o", markersize=3.0, linewidth=1.5,
                          label=f"{method} (n={n})")
        ax.fill_between(ep, scale * (mean - std), scale * (mean + std),
                        color=line.get_color(), alpha=0.2, linewidth=0)
        drawn += 1

    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)" if scale != 1.0 else metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="best")
    else:
        _no_data(ax, f"no {metric} recorded")
    ax.set_title(title or f"{metric}: mean ± std over runs")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- t-SNE


def tsne_coordinates(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    max_points: int = 3000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE coordinates of a seeded random subset of at most ``max_points``.

    Returns ``(coords, labels)``: ``coords`` is (m, 2) float, ``labels`` the labels
    of the same m points in the same order. Perplexity is ``min(30, (m-1)/3)`` so
    that tiny inputs work (it must stay below m); a single point maps to the origin.
    Raises ValueError on empty, mismatched or non-finite input.
    """
    x = _to_numpy(embeddings).astype(np.float64, copy=False)
    y = _to_numpy(labels).reshape(-1)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} embeddings but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("no embeddings to plot")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinite values")

    n = x.shape[0]
    if n > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        x, y = x[idx], y[idx]
        n = max_points
    if n == 1:
        return np.zeros((1, 2)), y

    from sklearn.manifold import TSNE  # deferred: slow import, only needed here

    tsne = TSNE(
        n_components=2,
        init="pca" if min(x.shape) >= 2 else "random",  # PCA init needs >= 2 dims
        random_state=seed,
        perplexity=min(30.0, (n - 1) / 3.0),
    )
    coords = tsne.fit_transform(x)
    return np.asarray(coords, dtype=float), y


def _class_name(label: Any, class_names: Sequence[str] | None) -> str:
    if class_names is not None:
        try:
            i = int(label)
        except (TypeError, ValueError):
            i = -1
        if 0 <= i < len(class_names) and i == label:
            return str(class_names[i])
    return str(label)


def _tsne_figure(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    class_names: Sequence[str] | None,
    title: str,
    max_points: int,
    seed: int,
) -> Figure:
    """The t-SNE scatter figure behind :func:`plot_tsne` and :func:`save_tsne_gif`."""
    coords, y = tsne_coordinates(embeddings, labels, max_points=max_points, seed=seed)
    classes, inverse = np.unique(y, return_inverse=True)
    k = len(classes)

    import matplotlib  # colormap registry only; no backend or global state involved

    if k <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:k]
    elif k <= 20:
        colours = matplotlib.colormaps["tab20"].colors[:k]
    else:
        colours = matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, k))

    fig, (ax,) = _new_figure(7.0, 6.0)
    size = 6.0 if len(y) > 1000 else 14.0
    if k <= 20:
        for c, colour in enumerate(colours):
            pts = coords[inverse == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=size, color=colour, alpha=0.8,
                       linewidths=0, label=_class_name(classes[c], class_names))
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                  markerscale=1.5, frameon=False)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, c=np.asarray(colours)[inverse],
                   alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE ({len(y)} points, {k} classes)")
    fig.tight_layout()
    return fig


def plot_tsne(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
    max_points: int = 3000,
    seed: int = 0,
) -> Path:
    """Scatter a 2-D t-SNE map of the embeddings, coloured by class; save a PNG.

    Shows how well the learned metric separates classes. Uses
    :func:`tsne_coordinates` (at most ``max_points`` points, seeded). Colours come
    from tab10 / tab20 by the number of classes (a sampled ``turbo`` beyond 20);
    the legend, with ``class_names[label]`` where given, is shown up to 20 classes.
    Returns ``Path(path)``.
    """
    return _save(_tsne_figure(embeddings, labels, class_names, title, max_points, seed), path)


def save_tsne_gif(
    frames: Sequence[tuple[str, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    max_points: int = 1000,
    seed: int = 0,
    seconds_per_frame: float = 1.0,
) -> Path:
    """An animated GIF of t-SNE maps, one frame per ``(title, embeddings, labels)``.

    Shows how the test embeddings organise themselves as training goes on. Each frame
    is its own t-SNE (maps are not aligned across frames; the clusters are what to watch).
    """
    from PIL import Image

    if not frames:
        raise ValueError("save_tsne_gif needs at least one frame")
    images = []
    for title, emb, lab in frames:
        fig = _tsne_figure(emb, lab, class_names, title, max_points, seed)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        images.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out, save_all=True, append_images=images[1:], duration=int(1000 * seconds_per_frame), loop=0)
    return out


def save_tsne_pair(
    train_emb: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_emb: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    class_names: Sequence[str] | None = None,
    prefix: str = "tsne",
    seed: int = 0,
) -> list[Path]:
    """Write t-SNE maps of train and test embeddings as ``<prefix>_{train,test}.png``.

    Side by side they show whether the separation seen on training data carries
    over to unseen data. Returns ``[train_path, test_path]`` under ``out_dir``.
    """
    out = Path(out_dir)
    paths = []
    for split, emb, lab in (("train", train_emb, train_labels), ("test", test_emb, test_labels)):
        paths.append(plot_tsne(emb, lab, out / f"{prefix}_{split}.png", class_names=class_names,
                               title=f"t-SNE of {split} embeddings", seed=seed))
    return paths
