"""The paper's protocol: methods x runs x data sets, resumable, in parallel processes.

Every run r of every method on a data set uses the same seeded labelled split
(seed = base seed + r; with ``--split folds`` fold r), the same backbone, schedule and
evaluation. Each run writes its own folder ``RESULTS_DIR/<dataset>/<method>/run<r>/``;
a finished run (one with a ``summary.json``) is skipped when the comparison is started
again, and an interrupted one continues from its last checkpoint. When all runs are
done the comparison tables and the per-data-set accuracy curves are written beside them.
"""

from __future__ import annotations

import dataclasses
import json
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

# Settings that may differ between the runs of one comparison (they name the run).
_PER_RUN_KEYS = ("method", "dataset", "seed", "run", "name", "save_dir", "progress", "device")


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

    @property
    def label(self) -> str:
        return f"{dataset_key(self.dataset)}/{self.method}/run{self.run}"


def plan(base: RunConfig, datasets: list[str], methods: list[str], runs: int, results_dir: str | Path) -> list[Job]:
    """Every (data set, method, run) with its configuration, runs interleaved across methods.

    Options that concern only some methods go to those: ``--pseudo_augment`` to the
    semi-supervised ones (the others have no pseudo-labelled images), ``split_batch``
    and ``scale_mixup`` by the preset's per-method value unless given. Every run's
    configuration is checked whole before any run starts."""
    from .methods import METHODS
    from .train import check_config

    if runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {runs}")
    if not datasets or not methods:
        raise ConfigError("a comparison needs at least one data set (--datasets) and one method (--methods)")
    results_dir = Path(results_dir)
    jobs = []
    for dataset in datasets:
        for run in range(runs):
            for method in methods:
                cfg = dataclasses.replace(base, method=method, dataset=dataset, run=run, seed=base.seed + run, name=f"run{run}", progress=False)
                if base.teacher is not None:
                    cfg = dataclasses.replace(cfg, teacher=teacher_for_run(base.teacher, dataset, run, base.seed + run))
                if method in METHODS and not METHODS[method].uses_unlabelled:
                    cfg = dataclasses.replace(cfg, pseudo_augment="standard")
                elif method in METHODS:  # they label the unlabelled images themselves
                    cfg = dataclasses.replace(cfg, teacher_epochs=None, student_init="pretrained")
                run_dir = results_dir / dataset_key(dataset) / method / f"run{run}"
                jobs.append(Job(dataset, method, run, check_config(cfg), run_dir))
    return jobs


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


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _PER_RUN_KEYS}


def _check_existing(job: Job) -> str:
    """'done', 'resume' or 'new'; refuses a folder made with other settings."""
    summary, config = job.run_dir / "summary.json", job.run_dir / "config.json"
    if not config.is_file():
        return "new"
    saved = RunConfig.load(config)
    ours = job.config.to_dict()
    theirs = saved.to_dict()
    for key in ("flip", "crop_padding"):  # filled from the images when a run starts
        if ours.get(key) is None:
            theirs[key] = None
    diff = sorted(k for k, v in _comparable(ours).items() if _comparable(theirs).get(k) != v)
    if diff:
        raise ConfigError(
            f"{job.run_dir} holds a run made with other settings ({', '.join(diff)}); "
            "start the comparison with the same arguments, or use another --results_dir"
        )
    if summary.is_file():
        return "done"
    return "resume" if (job.run_dir / "last.pt").is_file() else "new"


def run_job(job: Job, threads: int | None = None) -> dict[str, Any]:
    """Train (or finish) one run; returns its summary. Runs in a worker process too."""
    import torch

    from .train import build_trainer

    if threads:
        torch.set_num_threads(threads)
    state = _check_existing(job)
    if state == "done":
        return json.loads((job.run_dir / "summary.json").read_text())
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
    """Run the whole comparison (skipping finished runs), then write tables and plots
    (each method paired by run against ``reference``)."""
    results_dir = Path(results_dir)
    all_jobs = plan(base, datasets, methods, runs, results_dir)
    states = {job.label: _check_existing(job) for job in all_jobs}
    todo = [job for job in all_jobs if states[job.label] != "done"]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "compare.json").write_text(
        json.dumps({"datasets": datasets, "methods": methods, "runs": runs, "base": base.to_dict()}, indent=2, sort_keys=True) + "\n"
    )
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
    return write_outputs(results_dir, reference=reference)


def _done(bar: Any, job: Job, summary: dict[str, Any], on_run_end: Callable[[Job, dict[str, Any]], None] | None) -> None:
    if bar is not None:
        acc = summary.get("final", {}).get("nngk_acc")
        bar.set_postfix_str(f"{job.label}: {100 * acc:.2f}%" if acc is not None else job.label)
        bar.update(1)
    if on_run_end is not None:
        on_run_end(job, summary)


def write_outputs(results_dir: str | Path, reference: str = "nngk") -> dict[str, Path]:
    """The comparison tables (with each method paired by run against ``reference``) and,
    per data set, accuracy curves with a band over runs."""
    import csv

    from .plots import plot_method_curves
    from .report import collect_runs, write_report

    results_dir = Path(results_dir)
    paths = write_report(results_dir, reference=reference)
    curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for rec in collect_runs(results_dir):
        metrics = results_dir / rec.dataset / rec.method / f"run{rec.run}" / "metrics.csv"
        if metrics.is_file():
            with open(metrics, newline="") as f:
                curves.setdefault(rec.dataset, {}).setdefault(rec.method, []).append(list(csv.DictReader(f)))
    for dataset, by_method in curves.items():
        for metric in ("test_acc", "train_acc"):
            path = results_dir / f"curves_{dataset}_{metric}.png"
            plot_method_curves(by_method, path, metric=metric, title=f"{dataset}: {metric.replace('_', ' ')}")
            paths[f"curves_{dataset}_{metric}"] = path
    return paths
