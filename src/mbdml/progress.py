"""Progress bars on the console (tqdm when it is installed)."""

from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any = None, *, desc: str, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), or None / the
    iterable itself when progress display is off or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            enabled = False
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, **kwargs)
