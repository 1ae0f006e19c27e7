"""Paired comparisons of two methods over runs on the same splits.

Two methods trained on the same seeded splits (run r of ``mbdml compare`` uses seed +
r for both) differ by a paired difference d_r = a_r - b_r per run. Most of the spread
between runs (the split, the seed) is shared, so the paired differences are far less
noisy than the two means' standard deviations suggest, and the honest question is
whether their mean is away from 0:

- the mean difference with a 95% confidence interval from Student's t with n - 1
  degrees of freedom (mean ± t * sd / sqrt(n));
- a two-sided sign-flip permutation test: under "no difference" each d_r is as likely
  to be -d_r, so the p-value is the share of the 2^n sign patterns whose mean is at
  least as far from 0 as the observed one (exact up to 2^16 patterns, a seeded sample
  of them beyond).

A difference whose interval holds 0 is *level*: the runs cannot tell the two apart.
With 3 runs the smallest possible p-value is 2/8 = 0.25, so the test alone can never
call a difference there; the interval is what the tables mark.

This module is a bottom floor: plain Python and scipy's t quantile, no I/O.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Hashable

__all__ = ["PairedDifference", "paired_difference", "sign_flip_p_value"]

_EXACT_UP_TO = 16  # runs for which all 2^n sign patterns are enumerated
_SAMPLED_PATTERNS = 100_000


@dataclass(frozen=True)
class PairedDifference:
    """a - b over the runs both have, in the units given (fractions or points).

    ``ci_low``/``ci_high`` are the 95% interval of the mean difference (None with one
    run); ``p_value`` is the two-sided sign-flip permutation test; ``runs`` lists the
    keys that were paired.
    """

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float
    runs: tuple[Hashable, ...]

    @property
    def level(self) -> bool:
        """True when the interval holds 0 (or there is no interval): no difference shown."""
        return self.ci_low is None or self.ci_low <= 0.0 <= self.ci_high  # type: ignore[operator]

    @property
    def verdict(self) -> str:
        """'higher', 'lower' or 'level' for a against b."""
        if self.level:
            return "level"
        return "higher" if self.mean > 0 else "lower"

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """``+0.53 [-0.12, +1.18] p=0.25`` (scaled, e.g. fractions to points)."""
        mean = f"{self.mean * scale:+.{digits}f}"
        if self.ci_low is None:
            return f"{mean} (1 run, no interval)"
        return f"{mean} [{self.ci_low * scale:+.{digits}f}, {self.ci_high * scale:+.{digits}f}] p={self.p_value:.2g}"  # type: ignore[operator]


def sign_flip_p_value(differences: list[float], seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip permutation test of mean(differences) = 0.

    The share of sign patterns (the observed one included) whose |mean| reaches the
    observed |mean|; all 2^n patterns up to n = 16, else a seeded random sample.
    All-zero differences give 1.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("no paired runs to test")
    observed = abs(sum(differences)) / n
    tolerance = 1e-12 * max(1.0, max(abs(d) for d in differences))
    if n <= _EXACT_UP_TO:
        patterns = itertools.product((1.0, -1.0), repeat=n)
        total = 2**n
    else:
        rng = random.Random(seed)
        patterns = ([rng.choice((1.0, -1.0)) for _ in range(n)] for _ in range(_SAMPLED_PATTERNS))
        total = _SAMPLED_PATTERNS
    extreme = sum(1 for signs in patterns if abs(sum(s * d for s, d in zip(signs, differences))) / n >= observed - tolerance)
    return extreme / total


def paired_difference(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None]) -> PairedDifference | None:
    """The paired difference a - b over the keys (runs) where both have a value.

    ``a`` and ``b`` map a run key (the run index of a comparison, i.e. its split) to
    a figure; keys present in only one, or with a None value, are left out. Returns
    None when no run is shared.
    """
    keys = sorted((k for k in a if k in b and a[k] is not None and b[k] is not None), key=str)
    if not keys:
        return None
    diffs = [float(a[k]) - float(b[k]) for k in keys]  # type: ignore[arg-type]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(n, mean, None, None, None, 1.0, tuple(keys))
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, sign_flip_p_value(diffs), tuple(keys))
