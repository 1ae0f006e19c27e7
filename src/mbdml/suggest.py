"""Which unlabelled images a person should label next: ``mbdml suggest``.

    mbdml suggest runs/mbdml1-cifar10-seed0-run0 --unlabelled photos/ --n 100 --copy_to to_label/

The rule (:func:`spread_picks`), in two steps:

1. **Uncertainty.** Every image gets the *margin* between its two most probable
   classes under the run's kernel classifier (the K nearest centres, as
   ``mbdml predict`` classifies): a small margin is an image the classifier cannot
   decide between two classes. The ``candidates_per_pick * n`` images of smallest
   margin (5 n by default) are the candidates.
2. **Spread.** Among the candidates, picks are made farthest-first (greedy k-center,
   Gonzalez 1985; the "core-set" rule of active learning): first the least certain
   candidate, then each time the candidate whose embedding is farthest (Euclidean,
   the kernel's distance) from every pick so far; ties go to the smaller margin.

Why: the least certain images alone are often many near-copies of one hard case (a
burst of photos, one ambiguous pose), and labelling all of them teaches the classifier
one thing. Farthest-first never takes a second copy of an image while a different
candidate is left, and any first r picks of its list are themselves spread out, so a
person who labels only the top of the list still gets a spread. The candidate pool
keeps it among uncertain images: with ``candidates_per_pick`` 1 the rule is margin
alone; larger values spread more and give more weight to unusual images.

The CSV has one row per pick, in the order picked: ``rank`` (1 first), ``file``,
``margin``, the two most probable classes with their probabilities (``class_1``,
``probability_1``, ``class_2``, ``probability_2``), and ``copy`` (the copy's path) when
the images are copied for labelling. Copies are named ``<rank>-<file name>`` and never
overwrite a file.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError, DataError
from .predict import DEFAULT_BATCH_SIZE, RUN_CAP, classify_files, image_files, write_csv

DEFAULT_CANDIDATES_PER_PICK = 5.0
SUGGESTION_COLUMNS = ("rank", "file", "margin", "class_1", "probability_1", "class_2", "probability_2")


def margins(probabilities: torch.Tensor) -> torch.Tensor:
    """The probability of the most probable class minus that of the second, per row."""
    if probabilities.dim() != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"need (N, C) probabilities with C >= 2, got shape {tuple(probabilities.shape)}")
    top = probabilities.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def check_pick_count(n: int, available: int, where: str = "the unlabelled images") -> None:
    """``n`` picks must be a whole number from 1 to ``available``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n {n} is not a positive whole number; pass how many images to suggest, e.g. --n 100")
    if n > available:
        raise ConfigError(f"--n {n} asks for more images than the {available} in {where}; pass --n {available} or fewer")


def check_candidates_per_pick(candidates_per_pick: float) -> None:
    if not (math.isfinite(candidates_per_pick) and candidates_per_pick >= 1.0):
        raise ConfigError(
            f"--candidates_per_pick {candidates_per_pick} must be a number of at least 1 (1: the least certain images "
            f"alone; the default {DEFAULT_CANDIDATES_PER_PICK:g}: picks spread over 5 times as many candidates)"
        )


@torch.no_grad()
def spread_picks(
    embeddings: torch.Tensor,
    margin: torch.Tensor,
    n: int,
    candidates_per_pick: float = DEFAULT_CANDIDATES_PER_PICK,
) -> torch.Tensor:
    """Indices of ``n`` rows, in the order picked: farthest-first over the
    ``ceil(candidates_per_pick * n)`` rows of smallest ``margin``, starting from the
    smallest (see the module docstring). Ties in margin keep the rows' order."""
    check_pick_count(n, int(margin.shape[0]))
    check_candidates_per_pick(candidates_per_pick)
    if embeddings.shape[0] != margin.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {margin.shape[0]} margins")
    pool = min(int(margin.shape[0]), max(n, math.ceil(candidates_per_pick * n)))
    candidates = torch.sort(margin.cpu(), stable=True).indices[:pool]
    x = embeddings.cpu()[candidates].double()
    nearest = (x - x[0]).pow(2).sum(1)  # squared distance of each candidate to its nearest pick
    picked = torch.zeros(pool, dtype=torch.bool)
    picked[0] = True
    order = [0]
    for _ in range(n - 1):
        gap = nearest.masked_fill(picked, -1.0)
        j = int(torch.argmax(gap))  # the first of equal distances: the smaller margin
        picked[j] = True
        order.append(j)
        nearest = torch.minimum(nearest, (x - x[j]).pow(2).sum(1))
    return candidates[torch.tensor(order)]


@dataclass
class Suggestions:
    """The picks, in order: their files, margins and two most probable classes; and
    what the pool held (how many images, how many candidates, which were skipped)."""

    files: list[Path]
    margins: torch.Tensor
    top_classes: list[tuple[str, str]]
    top_probabilities: torch.Tensor  # (n, 2)
    pool_size: int
    candidates: int
    skipped: list[Path] = field(default_factory=list)
    conversions: str = ""
    copies: list[Path] | None = None


def suggest(
    run: Any,
    unlabelled: Sequence[str | Path],
    n: int,
    *,
    candidates_per_pick: float = DEFAULT_CANDIDATES_PER_PICK,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_bad_image: str = "error",
    max_image_pixels: int | None | str = RUN_CAP,
    image_size: int | None = None,
    progress: bool = False,
) -> Suggestions:
    """The ``n`` images of the files and folders ``unlabelled`` to label next under a
    loaded ``run`` (``mbdml.predict.open_run``), by the rule of the module docstring."""
    check_pick_count(n, n)  # a positive whole number, before any work
    check_candidates_per_pick(candidates_per_pick)
    files = image_files(unlabelled)
    where = "the unlabelled image files" if len(unlabelled) != 1 else f"'{unlabelled[0]}'"
    check_pick_count(n, len(files), where)
    found = classify_files(run, files, batch_size=batch_size, on_bad_image=on_bad_image, max_image_pixels=max_image_pixels,
                           image_size=image_size, keep_embeddings=True, progress=progress)
    check_pick_count(n, len(found.files), f"{where} once the {len(found.skipped)} unreadable ones are skipped")
    m = margins(found.probabilities)
    picks = spread_picks(found.embeddings, m, n, candidates_per_pick)  # type: ignore[arg-type]
    top_p, top_c = found.probabilities[picks].topk(2, dim=1)
    return Suggestions(
        files=[found.files[int(i)] for i in picks],
        margins=m[picks],
        top_classes=[(found.classes[int(a)], found.classes[int(b)]) for a, b in top_c.tolist()],
        top_probabilities=top_p,
        pool_size=len(found.files),
        candidates=min(len(found.files), max(n, math.ceil(candidates_per_pick * n))),
        skipped=found.skipped,
        conversions=found.conversions,
    )


def suggestion_rows(s: Suggestions) -> list[dict[str, str]]:
    """One row per pick (the columns of :data:`SUGGESTION_COLUMNS`, and ``copy`` after copying)."""
    rows = []
    for i, f in enumerate(s.files):
        row = {
            "rank": str(i + 1),
            "file": str(f),
            "margin": f"{float(s.margins[i]):.6f}",
            "class_1": s.top_classes[i][0],
            "probability_1": f"{float(s.top_probabilities[i, 0]):.6f}",
            "class_2": s.top_classes[i][1],
            "probability_2": f"{float(s.top_probabilities[i, 1]):.6f}",
        }
        if s.copies is not None:
            row["copy"] = str(s.copies[i])
        rows.append(row)
    return rows


def write_suggestions(s: Suggestions, out: str | Path) -> Path:
    """The suggestion CSV of ``s`` at ``out`` (see the module docstring)."""
    columns = SUGGESTION_COLUMNS + (("copy",) if s.copies is not None else ())
    return write_csv(suggestion_rows(s), columns, out)


def check_copy_folder(folder: str | Path, unlabelled: Sequence[str | Path], into_nonempty: bool = False) -> None:
    """Refuse a copy folder that is a file, is not empty (unless ``into_nonempty``), or lies
    inside one of the ``unlabelled`` folders (the next ``suggest`` would find the copies)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--copy_to {folder} is a file; name a folder for the images to label")
    real = Path(os.path.realpath(folder))
    for u in unlabelled:
        source = Path(os.path.realpath(Path(u).expanduser()))
        if source.is_dir() and (real == source or source in real.parents):
            raise ConfigError(
                f"--copy_to {folder} lies inside the unlabelled folder '{u}', where the next 'mbdml suggest' would find "
                "the copies again; name a folder outside it"
            )
    if folder.is_dir() and not into_nonempty:
        held = sum(1 for _ in folder.iterdir())
        if held:
            raise ConfigError(
                f"--copy_to {folder} is not empty (it holds {held} entries); name an empty or new folder, or pass "
                "--copy_into_nonempty to add the images beside them (no file is ever overwritten)"
            )


def copy_suggestions(s: Suggestions, folder: str | Path, into_nonempty: bool = False) -> list[Path]:
    """Copy the picked files into ``folder`` as ``<rank>-<name>`` (rank zero-padded), and
    record the copies in ``s.copies``. Nothing is copied when a name is already taken."""
    folder = Path(folder).expanduser()
    check_copy_folder(folder, [], into_nonempty)
    width = max(3, len(str(len(s.files))))
    targets = [folder / f"{i + 1:0{width}d}-{f.name}" for i, f in enumerate(s.files)]
    taken = [t for t in targets if os.path.lexists(t)]
    if taken:
        raise ConfigError(f"--copy_to {folder} already holds {taken[0].name} (and {len(taken) - 1} more names of the picks); "
                          "name an empty folder: no file is ever overwritten")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(s.files, targets):
            with open(src, "rb") as fin, open(dst, "xb") as fout:
                shutil.copyfileobj(fin, fout)
    except FileExistsError as exc:
        raise ConfigError(f"{exc.filename} appeared while copying; it was left as it was. Name an empty folder") from None
    except OSError as exc:
        raise DataError(f"cannot copy the picks into {folder} ({exc.strerror or exc}); free disk space or name another folder") from None
    s.copies = targets
    return targets
