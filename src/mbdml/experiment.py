"""The paper's protocol: methods x runs x data sets, resumable, in parallel processes.

Every run r of every method on a data set uses the same seeded labelled split
(seed = base seed + r; with ``--split folds`` fold r), the same backbone, schedule and
evaluation. Each run writes its own folder ``RESULTS_DIR/<dataset>/<method>/run<r>/``;
a finished run (one with a readable ``summary.json``) is skipped when the comparison is
started again, and an interrupted one continues from its last checkpoint. When all runs
are done the comparison tables and the per-data-set accuracy curves are written beside
them, of exactly the data sets, methods and runs asked for.

A results folder holds one comparison's settings: a comparison started in a folder whose
runs were made with another value of any setting that changes a result (every
:class:`~mbdml.config.RunConfig` field but :data:`RESULT_NEUTRAL_FIELDS`) is refused
with the settings that differ, so two set-ups never end up side by side in one table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .errors import ConfigError, MbdmlError

log = logging.getLogger("mbdml")

# The RunConfig fields that never change a run's results, only where it is written, how it
# is shown, or how the same arithmetic is carried out (the last digits of rounding may
# differ, as between two machines): a comparison may be finished with other values of
# these. Every other field changes a result, and a results folder whose runs were made
# with another value of one is refused.
RESULT_NEUTRAL_FIELDS: tuple[str, ...] = (
    "name",  # the run folder's name (a comparison names its runs run<r>)
    "save_dir",  # where a single run's folder goes (a comparison uses --results_dir)
    "progress",  # progress bars
    "cache_dir",  # where decoded images are kept between runs
    "num_classes",  # a check against the data: equal to it, or the run is refused
    "tsne_graph",  # extra plots of the embeddings
    "device",  # where the arithmetic runs ('auto' differs between machines anyway)
    "deterministic",  # deterministic kernels, for exact reruns on one machine
    "compile",  # torch.compile of the same forward pass
    "channels_last",  # memory layout of the same tensors
    "frozen_cache_gb",  # memory for kept frozen-stage outputs, computed once instead of again
    "keep_freed_memory",  # malloc keeping freed blocks: the same numbers, fewer page faults
    "dist_timeout",  # how long processes wait for each other
)
# Filled when a run starts, from the images ('None': by the images) or the machine ('auto').
_FILLED_AT_START = {"flip": None, "crop_padding": None, "amp": "auto"}


def dataset_key(dataset: str) -> str:
    """A folder-safe name for a data set spec (a built-in name or a path)."""
    name = Path(dataset.rstrip("/")).name or dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class Job:
    """One run of the comparison."""

    dataset: str
    method: str
    run: int
    config: RunConfig
    run_dir: Path
    fold: int | None = None  # the cross-validation fold (--cv), or None

    @property
    def label(self) -> str:
        return f"{dataset_key(self.dataset)}/{self.method}/{run_folder_name(self.run, self.fold)}"


def run_folder_name(run: int, fold: int | None = None) -> str:
    """``run<r>``, or ``run<r>-fold<f>`` for fold f of a cross-validated comparison."""
    return f"run{run}" if fold is None else f"run{run}-fold{fold}"


def plan(base: RunConfig, datasets: list[str], methods: list[str], runs: int, results_dir: str | Path) -> list[Job]:
    """Every (data set, method, run) with its configuration, runs interleaved across methods.

    Options that concern only some methods go to those: ``--pseudo_augment`` to the
    semi-supervised ones (the others have no pseudo-labelled images), ``split_batch``
    and ``scale_mixup`` by the preset's per-method value unless given. Every run's
    configuration is checked whole before any run starts."""
    if runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {runs}")
    if not datasets or not methods:
        raise ConfigError("a comparison needs at least one data set (--datasets) and one method (--methods)")
    results_dir = Path(results_dir)
    jobs = []
    for dataset in datasets:
        for run in range(runs):
            for method in methods:
                for fold in range(base.cv_folds) if base.cv_folds is not None else [None]:
                    run_dir = results_dir / dataset_key(dataset) / method / run_folder_name(run, fold)
                    jobs.append(Job(dataset, method, run, job_config(base, dataset, method, run, fold), run_dir, fold))
    return jobs


def job_config(base: RunConfig, dataset: str, method: str, run: int, fold: int | None = None) -> RunConfig:
    """The resolved configuration of run ``run`` (fold ``fold`` of a cross-validated one) of
    ``method`` on ``dataset`` in a comparison with the settings ``base`` (see :func:`plan`),
    checked whole (:func:`mbdml.train.check_config`). The folds of a run share its labelled split."""
    from .methods import METHODS
    from .train import check_config

    cfg = dataclasses.replace(base, method=method, dataset=dataset, run=run, seed=base.seed + run,
                              name=run_folder_name(run, fold), progress=False, cv_fold=fold or 0)
    if base.teacher is not None:
        cfg = dataclasses.replace(cfg, teacher=teacher_for_run(base.teacher, dataset, run, base.seed + run))
    if method in METHODS and not METHODS[method].uses_unlabelled:
        cfg = dataclasses.replace(cfg, pseudo_augment="standard")
    elif method in METHODS:  # they label the unlabelled images themselves
        cfg = dataclasses.replace(cfg, teacher_epochs=None, student_init="pretrained")
    return check_config(cfg)


TEACHER_PLACEHOLDERS = ("dataset", "run", "seed")


def teacher_for_run(template: str, dataset: str, run: int, seed: int) -> str:
    """The teacher folder of one run of a comparison: ``{run}``, ``{seed}`` and
    ``{dataset}`` in ``--teacher`` are filled in, since each run draws its own labelled
    split and needs a teacher trained on that split (``results/cifar10/mbdml1/run{run}``
    names the runs of an earlier comparison)."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"--teacher {template!r} is not a valid folder template ({exc}); write placeholders as {{run}}, {{seed}} or {{dataset}}") from None
    unknown = sorted({f for f in fields if f not in TEACHER_PLACEHOLDERS})
    if unknown:
        raise ConfigError(
            f"--teacher {template!r} has the placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
            f"only {', '.join('{' + p + '}' for p in TEACHER_PLACEHOLDERS)} are filled in"
        )
    return template.format(dataset=dataset_key(dataset), run=run, seed=seed)


def settings_that_differ(asked: RunConfig, saved: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The fields that change a result and differ: name -> (saved value, asked value).

    Both are compared resolved and with absolute paths; a value filled when the run
    started (flip, crop padding, 'auto' precision) counts as the same when it was left
    to be filled."""
    ours, theirs = asked.with_absolute_paths().to_dict(), saved.with_absolute_paths().to_dict()
    for key, unset in _FILLED_AT_START.items():
        if ours.get(key) == unset:
            theirs[key] = unset
    return {k: (theirs.get(k), v) for k, v in ours.items() if k not in RESULT_NEUTRAL_FIELDS and theirs.get(k) != v}


def _differences_text(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {there!r} there, {asked!r} asked" for k, (there, asked) in sorted(diffs.items()))


def check_results_dir(base: RunConfig, results_dir: str | Path) -> None:
    """Refuse ``results_dir`` when a run in it was made with other settings than the
    comparison ``base`` would give it (any data set, method or run, asked or not:
    ``report`` tables every run in the folder). The message lists the settings that
    differ and the fix."""
    root = Path(results_dir)
    diffs: dict[str, tuple[Any, Any]] = {}
    where: list[str] = []
    for config in sorted(root.glob("*/*/run*/config.json")):
        saved = RunConfig.load(config)
        try:
            ours = job_config(base, saved.dataset, saved.method, saved.run, saved.cv_fold if saved.cv_folds is not None else None)
        except MbdmlError:  # a method this version does not have, say
            found = {"method": (saved.method, "a method this version knows")}
        else:
            found = settings_that_differ(ours, saved)
        if found:
            diffs.update({k: v for k, v in found.items() if k not in diffs})
            where.append(str(config.parent.relative_to(root)))
    if diffs:
        raise ConfigError(
            f"{root} holds runs made with other settings ({_differences_text(diffs)}; in {', '.join(where[:3])}"
            f"{' ...' if len(where) > 3 else ''}); their results cannot share a table with these. Use another "
            "--results_dir, or the same settings as those runs"
        )


def _check_existing(job: Job) -> str:
    """'done', 'resume' or 'new'; refuses a folder made with other settings. A run whose
    summary.json cannot be read (a half-written file) is not done: it is finished again."""
    from .report import read_summary

    config = job.run_dir / "config.json"
    if not config.is_file():
        return "new"
    diffs = settings_that_differ(job.config, RunConfig.load(config))
    if diffs:
        raise ConfigError(
            f"{job.run_dir} holds a run made with other settings ({_differences_text(diffs)}); use another "
            "--results_dir, or the same settings as that run"
        )
    if read_summary(job.run_dir / "summary.json") is not None:
        return "done"
    return "resume" if (job.run_dir / "last.pt").is_file() else "new"


def run_job(job: Job, threads: int | None = None) -> dict[str, Any]:
    """Train (or finish) one run; returns its summary. Runs in a worker process too."""
    import torch

    from .train import build_trainer

    if threads:
        torch.set_num_threads(threads)
    from .report import read_summary

    state = _check_existing(job)
    if state == "done":
        summary = read_summary(job.run_dir / "summary.json")
        assert summary is not None
        return summary
    trainer = build_trainer(job.config, run_dir=job.run_dir, resume=state == "resume")
    return trainer.run().summary


def _worker(job: Job, threads: int) -> tuple[str, dict[str, Any] | None, str | None]:
    try:
        return job.label, run_job(job, threads), None
    except MbdmlError as exc:
        return job.label, None, str(exc)


def compare(
    base: RunConfig,
    datasets: list[str],
    methods: list[str],
    runs: int = 10,
    results_dir: str | Path = "results/compare",
    jobs: int = 1,
    progress: bool = True,
    on_run_end: Callable[[Job, dict[str, Any]], None] | None = None,
    reference: str = "nngk",
) -> dict[str, Path]:
    """Run the whole comparison (skipping finished runs), then write the tables and plots of
    exactly these data sets, methods and runs (each method paired by run against
    ``reference``). A results folder whose runs were made with other settings is refused
    (:func:`check_results_dir`)."""
    from .checkpoint import save_json

    results_dir = Path(results_dir)
    all_jobs = plan(base, datasets, methods, runs, results_dir)
    check_results_dir(base, results_dir)
    states = {job.label: _check_existing(job) for job in all_jobs}
    todo = [job for job in all_jobs if states[job.label] != "done"]
    save_json({"datasets": datasets, "methods": methods, "runs": runs, "base": base.to_dict()}, results_dir / "compare.json",
              fix="pass another --results_dir")
    log.info("%d runs in the comparison, %d already finished, %d to do (%d in parallel)", len(all_jobs), len(all_jobs) - len(todo), len(todo), jobs)
    from .progress import progress_bar

    bar = progress_bar(desc="runs", enabled=progress, total=len(all_jobs), initial=len(all_jobs) - len(todo), unit="run")
    failures: list[str] = []
    t0 = time.perf_counter()
    if jobs <= 1:
        for job in todo:
            summary = run_job(job)
            _done(bar, job, summary, on_run_end)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_worker, job, threads): job for job in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    label, summary, error = fut.result()
                    if error is not None:
                        failures.append(f"{label}: {error}")
                        log.error("run %s failed: %s", label, error)
                    else:
                        _done(bar, futures[fut], summary, on_run_end)
    if bar is not None:
        bar.close()
    log.info("comparison finished in %.0f s", time.perf_counter() - t0)
    if failures:
        raise ConfigError(f"{len(failures)} run(s) failed; fix the cause and run the same command again to finish them: " + "; ".join(failures))
    return write_outputs(results_dir, comparison_runs(results_dir, datasets, methods, runs), reference=reference)


def comparison_runs(results_dir: str | Path, datasets: list[str], methods: list[str], runs: int) -> list[Any]:
    """The finished runs of ``results_dir`` that a comparison of these data sets, methods and
    number of runs asks for (:class:`~mbdml.report.RunRecord`), and no other."""
    from .report import collect_runs

    keys, wanted = {dataset_key(d) for d in datasets}, set(methods)
    return collect_runs(results_dir, keep=lambda d, m, r: d in keys and m in wanted and r < runs)


def _done(bar: Any, job: Job, summary: dict[str, Any], on_run_end: Callable[[Job, dict[str, Any]], None] | None) -> None:
    if bar is not None:
        acc = summary.get("final", {}).get("nngk_acc")
        bar.set_postfix_str(f"{job.label}: {100 * acc:.2f}%" if acc is not None else job.label)
        bar.update(1)
    if on_run_end is not None:
        on_run_end(job, summary)


def write_outputs(results_dir: str | Path, records: list[Any] | None = None, reference: str = "nngk") -> dict[str, Path]:
    """The comparison tables (with each method paired by run against ``reference``) and,
    per data set, accuracy curves with a band over runs, of ``records`` (default: every
    finished run in the folder, read once)."""
    import csv

    from .plots import plot_method_curves
    from .report import collect_runs, write_report

    results_dir = Path(results_dir)
    if records is None:
        records = collect_runs(results_dir)
    paths = write_report(results_dir, reference=reference, records=records)
    curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for rec in records:
        metrics = results_dir / rec.dataset / rec.method / run_folder_name(rec.run, rec.fold) / "metrics.csv"
        if metrics.is_file():
            with open(metrics, newline="") as f:
                curves.setdefault(rec.dataset, {}).setdefault(rec.method, []).append(list(csv.DictReader(f)))
    for dataset, by_method in curves.items():
        for metric in ("test_acc", "train_acc"):
            path = results_dir / f"curves_{dataset}_{metric}.png"
            plot_method_curves(by_method, path, metric=metric, title=f"{dataset}: {metric.replace('_', ' ')}")
            paths[f"curves_{dataset}_{metric}"] = path
    return paths
