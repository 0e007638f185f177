"""Shared seaborn conventions, so that every figure of the study reads the same way.

- Points and lines are medians over repeats; error bars and bands are the interquartile range (25th to 75th
  percentile), which says how much repeats disagreed without assuming a distribution. Every caption says so.
- Every figure has a title and axis labels with units; `label` refuses an axis label without one.
- Every decoding path and cache layout has one colour and one place in the order in every figure (COLORS, ORDER;
  `color`, `order`, `colors`, `palette` match names such as "kvlib static cache", "static", "paged (block 16)").
  `lines`, `points` and `bars` use them; a notebook calling seaborn itself passes `palette=plotting.palette(...)`.
- `tidy`, called by kvlib.study.Outputs.figure before a figure is saved, puts legends outside the data (one for
  the figure when the panels agree), gives a y axis whose values span decades a log scale, and wraps a title or
  label longer than its axis, so that no text runs into another.

One concept in one file (over 400 lines): how every figure of the study looks (colours, order, axes, legends).
"""

from __future__ import annotations

import math
import re
import textwrap
import zlib
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import FuncFormatter, NullFormatter

from kvlib.caches.base import CACHE_LAYOUTS
from kvlib.core import stats

ESTIMATOR = "median"
ERRORBAR = stats.quartile_interval  # nearest-rank quartiles (measured values): the interval the sentences judge by
PALETTE = "colorblind"
SEQUENTIAL = "crest"  # for a numeric hue (batch sizes, lengths): light to dark, never a path's or layout's colour
_UNIT = re.compile(r"\(.+\)|\[.+\]")  # "latency (ms)" or "latency [ms]"


def setup() -> None:
    """The study's look; call once per notebook."""
    sns.set_theme(style="whitegrid", context="notebook", palette=PALETTE)
    matplotlib.rcParams.update({"figure.dpi": 100, "axes.titleweight": "bold", "figure.titleweight": "bold"})


def iqr_note(n_repeats: int | str, what: str = "repeats") -> str:
    """The sentence every caption with error bars carries."""
    return (
        f"Points/lines: median over {n_repeats} {what}; error bars/bands: interquartile range by nearest rank "
        "(measured values; with 3 or 4 values, their range)."
    )


def label(ax: Any, title: str, x: str, y: str) -> None:
    """Title and axis labels; a label must carry its unit in parentheses ("(count)" for plain numbers)."""
    for name, text in (("x", x), ("y", y)):
        if not _UNIT.search(text):
            raise ValueError(f"{name} axis label {text!r} has no unit; write e.g. 'latency (ms)'")
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(y)


# One colour and one place in the order for every decoding path and cache layout, in every figure of the study.
# A name is matched by what it says ("kvlib static cache", "static", "hf static cache" are the static layout; "paged
# (block 16)" is the paged one); kvlib's paths take the full colour, Hugging Face's the light shade of the same
# layout. Listed in the order figures show them: the baseline first, then the exact layouts, the lossy ones last.
_STYLES: tuple[tuple[str, str | None, str], ...] = (  # colour None: the layout's own (KVCache.colour)
    # (key, colour, what it is)
    ("naive", "#4d4d4d", "no cache: every step recomputes the whole sequence"),
    ("hf naive", "#a6a6a6", "Hugging Face generate, use_cache=False"),
    ("dynamic", None, "cache grown by concatenation every step"),
    ("hf dynamic", "#f6c46a", "Hugging Face DynamicCache"),
    ("static", None, "cache preallocated to the run's length, written in place"),
    ("hf static", "#86bde6", "Hugging Face StaticCache"),
    ("static_context", "#08306b", "static cache preallocated to the model's whole context"),
    ("paged", None, "block pool, blocks freed when a sequence ends"),
    ("paged_keep", "#8fd9bd", "block pool, blocks kept until the batch ends"),
    ("int8", "#d55e00", "int8 codes per token"),
    ("int8 tail", "#f4a582", "int8 codes, recent tokens in full precision"),
    ("int4", "#cc78bc", "int4 codes per token"),
    ("int4 kivi", "#762a83", "int4, KIVI: keys per channel, recent tokens in full precision"),
    ("hf quanto", "#ca9161", "Hugging Face QuantizedCache, quanto backend"),
    ("hf hqq", "#8c510a", "Hugging Face QuantizedCache, HQQ backend"),
    ("hf fp8", "#dfc27d", "Hugging Face fp8 cache"),
    ("window", None, "sliding window with attention sinks (StreamingLLM)"),
    ("streaming", None, "eviction: StreamingLLM as a policy (the window's tokens, so the window's colour)"),
    ("h2o", None, "eviction: heavy hitters by accumulated attention + recent (H2O)"),
    ("tova", None, "eviction: the token the current query attends least goes (TOVA)"),
    ("snapkv", None, "eviction: prompt positions most attended by the last queries (SnapKV)"),
    ("knorm", None, "eviction: keys of smallest L2 norm kept (K-norm)"),
    ("hybrid", None, "per layer type: the window on sliding layers, every token on full ones (Gemma)"),
    ("prefix", "#00a5a5", "prefix prefilled once and shared"),
    ("multi-head", "#3f007d", "one key/value head per query head"),
    ("grouped-query", "#807dba", "key/value heads shared by groups of query heads"),
    ("multi-query", "#bcbddc", "one key/value head for all query heads"),
    ("kvlib", "#1a1a1a", "the engine: kvlib's own decoder"),
    ("hf", "#c51b7d", "the engine: Hugging Face transformers"),
    ("cached", "#0173b2", "with a cache (01's counted work)"),
    # the parts of a run's memory (04): greys, except the cache, in the static layout's colour (the one measured)
    ("weights", "#636363", "the model's weights"),
    ("packed weight copy", "#969696", "kvlib's CPU fast path: a packed copy of the weights"),
    ("kv cache", "#0173b2", "the KV cache"),
    ("rest", "#d0d0d0", "everything else in the peak: activations, allocator, libraries"),
)
# Colours for a registered layout that declares none (KVCache.colour), taken in registration order: distinct from
# every colour above and from each other (seaborn's "dark" and "bright" tones not already used).
_NEW_LAYOUT_COLOURS = ("#8b2be2", "#023eff", "#1ac938", "#ff7c00", "#e8000b", "#00d7ff", "#9f4800", "#3c3c3c")
_SPARE = ("#56b4e9", "#e69f00", "#009e73", "#f0e442", "#d55e00", "#cc79a7", "#999999", "#0072b2")


def layout_colour(name: str) -> str:
    """The colour of a registered layout: its own (KVCache.colour), else the palette rule: the i-th registered
    layout without a colour of its own takes the i-th of _NEW_LAYOUT_COLOURS (cycling after the last)."""
    cls = CACHE_LAYOUTS[name]
    if cls.colour is not None:
        return cls.colour
    uncoloured = [n for n, c in CACHE_LAYOUTS.items() if c.colour is None]
    return _NEW_LAYOUT_COLOURS[uncoloured.index(name) % len(_NEW_LAYOUT_COLOURS)]


def _colours() -> dict[str, str]:
    """Every known key's colour: the table's, layouts' from their classes, then registered layouts not in the table
    (a layout added since, in registration order)."""
    table = {key: color if color is not None else layout_colour(key) for key, color, _ in _STYLES}
    return table | {n: layout_colour(n) for n in CACHE_LAYOUTS if n not in table}


def _order() -> tuple[str, ...]:
    keys = tuple(key for key, _, _ in _STYLES)
    return keys + tuple(n for n in CACHE_LAYOUTS if n not in keys)


COLORS: dict[str, str] = _colours()  # at import; `color` and `order` read the registry again for later layouts
ORDER: tuple[str, ...] = _order()


def style_key(name: object) -> str | None:
    """The key in COLORS of a path or layout name (None: not a known one). Marks in brackets ("[0 evicted]") and
    sizes in parentheses are ignored: "paged (block 16)" -> "paged", "hf static cache" -> "hf static"."""
    text = re.sub(r"\[.*?\]", "", str(name)).strip().lower()
    if text in _colours():
        return text
    engine = "hf " if text.startswith(("hf ", "hf's", "hugging face")) else ""
    text = re.sub(r"^(kvlib|hf|hugging face)('s)?\s+", "", text)
    if text == "none":  # a cache mode: no cache
        return engine + "naive"
    rules = (
        ("naive", ("naive", "no cache", "use_cache=false")),
        ("static_context", ("static_context", "static (context", "context")),
        ("paged_keep", ("paged_keep", "paged (keep")),
        ("quanto", ("quanto",)),
        ("hqq", ("hqq",)),
        ("fp8", ("fp8",)),
        ("int4 kivi", ("kivi",)),
        ("int8 tail", ("int8 per-token, 32", "int8, ", "int8 with")),
        ("int8", ("int8",)),
        ("int4", ("int4",)),
        ("knorm", ("k-norm",)),
        ("prefix", ("shared", "prefix")),
        ("multi-head", ("multi-head",)),
        ("grouped-query", ("grouped-query",)),
        ("multi-query", ("multi-query",)),
        ("static", ("full precision",)),
    )
    colours = _colours()
    for key, needles in rules:
        if any(n in text for n in needles):
            if key in ("quanto", "hqq", "fp8"):
                return f"hf {key}"
            if key == "int8 tail" and "tail" not in text:
                continue
            full = engine + key
            return full if full in colours else key
    words = set(re.findall(r"[a-z0-9_]+", text))
    for name in sorted(CACHE_LAYOUTS, key=len, reverse=True):  # a registered layout named in the label
        if name in words:
            full = engine + name
            return full if full in colours else name
    return None


def color(name: object) -> str:
    """The colour of a path or layout in every figure; a name the study does not know gets a fixed spare colour."""
    key = style_key(name)
    if key is not None:
        return _colours()[key]
    return _SPARE[zlib.crc32(str(name).encode()) % len(_SPARE)]


def order(labels: Any) -> list[str]:
    """`labels` (repeats dropped) in the study's fixed order: known paths and layouts by ORDER, others after them
    by name."""
    labels = list(dict.fromkeys(str(v) for v in labels))
    rank = {key: i for i, key in enumerate(_order())}

    def where(v: str) -> tuple[int, str]:
        key = style_key(v)
        return (rank[key] if key is not None else len(rank), v)

    return sorted(labels, key=where)


def colors(labels: Any) -> tuple[dict[str, Any], list[str]]:
    """(palette, order) for these hue labels: every known path or layout keeps its colour and place everywhere.
    Two labels of one figure that map to the same colour (paged with two block sizes) are told apart by shade."""
    ordered = order(labels)
    palette: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for v in ordered:
        c = color(v)
        k = seen.get(c, 0)
        seen[c] = k + 1
        rgb = matplotlib.colors.to_rgb(c)
        palette[v] = c if k == 0 else tuple(x + (1 - x) * min(0.6, 0.3 * k) for x in rgb)  # lighter shades
    return palette, ordered


def palette(labels: Any) -> dict[str, Any]:
    """{label: colour} for these paths or layouts (seaborn's `palette=`); pair it with hue_order=order(labels)."""
    return colors(labels)[0]


def bars(data: Any, x: str, y: str, hue: str, ax: Any, **kwargs: Any) -> Any:
    """A bar chart whose bars take the colours and order of their path or layout (`hue`); no error bars unless
    `errorbar` is given (use it for counts that do not vary between runs)."""
    palette, hue_order = colors(data[hue].unique())
    kwargs.setdefault("errorbar", None)
    kwargs.setdefault("legend", False)
    categorical = y if data[x].dtype.kind in "fiu" and data[y].dtype.kind not in "fiu" else x
    if categorical == hue:
        kwargs.setdefault("order", hue_order)
    return sns.barplot(data=data, x=x, y=y, hue=hue, palette=palette, hue_order=hue_order, ax=ax, **kwargs)


def _hue(data: Any, hue: str | None, kwargs: dict[str, Any]) -> None:
    if hue is not None and "palette" not in kwargs:
        kwargs["palette"], kwargs["hue_order"] = colors(data[hue].unique())


def lines(data: Any, x: str, y: str, hue: str | None, ax: Any, **kwargs: Any) -> Any:
    """Medians with an interquartile band, one line per `hue`. Each line also has its own marker and dashes, so
    that lines which coincide (two layouts holding the same bytes) both stay visible."""
    _hue(data, hue, kwargs)
    if hue is not None and "style" not in kwargs:
        kwargs.update(style=hue, style_order=kwargs["hue_order"], markers=True, dashes=True)
    else:
        kwargs.setdefault("marker", "o")
    return sns.lineplot(data=data, x=x, y=y, hue=hue, ax=ax, estimator=ESTIMATOR, errorbar=ERRORBAR, **kwargs)


def points(data: Any, x: str, y: str, hue: str | None, ax: Any, **kwargs: Any) -> Any:
    """Medians with interquartile error bars, for categories (not joined by lines: there is nothing between).
    Without a `hue`, categories that are paths or layouts take their colours (and order) all the same."""
    if hue is None and "color" not in kwargs and all(style_key(v) is not None for v in data[x].unique()):
        kwargs.setdefault("order", order(data[x].unique()))
        kwargs.update(hue=x, legend=False, palette=palette(data[x].unique()))
        kwargs.setdefault("dodge", False)
        hue = kwargs.pop("hue")
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
    Minor ticks at 2 and 5 times a power of ten are labelled when the axis spans less than a factor of 100 (the
    others would crowd against each other)."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    ax.autoscale_view()  # the limits of the log scale, not the linear one's (which may reach below 0)
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()

    def minor(v: float, _: Any) -> str:
        lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if lead in (2, 5) else ""

    target.set_major_formatter(fmt)
    target.set_minor_formatter(FuncFormatter(minor) if lo > 0 and hi / lo < 100 else NullFormatter())


# ---- the last touch before a figure is saved (kvlib.study.Outputs.figure calls it) ----------------------------------

LOG_SPAN = 30.0  # a linear axis whose positive data span more than this factor gets a log scale
_KEEP_LINEAR = "_kvlib_keep_linear"


def keep_linear(ax: Any, axis: str = "y") -> None:
    """Keep `axis` of `ax` linear even when its values span decades: for a figure whose point is the *shape* of
    growth (linear against constant, quadratic against linear), which a log scale would flatten into parallel
    lines. The caption should then say that the smaller curve sits near zero."""
    setattr(ax, f"{_KEEP_LINEAR}_{axis}", True)


def _legend_entries(ax: Any) -> list[tuple[Any, str]]:
    legend = ax.get_legend()
    if legend is None:
        return []
    return [(h, t.get_text()) for h, t in zip(legend.legend_handles, legend.get_texts(), strict=False)]


def _handle_key(handle: Any) -> tuple[str, str]:
    """What a legend handle looks like (kind and colour): entries of one label merge only when they look alike."""
    getter = getattr(handle, "get_color", None) or getattr(handle, "get_facecolor", None)
    try:
        rgba = matplotlib.colors.to_hex(getter(), keep_alpha=True) if getter else ""
    except (TypeError, ValueError):
        rgba = ""
    return type(handle).__name__, rgba


def _merge_legends(fig: Any) -> None:
    """Legends outside the data: one legend for the figure when the panels' entries agree (same label, same look),
    else each panel's legend to its right; never on top of a panel."""
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    if not axes:
        return
    entries: dict[str, Any] = {}
    agree = True
    for ax in axes:
        for handle, text in _legend_entries(ax):
            if text in entries and _handle_key(entries[text]) != _handle_key(handle):
                agree = False
            entries.setdefault(text, handle)
    wide = len([a for a in fig.axes if a.has_data()]) > 1
    if agree and wide:  # one legend under the panels, for all of them
        for ax in axes:
            ax.get_legend().remove()
        longest = max((len(t) for t in entries), default=0)
        fig.legend(
            list(entries.values()),
            list(entries),
            loc="outside lower center",
            ncols=max(1, min(len(entries), 4 if longest < 24 else 2)),
            frameon=False,
        )
    else:  # each panel's legend to its right
        for ax in axes:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def log_if_decades(ax: Any, axis: str = "y") -> None:
    """Log scale on a linear axis whose positive data span more than LOG_SPAN, and say so in its label (tidy does
    it for every y axis; call it for an x axis of values, e.g. horizontal error bars)."""
    scale = ax.get_yscale() if axis == "y" else ax.get_xscale()
    fixed = not (ax.get_autoscaley_on() if axis == "y" else ax.get_autoscalex_on())  # limits set by the notebook
    if scale != "linear" or fixed or not ax.has_data() or getattr(ax, f"{_KEEP_LINEAR}_{axis}", False):
        return
    lo, hi = (ax.dataLim.y0, ax.dataLim.y1) if axis == "y" else (ax.dataLim.x0, ax.dataLim.x1)
    sizes = [p.get_height() if axis == "y" else p.get_width() for p in ax.patches if hasattr(p, "get_height")]
    if lo == 0 and sizes and all(v >= 0 for v in sizes):  # bars from 0: judge by the bars' positive lengths
        positive = [v for v in sizes if v > 0]
        lo, hi = (min(positive), max(positive)) if positive else (0, 0)
    if not (lo > 0 and hi / lo > LOG_SPAN):
        return
    log_axis(ax, axis)
    target = ax.yaxis if axis == "y" else ax.xaxis
    text = target.get_label().get_text()
    if "log" not in text and text.rstrip().endswith(")"):
        target.set_label_text(re.sub(r"\)\s*$", ", log scale)", text))


def _wrap(text_artist: Any, limit_px: float, renderer: Any) -> None:
    """Wrap a title or axis label onto more lines until it fits `limit_px` (its axis's length)."""
    text = text_artist.get_text()
    if not text or "\n" in text or limit_px <= 0:
        return
    width = text_artist.get_window_extent(renderer).width
    if text_artist.get_rotation() == 90:
        width = text_artist.get_window_extent(renderer).height
    if width <= limit_px:
        return
    chars = max(12, int(len(text) * limit_px / width * 0.95))
    text_artist.set_text(textwrap.fill(text, chars))


def _wrap_texts(fig: Any) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        _wrap(ax.title, box.width, renderer)
        _wrap(ax.xaxis.label, box.width, renderer)
        _wrap(ax.yaxis.label, box.height, renderer)
    if fig._suptitle is not None:
        _wrap(fig._suptitle, fig.get_window_extent(renderer).width * 0.95, renderer)


def tidy(fig: Any) -> None:
    """What every figure gets before it is saved: log scales where values span decades, legends outside the data
    (one per figure where the panels agree), and titles and labels wrapped so that no text runs into another."""
    for ax in fig.axes:
        log_if_decades(ax, "y")
    _merge_legends(fig)
    _wrap_texts(fig)
