"""Train a run: pick the algorithm its configuration asks for, check the configuration
whole, and train on the engine (:class:`mbdml.engine.Trainer`); or resume a run.

    supervised training          a method on the labelled images (mbdml.engine.Algorithm)
    labelling at the refreshes   mbdml_semi, mbdml1_semi (mbdml.semi_supervised.RefreshLabelling)
    labelling at each step       the same with --pseudo_online (mbdml.semi_supervised.OnlineLabelling)
    self-training                --teacher or --teacher_epochs (mbdml.self_training.SelfTraining)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .engine import Algorithm, RunResult, Trainer
from .errors import CheckpointError
from .self_training import SelfTraining
from .semi_supervised import OnlineLabelling, RefreshLabelling

# The training algorithms, the first that applies to a configuration is its algorithm.
ALGORITHMS: tuple[type[Algorithm], ...] = (SelfTraining, RefreshLabelling, OnlineLabelling, Algorithm)


def check_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` resolved and checked whole: each option's rules, the components' and every
    training algorithm's (each checks its own options, whichever the configuration asks for)."""
    cfg = cfg.resolved()
    checked = set()
    for algorithm in ALGORITHMS:
        if algorithm.check.__func__ not in checked:  # a check two algorithms inherit runs once
            checked.add(algorithm.check.__func__)
            algorithm.check(cfg)
    return cfg


def algorithm_for(cfg: RunConfig) -> Algorithm:
    """The training algorithm ``cfg`` asks for, with its options."""
    cfg = check_config(cfg)
    for algorithm in ALGORITHMS:
        if algorithm.applies_to(cfg):
            return algorithm(cfg)
    raise AssertionError("supervised training applies to every other configuration")  # pragma: no cover


def build_trainer(cfg: RunConfig, **kwargs: Any) -> Trainer:
    """A :class:`~mbdml.engine.Trainer` for ``cfg`` with the algorithm it asks for;
    ``kwargs`` as the Trainer takes them (data, run_dir, resume, on_epoch_end)."""
    return Trainer(cfg, algorithm=algorithm_for(cfg), **kwargs)


def train(cfg: RunConfig, **kwargs: Any) -> RunResult:
    """Train one run with ``cfg``; see :func:`build_trainer` for the options."""
    return build_trainer(cfg, **kwargs).run()


def resume(run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Continue an interrupted run from its last checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no run folder at {run_dir}; pass the folder printed when the run started")
    cfg = RunConfig.load(run_dir / "config.json")
    teacher_stage = cfg.teacher_epochs is not None and (run_dir / "teacher" / "last.pt").is_file()
    if not (run_dir / "last.pt").is_file() and not teacher_stage:
        raise CheckpointError(f"{run_dir} has no last.pt: the run stopped before its first epoch ended; start it again without --resume")
    return build_trainer(cfg, run_dir=run_dir, resume=True, **kwargs).run()
