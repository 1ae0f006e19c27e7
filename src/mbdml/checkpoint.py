"""A run folder on disk: atomic writes, safe loads, checked contents, one writer at a time.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash at any instant leaves either the previous or the
new checkpoint, never half of one; a full disk or an unwritable folder stops with a
message and leaves no partial file. Loading uses ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only, so a crafted pickle cannot run code;
what a checkpoint holds is then checked (:func:`check_model_state`,
:func:`check_resume_state`) before anything uses it.

A run folder is written by one process at a time: :class:`RunFolderLock` holds an OS
lock (``flock``) on a file in it for as long as the run trains, and refuses a second
writer with the first one's PID. New run folders are made with ``os.mkdir``, which
fails when the name is taken, so two processes never get the same one
(:func:`claim_new_run_dir`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError

log = logging.getLogger("mbdml")

LOCK_FILE = ".mbdml.lock"
# What a folder holds after a start that failed before the run began: it may be used again.
_NO_RUN_FILES = frozenset({LOCK_FILE, "train.log"})
_RESUME_FIX = "Free disk space or fix the folder's permissions, then resume with --resume"
# torch.save reports a failed write as a RuntimeError ("file write failed", "unexpected pos ..."
# when the file stops growing, or the system's "No space left on device").
_WRITE_FAILURE_WORDS = ("no space", "write failed", "failed writing", "unexpected pos", "file too large",
                        "disk quota", "input/output error", "read-only file system")


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says that writing a file failed (a full disk, a quota, a file size
    limit, an unwritable folder): an OSError, or the RuntimeError torch.save raises for those."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _WRITE_FAILURE_WORDS)


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def write_failure_reason(exc: BaseException, folder: Path | None = None) -> str:
    """What went wrong in a failed write, in words (a file in the way of ``folder``, the
    system's reason, or what torch.save's RuntimeError means)."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and folder is not None:
        blocking = _file_in_the_way(folder)
        if blocking is not None:
            return f"'{blocking}' is a file, not a folder"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "no space" in text.lower():
        return "No space left on device"
    if "unexpected pos" in text or "write failed" in text or "failed writing" in text:
        return "the file stopped growing: the disk is full, or a quota or file size limit was reached"
    return f"the write failed: {text[:160]}"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], Any], fix: str | None = None) -> None:
    """Write ``path`` through ``write(binary file)`` atomically.

    On a failure (a full disk, no permission, a file size limit) the temporary file
    is removed, the previous file at ``path`` is left as it was, and a
    :class:`CheckpointError` says what happened and ``fix`` (default: free disk space,
    then resume the run with --resume).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write to {path.parent} ({write_failure_reason(exc, path.parent)}); {fix or 'free disk space or choose another --save_dir'}"
        ) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not is_write_failure(exc):
            raise
        raise CheckpointError(
            f"could not write {path} ({write_failure_reason(exc)}); the previous file there is intact. {fix or _RESUME_FIX}"
        ) from None


_atomic_write = atomic_write  # the name earlier callers import


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no code execution); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the run folder, or start the run without --resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({text}). It is corrupt, truncated, or holds objects other "
            "than tensors and plain values (which could run code); only load checkpoints you trust, written by mbdml"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dictionary of state; it was not written by mbdml")
    return state


def save_json(data: Any, path: str | Path, fix: str | None = None) -> None:
    """Write JSON atomically (summaries, configurations); ``fix`` as in :func:`atomic_write`."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()), fix=fix)


# ------------------------------------------------------------------ what a checkpoint holds
def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensors(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v)


def _describe(v: Any) -> str:
    return f"a {type(v).__name__}" if not isinstance(v, (list, dict)) else f"a {type(v).__name__} of {len(v)}"


def _check_entries(state: dict[str, Any], path: Path, rules: list[tuple[str, bool, Callable[[Any], bool], str]], fix: str) -> None:
    for key, required, ok, want in rules:
        if key not in state:
            if required:
                raise CheckpointError(f"checkpoint {path} has no '{key}' entry ({want}); it was not written by mbdml, or was edited: {fix}")
            continue
        if not ok(state[key]):
            raise CheckpointError(
                f"checkpoint {path} has '{key}' as {_describe(state[key])}, not {want}; it was not written by mbdml, "
                f"or was edited: {fix}"
            )


def check_model_state(state: dict[str, Any], path: str | Path, fix: str = "use the run folder of a finished mbdml run") -> None:
    """Refuse a checkpoint that does not hold a trained model as mbdml writes it (``best.pt``,
    ``last.pt``): the network's and the method's weights, the kernel's class count, and,
    when present, an epoch number and class names. Raises :class:`CheckpointError` naming
    what is missing or of the wrong type."""
    path = Path(path)
    _check_entries(state, path, [
        ("model", True, _tensor_dict, "a dictionary of tensors: the network's weights"),
        ("method", True, _tensor_dict, "a dictionary of tensors: the kernel classifier's and the method's weights"),
        ("epoch", False, _whole, "a whole number of epochs"),
        ("classes", False, lambda v: v is None or (isinstance(v, list) and all(isinstance(c, str) for c in v)), "a list of class names"),
        ("image_shape", False, lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(_whole(n) and n > 0 for n in v)),
         "three whole numbers: channels, height, width"),
    ], fix)
    count = state["method"].get("kernel._num_classes_buf")
    if count is None or count.numel() != 1 or count.is_floating_point() or int(count) < 1:
        raise CheckpointError(
            f"checkpoint {path} has no kernel class count ('method' lacks a whole-number 'kernel._num_classes_buf'); "
            f"it was not written by mbdml, or was edited: {fix}"
        )


def check_resume_state(state: dict[str, Any], path: str | Path) -> None:
    """Refuse a ``last.pt`` that cannot continue a run: besides the model (see
    :func:`check_model_state`), the optimiser's state, the random generators, the
    history, the best epochs so far and the pseudo-labels, each of its type."""
    fix = "start the run again without --resume"
    check_model_state(state, path, fix)
    _check_entries(state, Path(path), [
        ("epoch", True, _whole, "a whole number of epochs"),
        ("optimizer", True, lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list),
         "an optimiser state: a dictionary with 'state' and 'param_groups'"),
        ("data_gen", True, lambda v: isinstance(v, torch.Tensor), "a random generator state: a tensor"),
        ("mix_gen", True, lambda v: isinstance(v, torch.Tensor), "a random generator state: a tensor"),
        ("torch_rng", True, lambda v: isinstance(v, torch.Tensor), "a random generator state: a tensor"),
        ("history", True, lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of per-epoch rows"),
        ("best", True, lambda v: isinstance(v, dict), "a dictionary of the best epochs"),
        ("world_size", False, lambda v: _whole(v) and v >= 1, "a whole number of processes"),
        ("mix_gen_ranks", False, _tensors, "a list of random generator states"),
        ("torch_rng_ranks", False, _tensors, "a list of random generator states"),
        ("centres_fresh", False, lambda v: isinstance(v, bool), "true or false"),
        ("pseudo", False, lambda v: v is None or (_tensors(v) and len(v) == 3), "none or three tensors: the pseudo-labels"),
        ("seconds", False, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number of seconds"),
    ], fix)


# ------------------------------------------------------------------ one writer per run folder
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
