"""Files on disk, as the loaders see them: what a folder entry is (a link that loops or
leads nowhere is named, not followed into a traceback), the message for a path that
is missing, and which extensions are images."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

from mbdml.errors import DataError

__all__ = ["IMAGE_EXTENSIONS"]

# What counts as an image file: the extensions PIL reads that cameras, screenshots and data sets use.
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split())


def describe_extensions(counts: Counter[str]) -> str:
    """The five most common extensions with their counts, for messages."""
    parts = [f"{n} '{ext or '(no extension)'}'" for ext, n in counts.most_common(5)]
    return ", ".join(parts)


def missing_path_error(path: Path, what: str, fix: str) -> DataError:
    """'does not exist', or the real reason when ``path`` is a link that leads nowhere."""
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        why = "loops back on itself" if is_link_loop(path) else f"points to '{target}', which does not exist"
        return DataError(f"{what} '{path}' is a symbolic link that {why}; fix or remove the link, or {fix}")
    return DataError(f"{what} '{path}' does not exist; {fix}")


def is_link_loop(path: Path) -> bool:
    """Whether following ``path`` loops (too many levels of links)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def entry_kind(entry: os.DirEntry[str]) -> str:
    """'dir', 'file', 'loop' (a link that loops), 'broken' (a link to nothing) or 'other'."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as exc:
        return "loop" if exc.errno == errno.ELOOP else "broken"
    if entry.is_symlink():
        return "loop" if is_link_loop(Path(entry.path)) else "broken"
    return "other"


def has_sub_folder(p: Path) -> bool:
    """Whether ``p`` is a readable folder with at least one visible sub-folder."""
    try:
        with os.scandir(p) as it:
            return any(not e.name.startswith(".") and entry_kind(e) == "dir" for e in it)
    except OSError:
        return False
