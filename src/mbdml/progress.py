"""Progress bars on the console (tqdm when it is installed), only on a terminal: a log
redirected to a file or a pipe gets the one line per epoch the trainer writes, not bar
frames."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(iterable: Any = None, *, desc: str, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), or None / the
    iterable itself when progress display is off, standard error (where the bar is
    drawn) is not a terminal, or tqdm is missing."""
    enabled = enabled and _is_terminal(sys.stderr)
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            enabled = False
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, **kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
