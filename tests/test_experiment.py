"""The comparison protocol: runs x methods, resumable, parallel, tables from per-run files."""

import csv
import dataclasses
import json
import shutil
import statistics

import pytest

from mbdml.cli import main
from mbdml.config import RunConfig, make_config
from mbdml.errors import ConfigError
from mbdml.experiment import RESULT_NEUTRAL_FIELDS, compare, plan
from mbdml.train import train


def base(tmp_path, **kw):
    values = dict(dataset="digits", width=8, embedding_dim=16, max_epochs=2, update_interval=1, k=20, batch_size=32, sigma=0.5,
                  retrieval_metrics=False, cache_dir=str(tmp_path / "cache"), progress=False)
    values.update(kw)
    return make_config(**values)


def test_compare_writes_runs_tables_and_curves_that_agree(tmp_path):
    out = tmp_path / "res"
    paths = compare(base(tmp_path), ["digits"], ["nngk", "mbdml2"], runs=2, results_dir=out, progress=False)
    finals = {m: [json.loads((out / "digits" / m / f"run{r}" / "summary.json").read_text())["final"]["nngk_acc"] for r in range(2)] for m in ("nngk", "mbdml2")}
    seeds = {json.loads((out / "digits" / "nngk" / f"run{r}" / "summary.json").read_text())["seed"] for r in range(2)}
    assert seeds == {0, 1}  # each run its own seeded split
    with open(out / "table_final.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for method, values in finals.items():
        assert float(rows[method]["mean"]) == pytest.approx(statistics.mean(values))
        assert float(rows[method]["std"]) == pytest.approx(statistics.stdev(values))
    assert "curves_digits_test_acc" in paths and paths["curves_digits_test_acc"].read_bytes()[:4] == b"\x89PNG"


def test_interrupted_compare_skips_finished_runs(tmp_path):
    out = tmp_path / "res"
    seen = []

    class Stop(Exception):
        pass

    def stop_after_first(job, summary):
        seen.append(job.label)
        raise Stop

    with pytest.raises(Stop):
        compare(base(tmp_path), ["digits"], ["nngk", "mixup"], runs=2, results_dir=out, progress=False, on_run_end=stop_after_first)
    first = out / seen[0] / "summary.json"
    stamp = first.stat().st_mtime_ns
    again = []
    compare(base(tmp_path), ["digits"], ["nngk", "mixup"], runs=2, results_dir=out, progress=False, on_run_end=lambda j, s: again.append(j.label))
    assert len(again) == 3 and seen[0] not in again
    assert first.stat().st_mtime_ns == stamp
    # Other settings in the same folder are refused rather than mixed into one table.
    with pytest.raises(ConfigError, match="other settings.*sigma: 0.5 there, 0.7 asked"):
        compare(base(tmp_path, sigma=0.7), ["digits"], ["nngk", "mixup"], runs=2, results_dir=out, progress=False)


def test_parallel_jobs(tmp_path):
    out = tmp_path / "res"
    compare(base(tmp_path, max_epochs=1), ["digits"], ["nngk", "mixup"], runs=1, results_dir=out, jobs=2, progress=False)
    assert (out / "digits" / "nngk" / "run0" / "summary.json").is_file()
    assert (out / "digits" / "mixup" / "run0" / "summary.json").is_file()


def test_plan_gives_every_run_its_own_seed_and_fold(tmp_path):
    jobs = plan(base(tmp_path, seed=5, split="folds", labelled_fraction=0.2), ["digits"], ["nngk", "mbdml1"], 3, tmp_path)
    assert len(jobs) == 6
    assert {(j.method, j.run, j.config.seed) for j in jobs} == {(m, r, 5 + r) for m in ("nngk", "mbdml1") for r in range(3)}
    with pytest.raises(ConfigError, match="runs"):
        plan(base(tmp_path), ["digits"], ["nngk"], 0, tmp_path)


def test_plan_gives_the_strong_view_only_to_the_semi_supervised_methods(tmp_path):
    jobs = plan(base(tmp_path, pseudo_augment="randaugment"), ["digits"], ["mbdml1", "mbdml1_semi", "mixup"], 1, tmp_path)
    got = {j.method: j.config.pseudo_augment for j in jobs}
    assert got == {"mbdml1": "standard", "mbdml1_semi": "randaugment", "mixup": "standard"}
    for j in jobs:
        j.config.validate()  # each configuration is one a run accepts


@pytest.mark.parametrize("method", ["contrastive", "proxyanchor", "softtriple", "supcon", "triplet"])
def test_each_baseline_trains_and_lowers_its_loss_on_real_digits(tmp_path, method):
    res = train(base(tmp_path, method=method, max_epochs=6, labelled_fraction=0.3, eval_every=6, save_dir=str(tmp_path), name=method))
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < losses[0]
    assert res.summary["final"]["nngk_acc"] > 0.2  # well above chance (0.1)


def test_plan_trains_a_teacher_stage_only_for_the_supervised_methods(tmp_path):
    # the semi-supervised methods label the unlabelled images themselves: no teacher stage for them
    jobs = plan(base(tmp_path, teacher_epochs=3), ["digits"], ["mbdml1", "mbdml1_semi", "mixup"], 1, tmp_path)
    got = {j.method: j.config.teacher_epochs for j in jobs}
    assert got == {"mbdml1": 3, "mbdml1_semi": None, "mixup": 3}
    for j in jobs:
        j.config.validate()


# ------------------------------------------------------------------ one folder, one set of settings
TINY_FLAGS = ["--width", "8", "--embedding_dim", "16", "--max_epochs", "1", "--update_interval", "1", "--k", "20", "--batch_size", "32",
              "--sigma", "0.5", "--retrieval_metrics", "False", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished comparison: nngk and mixup, two runs each, one epoch."""
    tmp = tmp_path_factory.mktemp("finished")
    compare(base(tmp, max_epochs=1), ["digits"], ["nngk", "mixup"], runs=2, results_dir=tmp / "res", progress=False)
    return tmp / "res"


@pytest.fixture
def folder(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "res")
    return tmp_path / "res"


def stamps(root):
    return {p: p.stat().st_mtime_ns for p in root.glob("*/*/run*/*") if p.is_file()}


@pytest.mark.parametrize(
    "change, methods, needle",
    [
        ({"seed": 1}, ["nngk", "mixup"], "seed: 0 there, 1 asked"),
        ({"max_epochs": 2}, ["mbdml2"], "max_epochs: 1 there, 2 asked"),  # no run in common: still one table
        ({"learning_rate": 0.01}, ["nngk"], "learning_rate: 0.001 there, 0.01 asked"),
    ],
)
def test_a_folder_made_with_other_settings_is_refused_with_what_differs(folder, tmp_path, change, methods, needle):
    before, compare_json = stamps(folder), (folder / "compare.json").read_text()
    with pytest.raises(ConfigError, match="holds runs made with other settings") as err:
        compare(base(tmp_path, **{"max_epochs": 1, **change}), ["digits"], methods, runs=2, results_dir=folder, progress=False)
    assert needle in str(err.value) and "Use another --results_dir, or the same settings" in str(err.value)
    assert stamps(folder) == before and (folder / "compare.json").read_text() == compare_json
    assert not (folder / "digits" / "mbdml2").exists()


def test_settings_that_change_no_result_may_differ(folder, tmp_path):
    before = stamps(folder)
    compare(base(tmp_path, max_epochs=1, cache_dir=str(tmp_path / "elsewhere"), device="cpu", compile=False, tsne_graph=True),
            ["digits"], ["nngk", "mixup"], runs=2, results_dir=folder, progress=False)
    assert stamps(folder) == before  # every run was finished already
    assert set(RESULT_NEUTRAL_FIELDS) < {f.name for f in dataclasses.fields(RunConfig)}


def test_the_table_shows_exactly_the_methods_runs_and_data_sets_asked_for(folder, capsys):
    assert main(["compare", "--methods", "nngk", "--runs", "1", "--results_dir", str(folder), *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "NNGK" in out and "Mixup" not in out and "over 1 run\n" in out and "over 2 runs" not in out
    with open(folder / "runs.csv", newline="") as f:
        assert [(r["method"], r["run"]) for r in csv.DictReader(f)] == [("nngk", "0")]


def test_a_corrupt_summary_means_the_run_is_not_finished(folder, tmp_path, capsys):
    summary = folder / "digits" / "nngk" / "run1" / "summary.json"
    good = json.loads(summary.read_text())
    summary.write_text('{"method": "nngk", "final": {"nngk_')  # half-written
    assert main(["report", str(folder)]) == 0
    assert capsys.readouterr().err.count("skipping") == 1  # one warning, once
    others = {p: t for p, t in stamps(folder).items() if "run1" not in str(p) or "nngk" not in str(p)}
    compare(base(tmp_path, max_epochs=1), ["digits"], ["nngk", "mixup"], runs=2, results_dir=folder, progress=False)
    again = json.loads(summary.read_text())
    assert again["final"] == good["final"] and again["epochs"] == 1  # finished from its checkpoint, not retrained
    assert {p: t for p, t in stamps(folder).items() if p in others} == others


def test_cross_validated_compare_pairs_methods_by_fold_and_never_evaluates_the_test_set(tmp_path):
    """--cv 3: every run trains three times, each validating on a different third of the
    labelled images (together: all of them, once each); no test figure is computed; the
    methods are paired by (run, fold)."""
    from mbdml.report import collect_runs, paired_comparisons
    from mbdml.training_data import prepare_data

    out = tmp_path / "cv"
    cfg = base(tmp_path, max_epochs=1, cv_folds=3)
    compare(cfg, ["digits"], ["nngk", "mixup"], runs=1, results_dir=out, progress=False)
    folders = sorted(p.name for p in (out / "digits" / "nngk").iterdir() if p.is_dir())
    assert folders == ["run0-fold0", "run0-fold1", "run0-fold2"]
    for name in folders:
        summary = json.loads((out / "digits" / "nngk" / name / "summary.json").read_text())
        assert summary["final"]["val_acc"] is not None and summary["final"]["nngk_acc"] is None and summary["test"] == 0
    # the three validation parts are disjoint and cover the labelled images of run 0
    one = prepare_data(dataclasses.replace(cfg, cv_folds=None).resolved())
    vals = [prepare_data(dataclasses.replace(cfg, cv_fold=f).resolved()).val.images for f in range(3)]
    assert sum(len(v) for v in vals) == len(one.train) + len(one.val)
    seen = {bytes(img.numpy()) for v in vals for img in v}
    assert len(seen) == sum(len(v) for v in vals)
    paired = paired_comparisons(collect_runs(out), reference="nngk")
    diff = paired[("mixup", "digits")]
    assert diff["val"].n == 3 and diff["test"] is None
    from mbdml.report import report_text

    text = report_text(out)
    assert "cross-validation accuracy" in text and "over 3 folds" in text
    # a cross-validated folder refuses a plain comparison, naming the setting
    with pytest.raises(ConfigError, match="cv_folds"):
        compare(base(tmp_path, max_epochs=1), ["digits"], ["nngk"], runs=1, results_dir=out, progress=False)
