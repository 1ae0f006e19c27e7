"""The on-disk cache of decoded image folders: one ``<sha1>.pt`` file per folder and options.

The key covers the folder, the loader's options and every file's relative path,
size and modification time, so an added, removed or changed file decodes the
folder again. The file holds plain tensors, strings and lists (loadable with
``weights_only``); it is written atomically, and a cache that cannot be written or
read only costs a decode (a warning), never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

logger = logging.getLogger("mbdml")

T = TypeVar("T")


def cache_key(head: dict[str, Any], files: Sequence[tuple[str, int, int]]) -> str:
    """sha1 of ``head`` (the format, folder and options) and each (relative path, size, mtime_ns)."""
    h = hashlib.sha1()
    h.update(json.dumps(head, sort_keys=True).encode())
    for rel, size, mtime in sorted(files):
        h.update(f"\n{rel}\t{size}\t{mtime}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def read_cache(path: Path, fmt: str, build: Callable[[dict[str, Any]], T]) -> T | None:
    """``build`` applied to the cached payload of format ``fmt``; None (after a warning when the
    file exists but is unusable) when there is none."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != fmt:
            raise ValueError("not an mbdml image cache")
        return build(obj)
    except Exception as exc:  # noqa: BLE001 - a broken cache only costs a re-decode
        logger.warning("image cache '%s' is unreadable (%s); decoding the images again", path, exc)
        return None


def write_cache(path: Path, payload: dict[str, Any]) -> None:
    """Store the decoded set atomically; a full disk or an unwritable folder only costs the cache
    (a warning, and no partial file is left)."""
    from mbdml.checkpoint import is_write_failure, write_failure_reason

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not is_write_failure(exc):
            raise
        reason = write_failure_reason(exc, path.parent)
        logger.warning(
            "cannot write image cache '%s' (%s); continuing without it: free disk space in '%s' or pass another "
            "--cache_dir to keep the decoded images for the next run",
            path, reason, path.parent,
        )


def warn_skipped(root: Path, skipped: list[str]) -> None:
    """Log the unreadable files that were left out (``--on-bad-image skip``)."""
    if skipped:
        logger.warning(
            "skipped %d unreadable image file(s) under '%s' (for example '%s')",
            len(skipped),
            root,
            skipped[0],
        )
