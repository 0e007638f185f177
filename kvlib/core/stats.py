"""One rule for "different": when the study may say that two measurements, two counts or two rankings differ.

Every sentence, headline and ⚠ of the notebooks and the report's index that compares numbers, and the answers of
`python -m kvlib experiments`, ask this module, so the pages cannot disagree on what the same data show. (The
bench's met/MISSED against its speed targets is a threshold on medians, not yet judged by this rule.)

- **Timed values (repeats).** A set of repeats is summarised by its median and its quartiles *by nearest rank,
  rounded outward* (the 25th percentile rounded down to a measured value, the 75th rounded up), so the interval is
  made of values that were measured, never of interpolated ones: with 3 or 4 values it is their range, with 5 the
  2nd to the 4th. Two medians are called apart only when each side has at least `MIN_REPEATS` (3) values and the two
  intervals do not overlap; with fewer the answer is None, "n too small". (With two repeats an interpolated
  interquartile range can lie between the two values and contain neither: [145.16, 1.83] gives 37.7-109.3.)
  A paired ratio (cached / naive per repeat) differs from 1 under the same rule: at least 3 pairs and 1 outside
  its interval.
- **Counts (k of n).** Two proportions differ only when their 95% Wilson score intervals do not overlap.
- **Rank correlations.** Spearman's rho is a finding only over at least 3 pairs, with at least 3 distinct values on
  each side (ties do not make an ordering) and, where the values carry intervals, with the highest and the lowest
  value apart under the rules above (when every value overlaps every other, there is no ordering to predict).
  A ranking of a few categories (policies) by it is a finding only where each side has at least `MIN_RANKED` (5)
  values, all distinct (`ranks_apart`): one tie among five already lets the order of the tied pair go either way.

Tri-state answers: True (apart), False (not apart: the difference may be noise), None (n too small to tell).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvlib.core import checks

MIN_REPEATS = 3  # values per side below which no difference is claimed
MIN_RANKED = 5  # distinct values, without ties, a side of a ranking of categories needs (ranks_apart)
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval


def _finite(values: Iterable[float]) -> list[float]:
    return sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))


def quartiles(values: Iterable[float]) -> tuple[float, float]:
    """(q25, q75) by nearest rank rounded outward: measured values, q25 <= median <= q75; (nan, nan) when empty.

    For n sorted values v[0..n-1]: q25 = v[floor((n-1)/4)], q75 = v[ceil(3(n-1)/4)]."""
    v = _finite(values)
    if not v:
        return math.nan, math.nan
    n = len(v)
    return v[math.floor((n - 1) / 4)], v[math.ceil(3 * (n - 1) / 4)]


def nearest_rank(values: Iterable[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) as a measured value: v[ceil(q (n-1))] of the n sorted values (rounded up, so
    never interpolated); nan when empty."""
    v = _finite(values)
    return v[math.ceil(q * (len(v) - 1))] if v else math.nan


def central_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """(low, high) holding at least `level` of the values, by nearest rank rounded outward: v[floor(a (n-1))] and
    v[ceil((1-a)(n-1))] with a = (1 - level) / 2 (a bootstrap's percentile interval); (nan, nan) when empty."""
    v = _finite(values)
    if not v:
        return math.nan, math.nan
    a, n = (1 - level) / 2, len(v)
    return v[math.floor(a * (n - 1))], v[math.ceil((1 - a) * (n - 1))]


def quartile_interval(values: Iterable[float]) -> tuple[float, float]:
    """`quartiles`, for seaborn's `errorbar=` (a callable from a vector to (low, high)): figures draw the interval
    the sentences judge by."""
    return quartiles(values)


@dataclass(frozen=True)
class Spread:
    """A median with its nearest-rank quartiles (measured values, see `quartiles`) over n values."""

    median: float
    q25: float
    q75: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        v = _finite(values)
        if not v:
            return cls(math.nan, math.nan, math.nan, 0)
        q25, q75 = quartiles(v)
        return cls(float(statistics.median(v)), q25, q75, len(v))

    def scaled(self, factor: float) -> Spread:
        """The same spread in another unit (x100 for a fraction as a percentage)."""
        lo, hi = sorted((self.q25 * factor, self.q75 * factor))
        return Spread(self.median * factor, lo, hi, self.n)

    def text(self, fmt: str = ".3g", unit: str = "") -> str:
        """'12.3 ms (IQR 11.9–12.8, n=3)'."""
        u = f" {unit}" if unit else ""
        return f"{self.median:{fmt}}{u} (IQR {self.q25:{fmt}}–{self.q75:{fmt}}, n={self.n})"

    @property
    def enough(self) -> bool:
        """Whether there are enough values (MIN_REPEATS) to judge a difference by."""
        return self.n >= MIN_REPEATS and not math.isnan(self.median)

    def excludes(self, value: float) -> bool | None:
        """Whether `value` lies outside the interval (a paired ratio's interval excluding 1: a real difference);
        None when fewer than MIN_REPEATS values were measured (n too small)."""
        if not self.enough:
            return None
        return not self.q25 <= value <= self.q75

    def separated(self, other: Spread) -> bool | None:
        """Whether the two intervals do not overlap, so the medians differ by more than the spread of either; None
        when either side rests on fewer than MIN_REPEATS values (n too small)."""
        if not (self.enough and other.enough):
            return None
        return self.q75 < other.q25 or other.q75 < self.q25


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927, "Probable inference, the law of succession,
    and statistical inference", JASA 22:209; the formula as in Agresti & Coull 1998, eq. 2):
    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = successes / n. Returns (low, high) as fractions;
    (nan, nan) for n = 0. Unlike p ± z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0/n or n/n.
    Raises KvlibError for a negative n or successes outside 0..n."""
    checks.whole("n", n, minimum=0)
    checks.whole("successes", successes, minimum=0, maximum=n)
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    # The interval holds p: exactly so at 0/n and n/n, where rounding would otherwise put p a hair outside it.
    return max(0.0, min(low, p)), min(1.0, max(high, p))


def counts_apart(k1: int, n1: int, k2: int, n2: int) -> bool | None:
    """Whether k1/n1 and k2/n2 differ: their 95% Wilson intervals do not overlap; None when either n is 0."""
    if n1 == 0 or n2 == 0:
        return None
    lo1, hi1 = wilson(k1, n1)
    lo2, hi2 = wilson(k2, n2)
    return hi1 < lo2 or hi2 < lo1


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho over pairs, and whether it may be stated as a finding (`finding`; `why` says why not)."""

    rho: float | None  # None when it cannot be computed (fewer than 2 pairs, or a side constant)
    n: int  # pairs
    finding: bool
    why: str  # '' for a finding, else the reason, e.g. "only 2 distinct values of keys retrieved (ties)"


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(
    x: Sequence[float],
    y: Sequence[float],
    x_name: str = "x",
    y_name: str = "y",
    y_apart: Callable[[int, int], bool | None] | None = None,
) -> RankCorrelation:
    """Spearman's rho of (x, y) (the Pearson correlation of average ranks; Spearman 1904) and whether it is a
    finding: at least 3 pairs, at least 3 distinct values on each side, and, when `y_apart(i, j)` is given (whether
    y[i] and y[j] differ beyond their intervals, e.g. `counts_apart`), the largest and the smallest y apart."""
    if len(x) != len(y):
        raise ValueError(f"rank_correlation: {len(x)} x values but {len(y)} y values")
    n = len(x)
    rho = None
    if n >= 2 and len(set(x)) > 1 and len(set(y)) > 1:
        rx, ry = _ranks(list(x)), _ranks(list(y))
        mx, my = statistics.fmean(rx), statistics.fmean(ry)
        cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
        rho = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    why = ""
    if n < MIN_REPEATS:
        why = f"only {n} pair{'s' if n != 1 else ''} to rank (at least {MIN_REPEATS} needed)"
    else:
        for name, v in ((x_name, x), (y_name, y)):
            if len(set(v)) < MIN_REPEATS:
                why = (
                    f"only {len(set(v))} distinct value{'s' if len(set(v)) != 1 else ''} of {name} (ties give no order)"
                )
                break
    if not why and y_apart is not None:
        hi = max(range(n), key=lambda i: y[i])
        lo = min(range(n), key=lambda i: y[i])
        if not y_apart(hi, lo):
            why = f"the highest and the lowest {y_name} overlap within their intervals: no ordering to predict"
    return RankCorrelation(rho, n, not why and rho is not None, why)


def ranks_apart(values: Sequence[float], name: str = "values", minimum: int = MIN_RANKED) -> str:
    """Whether `values` (one side of a rank correlation over categories, e.g. the keys each policy retrieved)
    can rank them: '' when there are at least `minimum` values and no two are equal; else why not, in words
    ("3 distinct values of keys retrieved among 5 (ties)", "only 4 values of kld (at least 5 needed)")."""
    distinct = len(set(values))
    if len(values) < minimum:
        return f"only {len(values)} value{'s' if len(values) != 1 else ''} of {name} (at least {minimum} needed)"
    if distinct < len(values):
        return f"{distinct} distinct value{'s' if distinct != 1 else ''} of {name} among {len(values)} (ties)"
    return ""


def caveat(apart: bool | None, what: str = "repeats", interval: str = "interquartile ranges") -> str:
    """What a sentence comparing measured values must add: '' when the difference is beyond the spread (apart is
    True), else why it may be noise (False) or cannot be judged (None: n too small)."""
    if apart is None:
        return (
            f"n too small: fewer than {MIN_REPEATS} {what} on a side, so no spread to tell this difference from noise"
        )
    if apart:
        return ""
    return f"within the spread: the {interval} over {what} overlap, so this difference may be noise"
