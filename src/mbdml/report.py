"""Result tables over many runs: mean ± std per method and data set, as in the paper.

``mbdml compare`` writes one folder per run at
``RESULTS_DIR/<dataset>/<method>/run<r>/summary.json``. This module reads those
summaries back (:func:`collect_runs`), averages one metric over the runs of each
method and data set (:func:`aggregate`, sample standard deviation, as the paper's
"mean ± std over ten runs") and lays the numbers out like the paper's table
(:func:`format_table`: plain text, Markdown, LaTeX or CSV). :func:`write_report`
writes every table to files; :func:`report_text` returns the two text tables for
the command line to print. :data:`PAPER_TABLE` holds the paper's own numbers, and
``format_table(paper_cells(), PAPER_DATASETS)`` prints them in the same layout.

Cells are keyed by ``(method, dataset)`` and hold fractions in [0, 1], as the
summaries do; the tables show them in percent.

Beside the means, :func:`paired_comparisons` gives each method's paired difference
against a reference method (NNGK by default) over the runs both have (run r of every
method trains on the same split), on the validation figure and on the test figure,
with a 95% interval and a sign-flip test (:mod:`mbdml.paired`);
:func:`format_paired` lays them out and marks only the differences whose interval
excludes 0. The best-mean marking of :func:`format_table` also marks the methods that
are level with the best (their paired interval against it holds 0), as the paper
highlights "similar and the most accurate results".

This module is a bottom floor: it imports nothing from mbdml but the errors,
:mod:`mbdml.paired` and the method groups (:mod:`mbdml.methods.groups`, which need no
torch), and prints nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbdml.errors import DataError
from mbdml.methods.groups import METHOD_TITLES, table_sections
from mbdml.paired import PairedDifference, paired_difference

__all__ = [
    "DATASET_NAMES",
    "PAPER_DATASETS",
    "PAPER_TABLE",
    "RUNS_CSV_COLUMNS",
    "SELECTIONS",
    "STYLES",
    "Cell",
    "RunRecord",
    "aggregate",
    "collect_runs",
    "format_paired",
    "format_table",
    "paired_between",
    "paired_comparisons",
    "paper_cells",
    "read_summary",
    "report_text",
    "reference_list",
    "results_document",
    "versus_tables",
    "write_report",
]

log = logging.getLogger("mbdml")

OTHER_GROUP = "Other"

DATASET_NAMES: dict[str, str] = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "mnist": "MNIST",
    "flowers17": "Flowers17",
    "digits": "Digits",
    "fashion-mnist": "Fashion-MNIST",
}

SELECTIONS: tuple[str, ...] = ("final", "best_val", "authors_best_on_test")
STYLES: tuple[str, ...] = ("text", "markdown", "latex", "csv")

_SELECTION_TITLES = {
    "final": "final model",
    "best_val": "model with the best validation accuracy",
    "authors_best_on_test": "epoch best on the test set (the authors' protocol, optimistic)",
}
_METRIC_NAMES = {
    "nngk_acc": "NNGK accuracy",
    "knn_acc": "kNN accuracy",
    "precision_at_1": "Precision@1",
    "map_at_r": "MAP@R",
    "nmi": "NMI",
    "val_acc": "validation accuracy",
    "cv_acc": "cross-validation accuracy (NNGK, on the held-out fold)",
}


def _table_metric(records: Sequence[RunRecord], metric: str) -> tuple[str, str]:
    """(the figure the mean ± std tables hold, its name): ``metric`` on the test set, or for a
    cross-validated comparison (runs in folds, no test set) the validation accuracy of each fold."""
    if any(r.fold is not None for r in records):
        return "val_acc", "cv_acc"
    return metric, metric

# The paper's results: (mean, std) in percent, per method and data set.
PAPER_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "mnist", "flowers17")
PAPER_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "contrastive": {"cifar10": (67.02, 1.37), "cifar100": (26.69, 0.53), "mnist": (98.51, 0.27), "flowers17": (46.47, 5.15)},
    "proxyanchor": {"cifar10": (69.06, 1.08), "cifar100": (24.97, 1.32), "mnist": (98.90, 0.11), "flowers17": (82.57, 2.81)},
    "softtriple": {"cifar10": (66.14, 0.61), "cifar100": (26.44, 1.41), "mnist": (98.75, 0.11), "flowers17": (64.31, 5.44)},
    "supcon": {"cifar10": (62.53, 1.37), "cifar100": (10.85, 0.61), "mnist": (98.75, 0.27), "flowers17": (61.81, 9.38)},
    "triplet": {"cifar10": (62.55, 0.73), "cifar100": (32.70, 6.05), "mnist": (98.57, 0.21), "flowers17": (54.21, 4.96)},
    "mixup": {"cifar10": (75.20, 8.88), "cifar100": (38.80, 4.66), "mnist": (97.90, 0.32), "flowers17": (58.46, 3.12)},
    "nngk": {"cifar10": (77.07, 0.34), "cifar100": (38.26, 0.69), "mnist": (97.96, 0.19), "flowers17": (72.42, 3.44)},
    "mbdml1": {"cifar10": (78.95, 0.32), "cifar100": (46.31, 0.27), "mnist": (98.53, 0.07), "flowers17": (80.60, 1.88)},
    "mbdml2": {"cifar10": (77.89, 0.40), "cifar100": (49.43, 0.39), "mnist": (97.47, 0.20), "flowers17": (82.62, 1.27)},
    "mbdml3": {"cifar10": (78.63, 0.46), "cifar100": (47.83, 0.46), "mnist": (98.21, 0.11), "flowers17": (82.36, 1.09)},
}
PAPER_RUNS = 10

RUNS_CSV_COLUMNS: tuple[str, ...] = (
    "dataset",
    "method",
    "run",
    "seed",
    "epochs",
    "final_nngk_acc",
    "final_knn_acc",
    "final_precision_at_1",
    "final_map_at_r",
    "final_nmi",
    "best_val_epoch",
    "best_val_nngk_acc",
    "authors_best_on_test_nngk_acc",
    "seconds",
)

_RUN_DIR = re.compile(r"run(\d+)(?:-fold(\d+))?")  # run<r>, or run<r>-fold<f> (cross-validation)


# ----------------------------------------------------------------------------- records


@dataclass
class RunRecord:
    """One run's summary, with the data set and method taken from its folder names."""

    dataset: str
    method: str
    run: int
    summary: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)  # the run's environment.json, when readable
    fold: int | None = None  # the cross-validation fold, or None

    @property
    def key(self) -> Any:
        """What pairs this run with another method's: its run (its labelled split), and its fold."""
        return self.run if self.fold is None else (self.run, self.fold)

    @property
    def name(self) -> str:
        return f"{self.run}" if self.fold is None else f"{self.run}-fold{self.fold}"


@dataclass
class Cell:
    """One metric over the runs of one method on one data set (fractions in [0, 1])."""

    mean: float
    std: float
    n: int
    values: list[float] = field(default_factory=list)
    runs: list[Any] = field(default_factory=list)  # the run of each value (its split; with its fold under --cv), when known


def _load_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The summary at ``path``, or None and why it cannot be used."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"cannot read it ({e})"
    if not isinstance(summary, dict):
        return None, "not a JSON object"
    if not isinstance(summary.get("final"), dict):
        return None, "it has no 'final' entry (a half-written file)"
    return summary, ""


def read_summary(path: str | Path) -> dict[str, Any] | None:
    """A run's ``summary.json``, or None when it is missing, unreadable, not a JSON object or
    has no final model's entry: such a run is not finished (``compare`` trains it again)."""
    return _load_summary(Path(path))[0] if Path(path).is_file() else None


def collect_runs(results_dir: str | Path, keep: Callable[[str, str, int], bool] | None = None) -> list[RunRecord]:
    """Every readable ``<dataset>/<method>/run<r>/summary.json`` under ``results_dir``.

    ``keep(dataset, method, run)``, when given, chooses the runs to read (the others are
    not opened). Unreadable or partial summaries are skipped with a warning on the
    ``mbdml`` logger. Raises :class:`DataError` when the folder is missing or holds no
    readable summary. Records come sorted by data set, method and run.
    """
    root = Path(results_dir)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"results folder {root} {what}; give the folder that `mbdml compare` wrote "
            "(it holds <dataset>/<method>/run<r>/summary.json)"
        )
    records: list[RunRecord] = []
    found = 0
    for path in sorted(root.glob("*/*/run*/summary.json")):
        m = _RUN_DIR.fullmatch(path.parent.name)
        if m is None or not path.is_file():
            continue
        dataset, method, run = path.parents[2].name, path.parents[1].name, int(m.group(1))
        fold = None if m.group(2) is None else int(m.group(2))
        if keep is not None and not keep(dataset, method, run):
            continue
        found += 1
        summary, why = _load_summary(path)
        if summary is None:
            log.warning("skipping %s: %s; run the same 'mbdml compare' command again to redo that run", path, why)
            continue
        records.append(RunRecord(dataset, method, run, summary, _environment(path.parent), fold))
    if not records:
        detail = f"its {found} summary.json files are all unreadable" if found else "it holds no <dataset>/<method>/run<r>/summary.json"
        raise DataError(
            f"no run summaries in {root}: {detail}; run `mbdml compare` with this results folder first, "
            "or give the folder it wrote"
        )
    records.sort(key=lambda r: (r.dataset, r.method, r.run, -1 if r.fold is None else r.fold))
    return records


def _environment(run_dir: Path) -> dict[str, Any]:
    """A run's environment.json (versions, command, CPU, commit), or {} when unreadable."""
    try:
        env = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None (null, missing, not a number, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _lookup(summary: Mapping[str, Any], selection: str, metric: str) -> float | None:
    part = summary.get(selection)
    if not isinstance(part, Mapping):
        return None
    return _number(part.get(metric))


def _cell(values: Sequence[float], runs: Sequence[int] = ()) -> Cell:
    vals = list(values)
    mean = statistics.mean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Cell(mean, std, len(vals), vals, list(runs))


def aggregate(records: Iterable[RunRecord], selection: str = "final", metric: str = "nngk_acc") -> dict[tuple[str, str], Cell]:
    """Mean and sample std of ``summary[selection][metric]`` per ``(method, dataset)``.

    Runs whose value is null or missing are left out; a method and data set with
    no value at all gets no cell. ``selection`` is one of :data:`SELECTIONS`
    (``"authors_best_on_test"`` only has ``nngk_acc``).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; use one of {', '.join(SELECTIONS)}")
    groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in records:
        v = _lookup(r.summary, selection, metric)
        if v is not None:
            groups.setdefault((r.method, r.dataset), []).append((r.key, v))
    return {key: _cell([v for _, v in sorted(runs)], [r for r, _ in sorted(runs)]) for key, runs in sorted(groups.items())}


def paper_cells() -> dict[tuple[str, str], Cell]:
    """The paper's table as cells (fractions; ``n`` = 10 runs, no per-run values)."""
    return {
        (method, ds): Cell(mean / 100.0, std / 100.0, PAPER_RUNS, [])
        for method, row in PAPER_TABLE.items()
        for ds, (mean, std) in row.items()
    }


# ----------------------------------------------------------------------------- tables

_Cells = Mapping[tuple[str, str], Cell]
_Layout = list[tuple[str, list[str]]]


def _layout(methods: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``methods`` in the tables' sections (:func:`mbdml.methods.table_sections`), unknown
    ones in "Other" (sorted); as (section title, methods) pairs."""
    present = set(methods)
    sections = table_sections()
    out = [(str(g.title), [m for m in g.methods if m in present]) for g in sections]
    known = {m for g in sections for m in g.methods}
    out.append((OTHER_GROUP, sorted(present - known)))
    return [(g, ms) for g, ms in out if ms]


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def _datasets(cells: Mapping[tuple[str, str], Cell], datasets: Sequence[str] | None) -> list[str]:
    if datasets is None:
        return sorted({ds for _, ds in cells})
    return list(dict.fromkeys(datasets))


def _best(cells: Mapping[tuple[str, str], Cell], methods: Sequence[str], ds: str) -> set[str]:
    """The methods of column ``ds`` with the highest mean as shown (percent, 2 decimals),
    and those level with one of them: their paired difference against it, over the runs
    both have, has a 95% interval that holds 0 (cells without run indices: means only)."""
    shown = {m: round(100.0 * cells[(m, ds)].mean, 2) for m in methods if (m, ds) in cells}
    if not shown:
        return set()
    top = max(shown.values())
    best = {m for m, v in shown.items() if v == top}
    level = set()
    for m in shown.keys() - best:
        for b in best:
            d = paired_difference(_by_run(cells[(m, ds)]), _by_run(cells[(b, ds)]))
            if d is not None and d.n > 1 and d.level:
                level.add(m)
    return best | level


def _by_run(cell: Cell) -> dict[int, float]:
    return dict(zip(cell.runs, cell.values)) if len(cell.runs) == len(cell.values) else {}


def _latex_escape(s: str) -> str:
    repl = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return "".join(repl.get(c, c) for c in s)


def _md_escape(s: str) -> str:
    return s.replace("|", r"\|")


def format_table(
    cells: Mapping[tuple[str, str], Cell],
    datasets: Sequence[str] | None = None,
    style: str = "text",
    title: str = "",
    mark_best: bool = True,
) -> str:
    """The paper's layout: a row per method (grouped), a column per data set, ``mean ± std`` in %.

    ``cells`` is keyed by ``(method, dataset)``. Data sets come in the given order
    (default: sorted); groups and methods with no value in them are left out;
    ``-`` marks a missing cell. The best mean of each column is marked (text:
    trailing ``*``; markdown: bold; latex: ``\\textbf``). ``style`` is ``"text"``,
    ``"markdown"``, ``"latex"`` or ``"csv"`` (a row per method and data set with
    the raw fractions: group, method, dataset, mean, std, n, values joined by ``;``;
    no marking).
    """
    if style not in STYLES:
        raise ValueError(f"unknown table style {style!r}; use one of {', '.join(STYLES)}")
    cols = _datasets(cells, datasets)
    layout = _layout(m for m, ds in cells if ds in cols)
    shown = [m for _, ms in layout for m in ms]
    best = {ds: (_best(cells, shown, ds) if mark_best else set()) for ds in cols}
    if style == "csv":
        return _csv_table(cells, cols, layout)
    if style == "markdown":
        return _markdown_table(cells, cols, layout, best, title)
    if style == "latex":
        return _latex_table(cells, cols, layout, best, title)
    return _text_table(cells, cols, layout, best, title)


def _csv_table(cells: _Cells, cols: list[str], layout: _Layout) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "method", "dataset", "mean", "std", "n", "values"])
    for group, methods in layout:
        for m in methods:
            for ds in cols:
                c = cells.get((m, ds))
                if c is not None:
                    w.writerow([group, m, ds, repr(float(c.mean)), repr(float(c.std)), c.n, ";".join(repr(float(v)) for v in c.values)])
    return buf.getvalue()


def _cell_text(c: Cell | None, pm: str = "±") -> str:
    return "-" if c is None else f"{_pct(c.mean)} {pm} {_pct(c.std)}"


def _text_table(cells: _Cells, cols: list[str], layout: _Layout, best: dict[str, set[str]], title: str) -> str:
    head = ["Method"] + [DATASET_NAMES.get(ds, ds) for ds in cols]
    body: list[list[str] | str] = []
    for group, methods in layout:
        body.append(group)
        for m in methods:
            row = ["  " + METHOD_TITLES.get(m, m)]
            for ds in cols:
                c = cells.get((m, ds))
                row.append(_cell_text(c) + ("*" if m in best[ds] else " "))
            body.append(row)
    widths = [len(h) for h in head]
    for row in body:
        if isinstance(row, list):
            widths = [max(w, len(x)) for w, x in zip(widths, row)]
    widths[0] = max([widths[0]] + [len(r) for r in body if isinstance(r, str)])

    def line(row: list[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(row[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [title] if title else []
    lines += [line(head), rule]
    for row in body:
        lines.append(row if isinstance(row, str) else line(row))
    if not body:
        lines.append("(no results)")
    elif any(best.values()):
        lines += [rule, "* best mean of the column, and the methods level with it (paired 95% interval holds 0)"]
    return "\n".join(lines) + "\n"


def _markdown_table(cells: _Cells, cols: list[str], layout: _Layout, best: dict[str, set[str]], title: str) -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(["Method"] + [_md_escape(DATASET_NAMES.get(ds, ds)) for ds in cols]) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * len(cols)) + "|")
    for group, methods in layout:
        lines.append("| " + " | ".join([f"*{group}*"] + [""] * len(cols)) + " |")
        for m in methods:
            row = [_md_escape(METHOD_TITLES.get(m, m))]
            for ds in cols:
                s = _cell_text(cells.get((m, ds)))
                row.append(f"**{s}**" if m in best[ds] else s)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _latex_table(cells: _Cells, cols: list[str], layout: _Layout, best: dict[str, set[str]], title: str) -> str:
    ncol = len(cols) + 1
    lines = [f"% {' '.join(title.split())}"] if title else []
    lines += [
        r"\begin{tabular}{l" + "c" * len(cols) + "}",
        r"\toprule",
        " & ".join(["Method"] + [_latex_escape(DATASET_NAMES.get(ds, ds)) for ds in cols]) + r" \\",
    ]
    for group, methods in layout:
        lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{_latex_escape(group)}}}}} \\")
        for m in methods:
            row = [_latex_escape(METHOD_TITLES.get(m, m))]
            for ds in cols:
                s = _cell_text(cells.get((m, ds)), pm=r"$\pm$")
                row.append(rf"\textbf{{{s}}}" if m in best[ds] else s)
            lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- paired

PAIRED_ON: tuple[tuple[str, str], ...] = (("val", "validation"), ("test", "test"))
_Paired = Mapping[tuple[str, str], Mapping[str, "PairedDifference | None"]]


def paired_comparisons(
    records: Iterable[RunRecord], reference: str = "nngk", selection: str = "final", metric: str = "nngk_acc"
) -> dict[tuple[str, str], dict[str, PairedDifference | None]]:
    """Each method's paired difference against ``reference``, per data set.

    Keyed by ``(method, dataset)``; each value maps ``"val"`` (the validation accuracy
    of the selected model, ``summary[selection]["val_acc"]``) and ``"test"``
    (``summary[selection][metric]``) to a :class:`~mbdml.paired.PairedDifference`
    over the runs both methods have (run r: the same split), or None where they share
    no run. Data sets without the reference are left out.
    """
    if selection not in ("final", "best_val"):
        raise ValueError(f"paired comparisons are for the final or best_val model, not {selection!r}")
    figures: dict[tuple[str, str], dict[str, dict[int, float | None]]] = {}
    for r in records:
        f = figures.setdefault((r.method, r.dataset), {"val": {}, "test": {}})
        f["val"][r.key] = _lookup(r.summary, selection, "val_acc")
        f["test"][r.key] = _lookup(r.summary, selection, metric)
    out: dict[tuple[str, str], dict[str, PairedDifference | None]] = {}
    for (method, ds), f in sorted(figures.items()):
        ref = figures.get((reference, ds))
        if method == reference or ref is None:
            continue
        out[(method, ds)] = {on: paired_difference(f[on], ref[on]) for on, _ in PAIRED_ON}
    return out


def paired_between(
    records: Iterable[RunRecord], others: Iterable[RunRecord], selection: str = "final", metric: str = "nngk_acc"
) -> dict[tuple[str, str], dict[str, PairedDifference | None]]:
    """Each method of ``records`` against the same method of ``others`` (two results
    folders made with one setting changed, e.g. two class floors), paired by run: the
    same keys and values as :func:`paired_comparisons`."""
    if selection not in ("final", "best_val"):
        raise ValueError(f"paired comparisons are for the final or best_val model, not {selection!r}")

    def figures(recs: Iterable[RunRecord]) -> dict[tuple[str, str], dict[str, dict[int, float | None]]]:
        out: dict[tuple[str, str], dict[str, dict[int, float | None]]] = {}
        for r in recs:
            f = out.setdefault((r.method, r.dataset), {"val": {}, "test": {}})
            f["val"][r.key] = _lookup(r.summary, selection, "val_acc")
            f["test"][r.key] = _lookup(r.summary, selection, metric)
        return out

    ours, theirs = figures(records), figures(others)
    return {key: {on: paired_difference(f[on], theirs[key][on]) for on, _ in PAIRED_ON} for key, f in sorted(ours.items()) if key in theirs}


def format_paired(paired: _Paired, reference: str, style: str = "text", title: str = "") -> str:
    """A row per method, a column per data set and figure (validation, test): the mean
    paired difference against ``reference`` in points, its 95% interval and the
    sign-flip p-value. Only intervals that exclude 0 are marked (text: ``*``,
    markdown: bold); ``level`` is written where the interval holds 0. ``style``:
    ``"text"``, ``"markdown"`` or ``"csv"`` (raw fractions)."""
    if style not in ("text", "markdown", "csv"):
        raise ValueError(f"unknown paired-table style {style!r}; use text, markdown or csv")
    datasets = sorted({ds for _, ds in paired})
    layout = _layout(m for m, _ in paired)
    if style == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "reference", "dataset", "on", "n", "mean", "ci_low", "ci_high", "p_value", "verdict"])
        for _, methods in layout:
            for m in methods:
                for ds in datasets:
                    for on, _ in PAIRED_ON:
                        d = paired.get((m, ds), {}).get(on)
                        if d is not None:
                            w.writerow([m, reference, ds, on, d.n, repr(d.mean), "" if d.ci_low is None else repr(d.ci_low),
                                        "" if d.ci_high is None else repr(d.ci_high), repr(d.p_value), d.verdict])
        return buf.getvalue()
    head = ["Method"] + [f"{DATASET_NAMES.get(ds, ds)} {name}" for ds in datasets for _, name in PAIRED_ON]
    rows: list[list[str]] = []
    for _, methods in layout:
        for m in methods:
            row = [METHOD_TITLES.get(m, m)]
            for ds in datasets:
                for on, _ in PAIRED_ON:
                    d = paired.get((m, ds), {}).get(on)
                    if d is None:
                        row.append("-")
                        continue
                    text = d.format() + ("" if d.ci_low is None else f" n={d.n}")
                    if style == "markdown":
                        row.append(text if d.level else f"**{text}**")
                    else:
                        row.append(text + (" level" if d.level else " *"))
            rows.append(row)
    lines = []
    if style == "markdown":
        lines += [f"### {title}", ""] if title else []
        lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
        lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|")
        lines += ["| " + " | ".join(_md_escape(x) for x in row) + " |" for row in rows]
        lines += ["", f"Paired difference against {METHOD_TITLES.get(reference, reference)} in points, 95% interval, "
                  "sign-flip p-value; bold where the interval excludes 0."]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(r[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines += ([title] if title else []) + [line(head), rule] + [line(r) for r in rows]
    if not rows:
        lines.append(f"(no method shares runs with the reference {reference}; pass --reference with a method of these results)")
    lines += [rule, f"paired difference against {METHOD_TITLES.get(reference, reference)} in points [95% interval] p: "
              "* the interval excludes 0; level: it holds 0"]
    return "\n".join(lines) + "\n"


def _paired_title(selection: str, reference: str, metric: str) -> str:
    return (f"{_METRIC_NAMES.get(metric, metric)} (test) and validation accuracy of the {_SELECTION_TITLES[selection]}: "
            f"paired difference against {METHOD_TITLES.get(reference, reference)} over the runs on the same splits")


# ----------------------------------------------------------------------------- reports


def _title(selection: str, metric: str, cells: Mapping[tuple[str, str], Cell]) -> str:
    ns = sorted({c.n for c in cells.values()})
    unit = "fold" if metric == "cv_acc" else "run"
    runs = "" if not ns else f" over {ns[0]} {unit}{'s' if ns[0] != 1 else ''}" if len(ns) == 1 else f" over {ns[0]}-{ns[-1]} {unit}s"
    return f"{_METRIC_NAMES.get(metric, metric)} (%) of the {_SELECTION_TITLES[selection]}: mean ± std{runs}"


def _runs_csv(records: Sequence[RunRecord]) -> str:
    def val(x: Any) -> str:
        f = _number(x)
        return "" if f is None else (str(int(f)) if isinstance(x, int) else repr(f))

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUNS_CSV_COLUMNS)
    for r in records:
        s = r.summary
        fin = s.get("final") if isinstance(s.get("final"), Mapping) else {}
        bv = s.get("best_val") if isinstance(s.get("best_val"), Mapping) else {}
        ab = s.get("authors_best_on_test") if isinstance(s.get("authors_best_on_test"), Mapping) else {}
        w.writerow(
            [r.dataset, r.method, r.name, val(s.get("seed")), val(s.get("epochs"))]
            + [val(fin.get(k)) for k in ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi")]
            + [val(bv.get("epoch")), val(bv.get("nngk_acc")), val(ab.get("nngk_acc")), val(s.get("seconds"))]
        )
    return buf.getvalue()


def reference_list(reference: str | Sequence[str]) -> list[str]:
    """The reference methods of a report: ``"nngk,mixup"`` or a sequence, in order, each once."""
    names = reference.split(",") if isinstance(reference, str) else list(reference)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n and n not in out:
            out.append(n)
    return out or ["nngk"]


def write_report(
    results_dir: str | Path, out_dir: str | Path | None = None, metric: str = "nngk_acc", reference: str | Sequence[str] = "nngk",
    records: Sequence[RunRecord] | None = None,
) -> dict[str, Path]:
    """Write the tables of the runs under ``results_dir`` into ``out_dir`` (default: the same).

    Files: ``table_final.{md,csv,tex,txt}``, ``table_best_val.{md,csv,tex,txt}``,
    ``table_authors_best_on_test.md`` (always NNGK accuracy, the only metric it
    has), ``paired_final.{md,csv,txt}`` and ``paired_best_val.{md,csv,txt}`` (each
    method against ``reference``, paired by run; with several references, comma-separated,
    the first names these files and each other one adds ``paired_<selection>_vs_<method>``)
    and ``runs.csv`` (a row per run).
    ``records`` (default: every run, :func:`collect_runs`) are the runs in the tables.
    Returns the paths keyed by file name.
    """
    if records is None:
        records = collect_runs(results_dir)
    out = Path(results_dir if out_dir is None else out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the report folder {out} ({e}); give a writable --out folder") from e
    ext = {"md": "markdown", "csv": "csv", "tex": "latex", "txt": "text"}
    files: dict[str, str] = {}
    table_metric, name = _table_metric(records, metric)
    for selection in ("final", "best_val"):
        cells = aggregate(records, selection, table_metric)
        title = _title(selection, name, cells)
        for suffix, style in ext.items():
            files[f"table_{selection}.{suffix}"] = format_table(cells, style=style, title=title)
    cells = aggregate(records, "authors_best_on_test", "nngk_acc")
    files["table_authors_best_on_test.md"] = format_table(cells, style="markdown", title=_title("authors_best_on_test", "nngk_acc", cells))
    for i, ref in enumerate(reference_list(reference)):
        for selection in ("final", "best_val"):
            paired = paired_comparisons(records, ref, selection, metric)
            title = _paired_title(selection, ref, metric)
            stem = f"paired_{selection}" + ("" if i == 0 else f"_vs_{ref}")
            for suffix, style in (("md", "markdown"), ("csv", "csv"), ("txt", "text")):
                files[f"{stem}.{suffix}"] = format_paired(paired, ref, style=style, title=title)
    files["runs.csv"] = _runs_csv(records)
    paths: dict[str, Path] = {}
    for name, text in files.items():
        p = out / name
        try:
            p.write_text(text, encoding="utf-8", newline="")
        except OSError as e:
            raise DataError(f"cannot write {p} ({e}); give a writable --out folder") from e
        paths[name] = p
    return paths


def report_text(
    results_dir: str | Path, metric: str = "nngk_acc", reference: str | Sequence[str] = "nngk", records: Sequence[RunRecord] | None = None,
) -> str:
    """The text tables of the final model and of the best-on-validation model, each
    followed by its paired differences against ``reference``, for printing (of
    ``records``, default every run under ``results_dir``)."""
    if records is None:
        records = collect_runs(results_dir)
    parts = []
    table_metric, name = _table_metric(records, metric)
    for selection in ("final", "best_val"):
        cells = aggregate(records, selection, table_metric)
        parts.append(format_table(cells, style="text", title=_title(selection, name, cells)))
        for ref in reference_list(reference):
            paired = paired_comparisons(records, ref, selection, metric)
            parts.append(format_paired(paired, ref, style="text", title=_paired_title(selection, ref, metric)))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the results document


def _command(env: Mapping[str, Any]) -> str | None:
    """The run's command line as a user types it (``mbdml ...``), from environment.json."""
    cmd = env.get("command")
    if not isinstance(cmd, str) or not cmd.strip():
        return None
    words = cmd.split()
    for i, w in enumerate(words):  # .../mbdml/__main__.py, .../bin/mbdml, -m mbdml
        if w.endswith(("mbdml/__main__.py", "/mbdml")) or w == "mbdml":
            return " ".join(["mbdml"] + words[i + 1 :])
    return cmd


def _distinct(values: Iterable[Any]) -> list[str]:
    return sorted({str(v) for v in values if v not in (None, "")})


def _provenance(records: Sequence[RunRecord]) -> list[str]:
    """Commands, commits, machines, dates and minutes per run of these runs, as Markdown lines."""
    envs = [r.environment for r in records]
    commands = _distinct(_command(e) for e in envs)
    commits = _distinct(e.get("commit") for e in envs)
    machines = _distinct(
        f"{e.get('cpu', '?')} ({e.get('cpu_capability', '?')}), {e.get('threads', '?')} thread{'' if e.get('threads') == 1 else 's'}, "
        f"{e.get('device', '?')}, torch {e.get('torch', '?')}"
        for e in envs if e
    )
    sizes = _distinct(
        f"{r.summary['labelled_train']} labelled training, {r.summary.get('validation', '?')} validation, {r.summary.get('test', '?')} test"
        for r in records if r.summary.get("labelled_train") is not None
    )
    dates = _distinct(str(r.summary.get("finished", ""))[:10] for r in records)
    lines = ["Commands:", ""] + [f"    {c}" for c in commands or ["(not recorded)"]] + [""]
    lines.append(f"- commit: {', '.join(f'`{c}`' for c in commits) or 'not recorded'}")
    lines.append(f"- machine: {'; '.join(machines) or 'not recorded'}")
    if sizes:
        lines.append(f"- images per run: {'; '.join(sizes)}")
    lines.append(f"- finished: {dates[0] + (' to ' + dates[-1] if len(dates) > 1 else '') if dates else 'not recorded'}")
    minutes: dict[str, list[float]] = {}
    for r in records:
        sec = _number(r.summary.get("seconds"))
        if sec is not None:
            minutes.setdefault(r.method, []).append(sec / 60.0)
    if minutes:
        per = [f"{METHOD_TITLES.get(m, m)} {statistics.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})" for m, v in sorted(minutes.items())]
        lines.append(f"- minutes per run, mean (range): {', '.join(per)}")
    return lines + [""]


def versus_tables(folder: str | Path, records: Sequence[RunRecord], versus: str | Path, others: Sequence[RunRecord],
                  style: str = "text", metric: str = "nngk_acc") -> list[str]:
    """Each method of ``folder`` paired by run against the same method in ``versus`` (a
    folder made with one setting changed), for the final and the best-on-validation
    model; nothing for a pairing without shared runs."""
    out = []
    for selection, what in (("final", "final model"), ("best_val", "model best on validation")):
        paired = paired_between(records, others, selection, metric)
        if paired:
            title = f"{Path(folder).as_posix()} against {Path(versus).as_posix()}, {what}: paired difference over the runs on the same splits"
            out.append(format_paired(paired, Path(versus).as_posix(), style=style, title=title))
    return out


def results_document(results_dirs: Sequence[str | Path], reference: str | Sequence[str] = "nngk", metric: str = "nngk_acc",
                     command: str | None = None, runs_by_folder: Mapping[Any, Sequence[RunRecord]] | None = None,
                     versus: str | Path | None = None) -> str:
    """A Markdown page of the tables of several results folders, written from their run files.

    For each folder: how its runs were made (commands, commit, machine, dates, minutes
    per run, all read from the runs' environment.json and summary.json), the tables of
    the final and the best-on-validation model, the paired differences against
    ``reference`` (each of several, comma-separated), and the authors' best-on-test figure as a marked extra. ``command``
    is the command that wrote the page, named at its top. ``runs_by_folder``, keyed by
    folder, are runs already read (default: each folder is read here). ``versus``, a
    folder made with one setting changed, gets its own section, and each folder's
    methods are paired by run against the same methods there.
    """
    others: Sequence[RunRecord] | None = None
    if versus is not None:
        read = runs_by_folder.get(versus) if runs_by_folder is not None else None
        others = list(read) if read is not None else collect_runs(versus)
    out = ["# Results", ""]
    if command:
        out += [f"Written by `{command}` from the run summaries; do not edit by hand.", ""]
    for folder in results_dirs:
        read = runs_by_folder.get(folder) if runs_by_folder is not None else None
        records = list(read) if read is not None else collect_runs(folder)
        out += [f"## {Path(folder).as_posix()}", ""]
        out += _provenance(records)
        for selection in ("final", "best_val"):
            cells = aggregate(records, selection, metric)
            out.append(format_table(cells, style="markdown", title=_title(selection, metric, cells)))
            for ref in reference_list(reference):
                paired = paired_comparisons(records, ref, selection, metric)
                if paired:
                    out.append(format_paired(paired, ref, style="markdown", title=_paired_title(selection, ref, metric)))
        cells = aggregate(records, "authors_best_on_test", "nngk_acc")
        if cells:
            out.append(format_table(cells, style="markdown", title=_title("authors_best_on_test", "nngk_acc", cells), mark_best=False))
        if versus is not None and others is not None and Path(versus).resolve() != Path(folder).resolve():
            out += versus_tables(folder, records, versus, others, style="markdown", metric=metric)
    return "\n".join(out).rstrip() + "\n"
