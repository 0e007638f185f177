"""Shared seaborn conventions, so that every figure of the study reads the same way.

- Points and lines are medians over repeats; error bars and bands are the interquartile range (25th to 75th
  percentile), which says how much repeats disagreed without assuming a distribution. Every caption says so.
- Every figure has a title and axis labels with units; `label` refuses an axis label without one.
"""

from __future__ import annotations

import re
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns

ESTIMATOR = "median"
ERRORBAR = ("pi", 50)  # seaborn's percentile interval of width 50: the 25th to 75th percentile
PALETTE = "colorblind"
_UNIT = re.compile(r"\(.+\)|\[.+\]")  # "latency (ms)" or "latency [ms]"


def setup() -> None:
    """The study's look; call once per notebook."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)
    matplotlib.rcParams.update({"figure.dpi": 100, "axes.titleweight": "bold", "figure.titleweight": "bold"})


def iqr_note(n_repeats: int | str, what: str = "repeats") -> str:
    """The sentence every caption with error bars carries."""
    return (
        f"Points/lines: median over {n_repeats} {what}; error bars/bands: interquartile range (25th–75th percentile)."
    )


def label(ax: Any, title: str, x: str, y: str) -> None:
    """Title and axis labels; a label must carry its unit in parentheses ("(count)" for plain numbers)."""
    for name, text in (("x", x), ("y", y)):
        if not _UNIT.search(text):
            raise ValueError(f"{name} axis label {text!r} has no unit; write e.g. 'latency (ms)'")
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(y)


# One colour per decoding path and engine in every figure of the study (indices into the colorblind palette).
_COLOR_INDEX = {
    "kvlib static cache": 0,
    "kvlib dynamic cache": 1,
    "kvlib naive (no cache)": 3,
    "hf static cache": 2,
    "hf dynamic cache": 4,
    "hf naive (no cache)": 5,
    "kvlib": 0,
    "hf": 2,
    "naive": 3,
    "cached": 0,
}
_SPARE = (6, 7, 9, 8)


def colors(labels: Any) -> tuple[dict[str, Any], list[str]]:
    """(palette, order) for these hue labels: known paths keep their colour everywhere; others get spare ones."""
    base = sns.color_palette(PALETTE, 10)
    labels = list(dict.fromkeys(str(v) for v in labels))
    known = [v for v in _COLOR_INDEX if v in labels]
    rest = sorted(v for v in labels if v not in _COLOR_INDEX)
    spare = _SPARE * (1 + len(rest) // len(_SPARE))
    palette = {v: base[_COLOR_INDEX[v]] for v in known} | {v: base[i] for v, i in zip(rest, spare, strict=False)}
    return palette, known + rest


def _hue(data: Any, hue: str | None, kwargs: dict[str, Any]) -> None:
    if hue is not None and "palette" not in kwargs:
        kwargs["palette"], kwargs["hue_order"] = colors(data[hue].unique())


def lines(data: Any, x: str, y: str, hue: str | None, ax: Any, **kwargs: Any) -> Any:
    """Medians with an interquartile band, one line per `hue`."""
    _hue(data, hue, kwargs)
    return sns.lineplot(
        data=data, x=x, y=y, hue=hue, ax=ax, estimator=ESTIMATOR, errorbar=ERRORBAR, marker="o", **kwargs
    )


def points(data: Any, x: str, y: str, hue: str | None, ax: Any, **kwargs: Any) -> Any:
    """Medians with interquartile error bars, for categories (not joined by lines: there is nothing between)."""
    _hue(data, hue, kwargs)
    kwargs.setdefault("dodge", 0.3 if hue else False)
    return sns.pointplot(
        data=data, x=x, y=y, hue=hue, ax=ax, estimator=ESTIMATOR, errorbar=ERRORBAR, capsize=0.1,
        linestyle="none", **kwargs,
    )  # fmt: skip


def legend_below(ax: Any) -> None:
    """Move the legend under the panel, where it cannot hide data."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, title=None)


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0, title: str = "") -> tuple[Any, Any]:
    """A figure of ncols x nrows panels, each width x height inches, with an overall title."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained")
    if title:
        fig.suptitle(title)
    flat = axes.ravel()
    return fig, (flat[0] if len(flat) == 1 else flat)


def scaled(values: Any, unit: str) -> tuple[float, str]:
    """(divisor, unit) that puts the largest of `values` between 1 and 1000: scaled(flops, "FLOP") may give
    (1e9, "GFLOP"). Divide the column by the divisor before plotting and write the unit in the label."""
    top = max(abs(float(v)) for v in values) if len(values) else 1.0
    for divisor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if top >= divisor:
            return divisor, f"{prefix}{unit}"
    return 1.0, unit


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log scale labelled with plain numbers (20, 50, 100), not powers of ten; call it after plotting.
    Minor ticks are labelled only when the axis spans less than a factor of 20 (else they crowd)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target.set_major_formatter(fmt)
    target.set_minor_formatter(fmt if lo > 0 and hi / lo < 20 else NullFormatter())
