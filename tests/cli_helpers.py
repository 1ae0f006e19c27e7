"""What the tests of refused commands check: one 'mbdml: error' line, exit status 2, no traceback."""

from __future__ import annotations


def error_line(code: int, err: str, *needles: str) -> str:
    """The one 'mbdml: error' line of a refused command, holding every needle."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mbdml: error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
