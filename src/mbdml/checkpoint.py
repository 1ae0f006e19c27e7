"""Files that survive a crash: atomic writes, safe loads, checked contents.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash at any instant leaves either the previous or the
new checkpoint, never half of one; a full disk or an unwritable folder stops with a
message and leaves no partial file. Loading uses ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only, so a crafted pickle cannot run code;
what a checkpoint holds is then checked (:func:`check_model_state`,
:func:`check_resume_state`) before anything uses it.

Which process writes a run folder, and which folder a new run gets, is
:mod:`mbdml.run_folder`'s business.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import CheckpointError

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


def save_text(text: str, path: str | Path) -> None:
    """Write a text file atomically (metrics tables)."""
    atomic_write(Path(path), lambda f: f.write(text.encode()))


# ------------------------------------------------------------------ what a checkpoint holds
def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensors(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v)


def _describe(v: Any) -> str:
    return f"a {type(v).__name__}" if not isinstance(v, (list, dict)) else f"a {type(v).__name__} of {len(v)}"


# A rule for one entry of a checkpoint: (key, required, is the value right, what it should be).
EntryRule = tuple[str, bool, Callable[[Any], bool], str]


def check_entries(state: dict[str, Any], path: Path, rules: list[EntryRule], fix: str) -> None:
    """Refuse ``state`` (read from ``path``) unless each rule ``(key, required, ok, what it
    should be)`` holds; the message names the entry, what it is and ``fix``."""
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
    check_entries(state, path, [
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


def check_resume_state(state: dict[str, Any], path: str | Path, more: Sequence[EntryRule] = ()) -> None:
    """Refuse a ``last.pt`` that cannot continue a run: besides the model (see
    :func:`check_model_state`), the optimiser's state, the random generators, the
    history and the best epochs so far, each of its type; and the ``more`` rules (a
    training algorithm's own entries)."""
    fix = "start the run again without --resume"
    check_model_state(state, path, fix)
    check_entries(state, Path(path), [
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
        ("seconds", False, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number of seconds"),
        *more,
    ], fix)
