"""A run's folder: what a training run writes, and its summary.

    config.json        the resolved configuration (rerun it with --config)
    environment.json   package versions, device, command line
    metrics.csv        one row per epoch: loss, train/val/test accuracy, lr, time
    summary.json       final model, best-on-validation model, the authors' best-on-test
    last.pt, best.pt   full state (resume) and the best-on-validation model
    accuracy.png       accuracy and loss curves (t-SNE maps with --tsne_graph)
    train.log          the log
    tensorboard/       per-epoch scalars, when tensorboard is installed

Only the main process of a run writes (see :mod:`mbdml.distributed`), and one run at a
time: :class:`RunFolderLock` holds an OS lock (``flock``) on a file in the folder for as
long as the run trains, and refuses a second writer with the first one's PID. New run
folders are made with ``os.mkdir``, which fails when the name is taken, so two processes
starting at once never get the same one (:func:`claim_new_run_dir`); a folder that a
start which failed before training left behind is used again.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_checkpoint, save_json, save_text, write_failure_reason
from .config import RunConfig
from .errors import CheckpointError, MbdmlError

log = logging.getLogger("mbdml")

LOCK_FILE = ".mbdml.lock"
# What a folder holds after a start that failed before the run began: it may be used again.
_NO_RUN_FILES = frozenset({LOCK_FILE, "train.log"})

METRIC_KEYS = ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi")


# ------------------------------------------------------------- one writer per run folder
class RunFolderLock:
    """An exclusive OS lock on a run folder (``flock`` on its ``.mbdml.lock``, which holds
    the PID of the process that has it), held while a run writes there.

    The OS drops the lock when the process ends, however it ends, so a killed run
    never leaves its folder locked. Where ``fcntl`` is missing (Windows) or the file
    system has no locks, nothing is locked.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot write to the run folder {self.folder} ({write_failure_reason(exc, self.folder)}); check its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            log.warning("cannot lock %s (%s); nothing stops a second process from writing there", self.folder, exc.strerror)
            return True
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """The PID written by the process that holds the lock, or '?'."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "?"
        return text if text.isdigit() else "?"

    def acquire(self) -> "RunFolderLock":
        """Take the lock, or raise :class:`CheckpointError` naming the process that has it."""
        if not self.try_acquire():
            pid = self.holder()
            raise CheckpointError(
                f"{self.folder} is in use by another mbdml process (PID {pid}), which is writing that run; wait for it "
                f"to finish, or stop it (kill {pid}), then try again"
            )
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_leftover_temp_files(folder: str | Path) -> int:
    """Remove the temporary files (``.<name>.*.tmp``) that writes interrupted by a kill left
    in a run folder and its sub-folders; call it with the folder's lock held. Returns how many."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if tmp.is_file():
                tmp.unlink()
                removed += 1
        except OSError:
            pass
    if removed:
        log.info("removed %d unfinished temporary file(s) that an interrupted write left in %s", removed, folder)
    return removed


def _cannot_create(folder: Path, exc: OSError, fix: str) -> CheckpointError:
    return CheckpointError(f"cannot create the run folder {folder} ({write_failure_reason(exc, folder)}); {fix}")


def claim_run_dir(folder: str | Path, fix: str = "choose another --save_dir") -> RunFolderLock:
    """Create ``folder`` if needed and lock it for this process (see :class:`RunFolderLock`);
    leftover temporary files of an earlier, killed writer are removed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(folder, exc, fix) from None
    lock = RunFolderLock(folder).acquire()
    remove_leftover_temp_files(folder)
    return lock


def holds_no_run(folder: str | Path) -> bool:
    """Whether ``folder`` is empty, or holds only what a start that failed before training left
    (its ``train.log`` and lock file): a new run may use it."""
    try:
        return all(e.name in _NO_RUN_FILES or e.name.endswith(".tmp") for e in os.scandir(folder))
    except OSError:
        return False


def next_run_dir(save_dir: str | Path, name: str) -> Path:
    """``save_dir/name``, or ``name-2``, ``name-3``... when that folder already holds a run
    (what :func:`claim_new_run_dir` would take, unless another process is quicker)."""
    base = Path(save_dir) / name
    path, i = base, 1
    while path.exists() and not (path.is_dir() and holds_no_run(path) and not _in_use(path)):
        i += 1
        path = base.with_name(f"{name}-{i}")
    return path


def _in_use(folder: Path) -> bool:
    """Whether a process holds the folder's lock (a run that is starting)."""
    if not (folder / LOCK_FILE).is_file():
        return False
    lock = RunFolderLock(folder)
    try:
        if lock.try_acquire():
            lock.release()
            return False
    except CheckpointError:
        return False
    return True


def claim_new_run_dir(save_dir: str | Path, name: str, fix: str = "choose another --save_dir") -> tuple[Path, RunFolderLock]:
    """Create and lock a new run folder ``save_dir/name`` (``name-2``, ``name-3``... when taken).

    ``os.mkdir`` either creates the folder or fails because it exists, so two processes
    starting at once never share one. A folder that holds no run (a start that failed
    before training) and that no process holds is used again.
    """
    save = Path(save_dir)
    try:
        save.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(save / name, exc, fix) from None
    i = 1
    while True:
        path = save / (name if i == 1 else f"{name}-{i}")
        i += 1
        try:
            os.mkdir(path)
            created = True
        except FileExistsError:
            created = False
        except OSError as exc:
            raise _cannot_create(path, exc, fix) from None
        if not path.is_dir() or not (created or holds_no_run(path)):
            continue
        lock = RunFolderLock(path)
        if not lock.try_acquire():
            continue
        if created or holds_no_run(path):
            remove_leftover_temp_files(path)
            return path, lock
        lock.release()


# ------------------------------------------------------------------ the files
def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows, with the union of their keys as columns (written atomically)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    save_text(buf.getvalue(), path)


def percent(x: Any) -> str:
    """A share as a percentage for the log, or '-' when there is none."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


class RunFolder:
    """The files of one run in ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._log_handler: logging.Handler | None = None
        self._tensorboard: Any = None  # None: not opened yet; False: tensorboard is not installed

    # ---------------------------------------------------------------- the log
    def open(self) -> None:
        """Make the folder and send the log to its train.log as well."""
        self.path.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        self._log_handler = handler

    def log_failure(self, exc: BaseException) -> None:
        """Put why the run stopped into train.log only (the command line prints it to the terminal)."""
        if self._log_handler is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            msg, exc_info = f"interrupted; continue with 'mbdml train --resume {self.path}'", None
        elif isinstance(exc, MbdmlError):
            msg, exc_info = str(exc), None
        else:
            msg, exc_info = f"{type(exc).__name__}: {exc}", (type(exc), exc, exc.__traceback__)
        self._log_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run stopped: %s", (msg,), exc_info))

    def close(self) -> None:
        """Stop writing the log and the TensorBoard scalars."""
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._tensorboard:
            self._tensorboard.close()
            self._tensorboard = None

    # -------------------------------------------------------------- the files
    def save_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.path / "config.json")

    def save_environment(self, info: dict[str, Any]) -> None:
        save_json(info, self.path / "environment.json")

    def save_state(self, state: dict[str, Any]) -> None:
        """The full state after an epoch (last.pt), to resume from."""
        save_checkpoint(state, self.path / "last.pt")

    def save_best_model(self, state: dict[str, Any]) -> None:
        """The model chosen on validation data (best.pt)."""
        save_checkpoint(state, self.path / "best.pt")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        write_csv(history, self.path / "metrics.csv")

    def save_summary(self, summary: dict[str, Any]) -> None:
        save_json(summary, self.path / "summary.json")

    def tensorboard(self, row: dict[str, Any]) -> None:
        """Per-epoch scalars to tensorboard/ when tensorboard is installed (the authors
        logged there); without it nothing is lost, metrics.csv has them all."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        if self._tensorboard is False:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(key, value, row["epoch"])
        self._tensorboard.flush()

    # ------------------------------------------------------------- the plots
    def plot_curves(self, history: list[dict[str, Any]], title: str) -> None:
        from .plots import plot_accuracy_curves

        plot_accuracy_curves(history, self.path / "accuracy.png", title=title)

    def plot_tsne(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        frames: list[tuple[str, torch.Tensor, torch.Tensor]],
        classes: list[str],
        seed: int,
    ) -> None:
        """t-SNE maps of the final train and test embeddings ((embeddings, labels) each),
        and an animation of the test embeddings over the evaluations (at most about 12 frames)."""
        from .plots import save_tsne_gif, save_tsne_pair

        save_tsne_pair(train[0], train[1], test[0], test[1], self.path, class_names=classes, seed=seed)
        if frames:
            step = max(1, math.ceil(len(frames) / 12))
            chosen = frames[::step] if frames[::step][-1] is frames[-1] else frames[::step] + [frames[-1]]
            save_tsne_gif(chosen, self.path / "tsne_test_epochs.gif", class_names=classes, seed=seed)


class TsneFrames:
    """A fixed random subset of the test embeddings at each evaluation, for the
    animation of ``--tsne_graph`` (at most 1000 images, drawn from the seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.frames: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._subset: torch.Tensor | None = None

    def keep(self, epoch: int, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if self._subset is None:
            self._subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))[:1000]
        sub = self._subset
        self.frames.append((f"test embeddings, epoch {epoch}", embeddings[sub.to(embeddings.device)].cpu(), labels[sub]))


def update_best(best: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The best evaluations so far, after the evaluation in ``row``: on validation data
    (the model kept), and on the test data (the authors' selection, for comparison only)."""
    best = dict(best)
    val_acc = row.get("val_acc")
    if val_acc is not None and val_acc > best.get("val_acc", -1.0):
        best.update(val_acc=val_acc, val_epoch=row["epoch"])
    test_acc = row.get("test_acc")
    if test_acc is not None and test_acc > best.get("test_acc", -1.0):
        best.update(test_acc=test_acc, test_epoch=row["epoch"])
    return best


def summarise(
    cfg: RunConfig, history: list[dict[str, Any]], best: dict[str, Any], sizes: dict[str, int], extra: dict[str, Any]
) -> dict[str, Any]:
    """The run's summary.json: the final model, the model chosen on validation data and
    the authors' best-on-test, with ``sizes`` (labelled_train, validation, test) and
    ``extra`` entries (what the training algorithm adds, times, processes, the folder)."""
    # evaluated epochs: with a test figure, or with a validation figure only (cross-validation has no test set)
    evaluated = [r for r in history if r.get("test_acc") is not None or r.get("val_acc") is not None]
    final = evaluated[-1] if evaluated else {}
    by_epoch = {r["epoch"]: r for r in evaluated}
    chosen = by_epoch.get(best.get("val_epoch"), {})

    def pick(row: dict[str, Any]) -> dict[str, Any]:
        return {k: row.get(f"test_{k}") for k in METRIC_KEYS}

    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "run": cfg.run,
        "epochs": len(history),
        **sizes,
        "final": {"epoch": final.get("epoch"), "val_acc": final.get("val_acc"), **pick(final)},
        "best_val": {"epoch": best.get("val_epoch"), "val_acc": best.get("val_acc"), **pick(chosen)},
        "authors_best_on_test": {
            "epoch": best.get("test_epoch"),
            "nngk_acc": best.get("test_acc"),
            "note": "model chosen on the test set, as the authors did; optimistic, for comparison with the paper only",
        },
        **extra,
    }
