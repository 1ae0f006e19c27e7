"""The comparison protocol: runs x methods, resumable, parallel, tables from per-run files."""

import csv
import json
import statistics

import pytest

from mbdml.config import make_config
from mbdml.errors import ConfigError
from mbdml.experiment import compare, plan
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
    with pytest.raises(ConfigError, match="other settings.*sigma"):
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
