"""Tests of mbdml.report: tables recomputed from the per-run summary files."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from pathlib import Path

import pytest

from mbdml.errors import DataError
from mbdml.methods import METHOD_GROUPS, METHOD_TITLES, table_sections
from mbdml.report import (
    PAPER_DATASETS,
    PAPER_TABLE,
    RUNS_CSV_COLUMNS,
    Cell,
    RunRecord,
    aggregate,
    collect_runs,
    format_table,
    paper_cells,
    report_text,
    write_report,
)

DATASETS = ("digits", "cifar10")
# Deliberately out of group order, with one unknown method.
METHODS = ("mbdml2", "nngk", "triplet", "mystery")
RUNS = (0, 1, 2)


def _value(ds: int, m: int, r: int) -> float:
    """A distinct, deterministic accuracy per data set, method and run."""
    return round(0.5 + 0.1 * m + 0.05 * ds + 0.013 * r * (m + 1) + 0.0007 * r * r, 6)


def _summary(dataset: str, method: str, run: int, acc: float | None, best: float | None) -> dict:
    return {
        "method": method,
        "dataset": dataset,
        "seed": 100 + run,
        "run": run,
        "epochs": 30,
        "labelled_train": 126,
        "validation": 10,
        "test": 450,
        "final": {"epoch": 30, "nngk_acc": acc, "knn_acc": None if acc is None else acc - 0.01, "precision_at_1": 0.9, "map_at_r": 0.8, "nmi": 0.7},
        "best_val": {"epoch": 20, "val_acc": 0.9, "nngk_acc": best, "knn_acc": 0.9, "precision_at_1": None, "map_at_r": None, "nmi": None},
        "authors_best_on_test": {"epoch": 70, "nngk_acc": None if acc is None else acc + 0.02, "note": "optimistic"},
        "seconds": 14.2,
        "train_seconds_per_epoch": 0.3,
        "run_dir": "x",
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Fake results: 2 data sets x 4 methods x 3 runs, one null value, one corrupt file."""
    root = tmp_path / "results"
    for i, ds in enumerate(DATASETS):
        for j, m in enumerate(METHODS):
            for r in RUNS:
                d = root / ds / m / f"run{r}"
                d.mkdir(parents=True)
                acc: float | None = _value(i, j, r)
                if (ds, m, r) == ("digits", "nngk", 1):
                    acc = None  # the null value
                (d / "summary.json").write_text(json.dumps(_summary(ds, m, r, acc, _value(i, j, r) - 0.03)))
    # a corrupt (half-written) summary of a fourth run
    bad = root / "digits" / "mbdml2" / "run3"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text('{"method": "mbdml2", "final": {"nngk_')
    # clutter that must be ignored
    (root / "digits" / "mbdml2" / "runs.txt").write_text("x")
    (root / "table_final.md").write_text("old")
    return root


def _from_files(root: Path, selection: str, metric: str) -> dict[tuple[str, str], list[float]]:
    """Per (method, dataset) values read straight from the summary files (independent of report.py)."""
    out: dict[tuple[str, str], list[float]] = {}
    for p in sorted(root.glob("*/*/run*/summary.json")):
        try:
            s = json.loads(p.read_text())
        except ValueError:
            continue
        v = s[selection][metric]
        if v is not None:
            out.setdefault((p.parents[1].name, p.parents[2].name), []).append(v)
    return out


# ----------------------------------------------------------------------------- collecting


def test_collect_runs_skips_corrupt_with_warning(results: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        recs = collect_runs(results)
    assert len(recs) == len(DATASETS) * len(METHODS) * len(RUNS)
    assert all(isinstance(r, RunRecord) for r in recs)
    assert {(r.dataset, r.method) for r in recs} == {(d, m) for d in DATASETS for m in METHODS}
    assert {r.run for r in recs} == set(RUNS)
    assert any("run3" in rec.getMessage() and "summary.json" in rec.getMessage() for rec in caplog.records)
    assert recs == sorted(recs, key=lambda r: (r.dataset, r.method, r.run))


def test_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        collect_runs(missing)
    with pytest.raises(DataError, match="nowhere"):
        write_report(missing)


def test_empty_or_all_corrupt_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no run summaries"):
        collect_runs(tmp_path)
    d = tmp_path / "digits" / "nngk" / "run0"
    d.mkdir(parents=True)
    (d / "summary.json").write_text("[1, 2")
    with pytest.raises(DataError, match="unreadable"):
        collect_runs(tmp_path)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    ("selection", "metric"),
    [("final", "nngk_acc"), ("final", "knn_acc"), ("best_val", "nngk_acc"), ("authors_best_on_test", "nngk_acc")],
)
def test_mean_std_recomputed_from_run_files(results: Path, selection: str, metric: str) -> None:
    cells = aggregate(collect_runs(results), selection, metric)
    expected = _from_files(results, selection, metric)
    assert set(cells) == set(expected)
    for key, vals in expected.items():
        c = cells[key]
        assert c.n == len(vals)
        assert sorted(c.values) == sorted(vals)
        assert c.mean == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert c.std == pytest.approx(statistics.stdev(vals), abs=1e-12)


def test_null_value_left_out(results: Path) -> None:
    cells = aggregate(collect_runs(results))
    assert cells[("nngk", "digits")].n == 2
    assert cells[("nngk", "cifar10")].n == 3
    # best_val has that run's value, so it counts there
    assert aggregate(collect_runs(results), "best_val")[("nngk", "digits")].n == 3


def test_single_run_std_zero_and_missing_metric() -> None:
    recs = [RunRecord("digits", "nngk", 0, _summary("digits", "nngk", 0, 0.9, 0.8))]
    c = aggregate(recs)[("nngk", "digits")]
    assert (c.mean, c.std, c.n, c.values) == (0.9, 0.0, 1, [0.9])
    assert aggregate(recs, "authors_best_on_test", "knn_acc") == {}
    with pytest.raises(ValueError, match="selection"):
        aggregate(recs, "best_test")


# ----------------------------------------------------------------------------- tables


def _row_order(text: str, names: list[str]) -> list[int]:
    return [text.index(n) for n in names]


def test_grouping_order(results: Path) -> None:
    cells = aggregate(collect_runs(results))
    for style in ("text", "markdown", "latex"):
        t = format_table(cells, style=style)
        order = ["Baseline losses", "Triplet", "Original methods", "NNGK", "MbDML2", "Other", "mystery"]
        pos = _row_order(t, order)
        assert pos == sorted(pos), style
        # groups and methods without data are skipped
        for absent in ("Contrastive", "Softmax", "MbDML1", "MbDML3"):
            assert absent not in t
    rows = list(csv.DictReader(io.StringIO(format_table(cells, style="csv"))))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == ["triplet", "nngk", "mbdml2", "mystery"]
    # the paper's layout (its methods last), then ours that also use the unlabelled images
    assert [g.title for g in table_sections()] == ["Baseline losses", "Original methods", "MbDML", "Semi-supervised (ours)"]


def test_every_registered_method_has_a_table_name_and_group() -> None:
    """No method of the package falls into "Other" or shows its registry name."""
    from mbdml.methods import METHODS

    grouped = [m for g in table_sections() for m in g.methods]
    assert sorted(grouped) == sorted(METHODS) and len(grouped) == len(set(grouped))
    assert set(METHOD_TITLES) == set(METHODS)
    assert all(set(g.methods) <= set(METHODS) for g in METHOD_GROUPS)


def test_dataset_order_given_or_sorted(results: Path) -> None:
    cells = aggregate(collect_runs(results))
    t = format_table(cells, style="markdown")
    assert t.index("CIFAR-10") < t.index("Digits")
    t = format_table(cells, ["digits", "cifar10"], style="markdown")
    assert t.index("Digits") < t.index("CIFAR-10")


def _cells_for_marking() -> dict[tuple[str, str], Cell]:
    return {
        ("nngk", "a"): Cell(0.70, 0.01, 3, [0.69, 0.70, 0.71]),
        ("mbdml1", "a"): Cell(0.80, 0.02, 3, [0.78, 0.80, 0.82]),
        ("triplet", "b"): Cell(0.60, 0.0, 1, [0.60]),
        ("mbdml1", "b"): Cell(0.50, 0.0, 1, [0.50]),
    }


def test_best_marking_each_style() -> None:
    cells = _cells_for_marking()
    text = format_table(cells, style="text")
    assert "80.00 ± 2.00*" in text and "70.00 ± 1.00*" not in text
    assert "60.00 ± 0.00*" in text and "50.00 ± 0.00*" not in text
    md = format_table(cells, style="markdown")
    assert "**80.00 ± 2.00**" in md and "**70.00" not in md and "**60.00 ± 0.00**" in md
    tex = format_table(cells, style="latex")
    assert r"\textbf{80.00 $\pm$ 2.00}" in tex and r"\textbf{70.00" not in tex
    assert r"\textbf{60.00 $\pm$ 0.00}" in tex and r"\textbf{50.00" not in tex
    plain = format_table(cells, style="text", mark_best=False)
    assert "*" not in plain
    assert "**" not in format_table(cells, style="markdown", mark_best=False)
    assert r"\textbf" not in format_table(cells, style="latex", mark_best=False)
    assert "*" not in format_table(cells, style="csv")


def test_missing_cells_dash() -> None:
    cells = _cells_for_marking()
    md = format_table(cells, style="markdown")
    nngk_row = next(line for line in md.splitlines() if line.startswith("| NNGK"))
    assert nngk_row.rstrip(" |").endswith("-")  # no value on data set "b"
    text = format_table(cells, ["a", "b", "c"], style="text")
    nngk_line = next(line for line in text.splitlines() if "NNGK" in line)
    assert nngk_line.split().count("-") == 2
    tex = format_table(cells, style="latex")
    assert any(line.startswith("Triplet & - &") for line in tex.splitlines())


def test_text_columns_aligned() -> None:
    lines = format_table(_cells_for_marking(), style="text", title="T").splitlines()
    assert lines[0] == "T"
    rows = [line for line in lines if "±" in line]
    assert len({line.index("±") for line in rows if line.count("±") == 2}) == 1


def test_csv_round_trip(results: Path) -> None:
    cells = aggregate(collect_runs(results))
    rows = list(csv.DictReader(io.StringIO(format_table(cells, style="csv"))))
    assert len(rows) == len(cells)
    assert set(rows[0]) == {"group", "method", "dataset", "mean", "std", "n", "values"}
    expected = _from_files(results, "final", "nngk_acc")
    for row in rows:
        key = (row["method"], row["dataset"])
        c = cells[key]
        assert float(row["mean"]) == c.mean and float(row["std"]) == c.std and int(row["n"]) == c.n
        vals = [float(v) for v in row["values"].split(";")]
        assert vals == c.values
        assert float(row["mean"]) == pytest.approx(statistics.mean(expected[key]), abs=1e-12)
    groups = {r["method"]: r["group"] for r in rows}
    assert groups == {"triplet": "Baseline losses", "nngk": "Original methods", "mbdml2": "MbDML", "mystery": "Other"}


def test_latex_balanced_and_booktabs(results: Path) -> None:
    t = format_table(aggregate(collect_runs(results)), style="latex", title="NNGK acc_% & stuff")
    assert t.count("{") == t.count("}")
    depth = 0
    for ch in t.replace(r"\{", "").replace(r"\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert r"$\pm$" in t and "±" not in t
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert rule in t
    assert t.count(r"\midrule") == 4  # after the header and between the 4 groups
    assert t.count("$") % 2 == 0


def test_unknown_style() -> None:
    with pytest.raises(ValueError, match="style"):
        format_table(_cells_for_marking(), style="html")


def test_empty_cells_still_format() -> None:
    for style in ("text", "markdown", "latex", "csv"):
        assert isinstance(format_table({}, style=style), str)


# ----------------------------------------------------------------------------- reports


def test_write_report_writes_every_file(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(results, out)
    names = {f"table_{s}.{e}" for s in ("final", "best_val") for e in ("md", "csv", "tex", "txt")}
    names |= {f"paired_{s}.{e}" for s in ("final", "best_val") for e in ("md", "csv", "txt")}
    names |= {"table_authors_best_on_test.md", "runs.csv"}
    assert set(paths) == names
    for name, p in paths.items():
        assert p == out / name and p.is_file() and p.stat().st_size > 0
    runs = list(csv.DictReader(paths["runs.csv"].open(encoding="utf-8", newline="")))
    assert tuple(runs[0]) == RUNS_CSV_COLUMNS
    assert len(runs) == len(DATASETS) * len(METHODS) * len(RUNS)
    null_row = next(r for r in runs if (r["dataset"], r["method"], r["run"]) == ("digits", "nngk", "1"))
    assert null_row["final_nngk_acc"] == "" and null_row["seed"] == "101" and null_row["best_val_epoch"] == "20"
    # the saved CSV table matches the per-run file
    fin = list(csv.DictReader(paths["table_final.csv"].open(encoding="utf-8", newline="")))
    by_key: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        if r["final_nngk_acc"]:
            by_key.setdefault((r["method"], r["dataset"]), []).append(float(r["final_nngk_acc"]))
    for row in fin:
        vals = by_key[(row["method"], row["dataset"])]
        assert float(row["mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
    # default out_dir is the results folder
    assert write_report(results)["runs.csv"].parent == results


def test_report_text(results: Path) -> None:
    t = report_text(results)
    assert "final model" in t and "best validation" in t
    assert t.count("Method") == 4  # two tables of means, each followed by its paired differences
    assert t.count("over the runs on the same splits") == 2  # the paired tables' titles
    vals = _from_files(results, "final", "nngk_acc")[("mbdml2", "cifar10")]
    assert f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}" in t


# ----------------------------------------------------------------------------- paper


def test_paper_table() -> None:
    assert set(PAPER_TABLE) == {"contrastive", "proxyanchor", "softtriple", "supcon", "triplet", "mixup", "nngk", "mbdml1", "mbdml2", "mbdml3"}
    assert all(set(row) == set(PAPER_DATASETS) for row in PAPER_TABLE.values())
    cells = paper_cells()
    text = format_table(cells, list(PAPER_DATASETS), style="text")
    assert "78.95 ± 0.32*" in text  # MbDML1 best on CIFAR-10
    assert "49.43 ± 0.39*" in text  # MbDML2 best on CIFAR-100
    assert "98.90 ± 0.11*" in text  # ProxyAnchor best on MNIST
    assert "82.62 ± 1.27*" in text  # MbDML2 best on Flowers17
    assert text.count("*") == 4 + 1  # four marks and the legend
    md = format_table(cells, list(PAPER_DATASETS), style="markdown")
    assert "| MbDML1 | **78.95 ± 0.32** |" in md
    assert "| MbDML2 | 77.89 ± 0.40 | **49.43 ± 0.39** |" in md
    for method, row in PAPER_TABLE.items():
        for ds, (mean, std) in row.items():
            assert f"{mean:.2f} ± {std:.2f}" in text
            assert cells[(method, ds)].mean == pytest.approx(mean / 100)


# ----------------------------------------------------------------------------- paired


def _paired_results(root: Path) -> Path:
    """digits: nngk and two methods over 4 runs, known per-run figures; mbdml1 lacks run 3.

    test: mbdml2 - nngk = +1.0, +1.2, +0.8, +1.0 points (interval excludes 0);
          mbdml1 - nngk = +2, -2, +1 points over runs 0-2 (level).
    validation (final.val_acc): mbdml2 - nngk = 0, 0, 0, 0 (level, p = 1).
    """
    test = {"nngk": [0.80, 0.70, 0.75, 0.78], "mbdml2": [0.81, 0.712, 0.758, 0.79], "mbdml1": [0.82, 0.68, 0.76, None]}
    val = {"nngk": [0.9, 0.8, 0.85, 0.88], "mbdml2": [0.9, 0.8, 0.85, 0.88], "mbdml1": [0.91, 0.8, 0.86, None]}
    for m in test:
        for r in range(4):
            if test[m][r] is None:
                continue
            s = _summary("digits", m, r, test[m][r], test[m][r])
            s["final"]["val_acc"] = val[m][r]
            d = root / "digits" / m / f"run{r}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(s))
    return root


def test_paired_comparisons_known_answers(tmp_path: Path) -> None:
    from mbdml.report import paired_comparisons

    records = collect_runs(_paired_results(tmp_path / "r"))
    paired = paired_comparisons(records, reference="nngk")
    assert set(paired) == {("mbdml1", "digits"), ("mbdml2", "digits")}
    m2 = paired[("mbdml2", "digits")]
    assert m2["test"].n == 4 and m2["test"].mean == pytest.approx(0.01)
    assert not m2["test"].level and m2["test"].verdict == "higher"
    assert m2["test"].p_value == pytest.approx(2 / 16)
    assert m2["val"].mean == pytest.approx(0.0) and m2["val"].level and m2["val"].p_value == 1.0
    m1 = paired[("mbdml1", "digits")]
    assert m1["test"].runs == (0, 1, 2) and m1["test"].mean == pytest.approx(1 / 300)
    assert m1["test"].level
    # Against mbdml2 instead: nngk is now a row, 0.01 lower.
    other = paired_comparisons(records, reference="mbdml2")
    assert other[("nngk", "digits")]["test"].verdict == "lower"


def test_paired_tables_mark_only_intervals_that_exclude_zero(tmp_path: Path) -> None:
    from mbdml.report import format_paired, paired_comparisons

    paired = paired_comparisons(collect_runs(_paired_results(tmp_path / "r")), reference="nngk")
    text = format_paired(paired, "nngk", style="text")
    row2 = next(line for line in text.splitlines() if line.startswith("MbDML2"))
    row1 = next(line for line in text.splitlines() if line.startswith("MbDML1"))
    assert "+1.00 [" in row2 and row2.rstrip().endswith("*")  # test: excludes 0
    assert "+0.00" in row2 and "level" in row2  # validation: level
    assert "*" not in row1 and row1.count("level") == 2
    md = format_paired(paired, "nngk", style="markdown")
    assert md.count("**") == 2  # one bold cell: MbDML2's test difference
    rows = list(csv.DictReader(io.StringIO(format_paired(paired, "nngk", style="csv"))))
    assert {(r["method"], r["on"], r["verdict"]) for r in rows} == {
        ("mbdml2", "val", "level"), ("mbdml2", "test", "higher"), ("mbdml1", "val", "level"), ("mbdml1", "test", "level")}
    none = format_paired(paired_comparisons(collect_runs(tmp_path / "r"), reference="softmax"), "softmax")
    assert "--reference" in none


def test_best_marking_includes_the_methods_level_with_the_best(tmp_path: Path) -> None:
    cells = aggregate(collect_runs(_paired_results(tmp_path / "r")), "final", "nngk_acc")
    text = format_table(cells, style="text")
    marked = {line.split()[0] for line in text.splitlines() if line.rstrip().endswith("*") and line.startswith("  ")}
    # mbdml2 has the best mean; mbdml1 is level with it (its 3 paired runs disagree);
    # nngk is 1 point below mbdml2 on every run: not marked, though level with mbdml1.
    assert marked == {"MbDML1", "MbDML2"}


def test_write_report_writes_the_paired_tables(tmp_path: Path) -> None:
    paths = write_report(_paired_results(tmp_path / "r"), tmp_path / "out", reference="nngk")
    for name in ("paired_final.md", "paired_final.csv", "paired_final.txt", "paired_best_val.md"):
        assert name in paths and paths[name].read_text()
    assert "paired difference against NNGK" in report_text(tmp_path / "r")


def test_results_document_from_the_run_files(tmp_path: Path) -> None:
    """docs/results.md is written by `mbdml report --doc` from the run files: the
    commands, commit, CPU, dates and minutes come from environment.json and summary.json."""
    from mbdml.cli import main

    root = _paired_results(tmp_path / "digits-table")
    for i, env_path in enumerate(sorted(root.glob("*/*/run*"))):
        (env_path / "environment.json").write_text(json.dumps({
            "command": "/x/.venv/lib/python3.11/site-packages/mbdml/__main__.py compare --datasets digits --runs 4",
            "commit": "a" * 40, "cpu": "Test CPU", "cpu_capability": "AVX2", "threads": 2, "device": "cpu", "torch": "2.13.0"}))
        s = json.loads((env_path / "summary.json").read_text())
        s["seconds"] = 60.0 * (1 + i % 3)
        s["finished"] = f"2026-12-0{1 + i % 2}T10:00:00+0000"
        s.update(labelled_train=126, validation=10, test=450)
        (env_path / "summary.json").write_text(json.dumps(s))
    doc = tmp_path / "docs" / "results.md"
    assert main(["report", str(root), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Results") and f"mbdml report {root} --doc {doc}" in text
    assert "    mbdml compare --datasets digits --runs 4" in text
    assert f"`{'a' * 40}`" in text and "Test CPU (AVX2), 2 threads, cpu" in text
    assert "2026-12-01 to 2026-12-02" in text and "minutes per run" in text
    assert "- images per run: 126 labelled training, 10 validation, 450 test" in text
    assert "paired difference against NNGK" in text.replace("Paired difference", "paired difference")
    assert "**+1.00 [+0.74, +1.26] p=0.12 n=4**" in text  # MbDML2's test difference, the one marked
    # a --doc path that cannot be written: one line, exit status 2
    (tmp_path / "afile").write_text("x")
    assert main(["report", str(root), "--doc", str(tmp_path / "afile" / "results.md")]) == 2


def test_several_references_give_a_paired_table_each(tmp_path: Path) -> None:
    """--reference nngk,mbdml2: the first names the usual files, the second adds its own;
    the page and the printed text hold both, each against its own reference."""
    from mbdml.cli import main
    from mbdml.report import reference_list

    assert reference_list("nngk, mixup,nngk,") == ["nngk", "mixup"] and reference_list([]) == ["nngk"]
    root = _paired_results(tmp_path / "r")
    doc = tmp_path / "results.md"
    assert main(["report", str(root), "--reference", "nngk,mbdml2", "--doc", str(doc)]) == 0
    first = (root / "paired_final.csv").read_text()
    second = (root / "paired_final_vs_mbdml2.csv").read_text()
    assert "mbdml2,nngk,digits,test,4," in first
    # against MbDML2, NNGK is 1.0 point lower on test: the sign turns over
    row = next(line for line in second.splitlines() if line.startswith("nngk,mbdml2,digits,test,"))
    assert float(row.split(",")[5]) == pytest.approx(-0.01)
    text = doc.read_text()
    assert "--reference nngk,mbdml2" in text
    assert "paired difference against NNGK" in text and "paired difference against MbDML2" in text


def test_paired_between_two_folders_that_differ_in_one_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same methods in two folders (e.g. two class floors): paired by run."""
    from mbdml.cli import main
    from mbdml.report import paired_between

    a = _paired_results(tmp_path / "a")
    b = _paired_results(tmp_path / "b")
    for p in (b / "digits" / "mbdml2").glob("run*/summary.json"):  # b's mbdml2 is 0.5 point lower on test
        s = json.loads(p.read_text())
        s["final"]["nngk_acc"] -= 0.005
        p.write_text(json.dumps(s))
    paired = paired_between(collect_runs(a), collect_runs(b))
    assert paired[("mbdml2", "digits")]["test"].mean == pytest.approx(0.005)
    assert paired[("mbdml2", "digits")]["test"].verdict == "higher"
    assert paired[("nngk", "digits")]["test"].mean == pytest.approx(0.0) and paired[("nngk", "digits")]["test"].level
    assert main(["report", str(a), "--versus", str(b)]) == 0
    out = capsys.readouterr().out
    assert f"{a} against {b}, final model" in out and "+0.50 [+0.50, +0.50]" in out
    # the page holds the same pairing, and names --versus in its command
    doc = tmp_path / "results.md"
    assert main(["report", str(a), "--versus", str(b), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert f"--versus {b} --doc {doc}" in text
    assert f"{a.as_posix()} against {b.as_posix()}, final model" in text and "**+0.50 [+0.50, +0.50]" in text
