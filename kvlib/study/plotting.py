"""Shared seaborn conventions, so that every figure of the study reads the same way.

- Points and lines are medians over repeats; error bars and bands are the interquartile range (25th to 75th
  percentile), which says how much repeats disagreed without assuming a distribution. Every caption says so.
- Every figure has a title and axis labels with units; `label` refuses an axis label without one.
- One palette: every cache layout (eviction policies included), decoding path, engine and model has one colour
  and one place in the order in every figure, and no two share a colour (`swatches`, `colour_of(kind, name)`;
  tests/test_palette.py compares every pair by CIEDE2000). `color`, `order`, `colors`, `palette` match names such as
  "kvlib static cache", "static", "paged (block 16)"; anything else is NEUTRAL grey. `lines`, `points` and `bars`
  use them; a notebook calling seaborn itself passes `palette=plotting.palette(...)`.
- No series hides under another: `lines` gives each line its own marker and dashes and names, in the legend, the
  lines that coincide (`coinciding`, `mark_coinciding`).
- `tidy`, called by kvlib.study.Outputs.figure before a figure is saved, puts legends outside the data (one for
  the figure when the panels agree), gives a y axis whose values span decades a log scale, and wraps a title or
  label longer than its axis, so that no text runs into another.

One concept in one file (over 600 lines): how every figure of the study looks (colours, order, axes, legends).
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import FuncFormatter, NullFormatter

from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE
from kvlib.core import stats
from kvlib.core.errors import KvlibError

ESTIMATOR = "median"
ERRORBAR = stats.quartile_interval  # nearest-rank quartiles (measured values): the interval the sentences judge by
_UNIT = re.compile(r"\(.+\)|\[.+\]")  # "latency (ms)" or "latency [ms]"


def setup() -> None:
    """The study's look; call once per notebook."""
    # a series drawn without a palette colour is NEUTRAL: it means none of the palette's things
    sns.set_theme(style="whitegrid", context="notebook", palette=[NEUTRAL])
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


# ---- the palette: one colour, one meaning, in every figure of the report ---------------------------------------
#
# Every layout (and eviction policy), decoding path, engine and model has one colour, and no two of them share one:
# `swatches()` lists them all, `colour_of(kind, name)` is the one place that answers, and tests/test_palette.py
# checks every pair. Colours are compared by CIEDE2000 (`colour_distance`, on the sRGB values): two things that are
# not shades of one another are at least DISTINCT apart, and any two things at least NEAR_IDENTICAL apart.
# A variant drawn beside its parent (Hugging Face's version of a layout, a layout's option, a smaller model of one
# family) is a lighter or darker shade of the parent's colour (`shade_of`); the same thing under two names (the
# streaming policy keeps the window layout's tokens) has one colour (`same_as`). Lines also differ by marker and
# dashes (`lines`), so that readers with a colour-vision deficiency can tell them apart too.

NEUTRAL = "#8f8f8f"  # none of the palette's things: reference lines, published values, ratios, memory besides the cache
NEAR_IDENTICAL = 10.0  # CIEDE2000: 2-10 is "perceptible at a glance"; below 10, two colours read as one colour
# Between two different things: twice that. The two pairs a careful reader took for one colour (paged #029e73 against
# TOVA's former #117733, "green", 16.4; int4 #cc78bc against SnapKV's former #cc6677, "pink", 16.7) fall below it.
DISTINCT = 20.0

# A name is matched by what it says ("kvlib static cache", "static", "hf static cache" are the static layout; "paged
# (block 16)" is the paged one); kvlib's paths take the layout's colour, Hugging Face's a light shade of it.
# Listed in the order figures show them: the baseline first, then the exact layouts, the lossy ones last.
_STYLES: tuple[tuple[str, str | None, str, str | None], ...] = (  # colour None: the layout's own (KVCache.colour)
    # (key, colour, what it is, the key it is a shade of)
    ("naive", "#4d4d4d", "no cache: every step recomputes the whole sequence", None),
    ("hf naive", "#c9c9c9", "Hugging Face generate, use_cache=False", "naive"),
    ("dynamic", None, "cache grown by concatenation every step", None),
    ("hf dynamic", "#fdd49e", "Hugging Face DynamicCache", "dynamic"),
    ("static", None, "cache preallocated to the run's length, written in place", None),
    ("hf static", "#a8d1f0", "Hugging Face StaticCache", "static"),
    ("static_context", "#0b2559", "static cache preallocated to the model's whole context", "static"),
    ("paged", None, "block pool, blocks freed when a sequence ends", None),
    ("paged_keep", "#a1e3c9", "block pool, blocks kept until the batch ends", "paged"),
    ("int8", None, "int8 codes per token (the quantized layout's default)", None),
    ("int8 tail", "#f4a582", "int8 codes, recent tokens in full precision", "int8"),
    ("int4", "#cc79a7", "int4 codes per token", None),
    ("int4 kivi", "#6a1b5a", "int4 (or int2), KIVI: keys per channel, recent tokens in full precision", "int4"),
    ("window", None, "sliding window with attention sinks (StreamingLLM)", None),
    ("streaming", None, "eviction: StreamingLLM as a policy (the window's tokens, so the window's colour)", None),
    ("h2o", None, "eviction: heavy hitters by accumulated attention + recent (H2O)", None),
    ("tova", None, "eviction: the token the current query attends least goes (TOVA)", None),
    ("snapkv", None, "eviction: prompt positions most attended by the last queries (SnapKV)", None),
    ("knorm", None, "eviction: keys of smallest L2 norm kept (K-norm)", None),
    ("hybrid", None, "per layer type: the window on sliding layers, every token on full ones (Gemma)", None),
)
# Keys of _STYLES that take a registered layout's colour under another name, and other names of one thing
_LAYOUT_OF = {"int8": "quantized"}  # the quantized layout's default is 8 bits
SAME_AS = {"streaming": "window", "quantized": "int8", "cached": REFERENCE}  # name -> the thing whose colour it is
# The engines: kvlib's decoder and Hugging Face transformers (figure 03 colours points by engine)
ENGINE_COLOURS: dict[str, tuple[str, str]] = {
    "kvlib": ("#000000", "the engine: kvlib's own decoder"),
    "hf": ("#8833ff", "the engine: Hugging Face transformers"),
    # a dark green: the one colour found at least 20 (CIEDE2000) from every other and from the spare layout colours
    "llama.cpp": ("#003311", "the engine: llama.cpp on the GGUF as stored; its cache types are shades of it"),
}
# The models (kvlib.core.config.PRESETS): one hue per family, the smaller models a shade of it
MODEL_COLOURS: dict[str, tuple[str, str | None]] = {  # preset -> (colour, the preset it is a shade of)
    "gpt2": ("#774411", None),
    "distilgpt2": ("#c2ab94", "gpt2"),
    "gpt2-medium": ("#3c2208", "gpt2"),
    "tiny": ("#99734c", "gpt2"),  # GPT-2-shaped
    "smollm2-135m": ("#22eecc", None),
    "tiny-llama": ("#1bbea3", "smollm2-135m"),  # Llama-shaped
    "gemma3-270m": ("#ccbbff", None),
    "tiny-gemma": ("#7a7099", "gemma3-270m"),  # Gemma-3-shaped
}
# Colours for a registered layout that declares none (KVCache.colour), taken in registration order: each at least
# 15 (CIEDE2000) from every colour above and from each other (chosen by a greedy max-min search over sRGB).
_NEW_LAYOUT_COLOURS = ("#446600", "#22cc00", "#ff4455", "#7788ff", "#ff00ff", "#118899", "#aa6666", "#776600")


@dataclass(frozen=True)
class Swatch:
    """One thing of the palette: its kind ("layout", "engine", "model" or "neutral"), name, colour (hex), what it
    is, the thing it is a shade of (None: a colour of its own) and the thing it is another name of (None: itself)."""

    kind: str
    name: str
    colour: str
    meaning: str
    shade_of: str | None = None
    same_as: str | None = None


def layout_colour(name: str) -> str:
    """The colour of a registered layout: its own (KVCache.colour), else the palette rule: the i-th registered
    layout without a colour of its own takes the i-th of _NEW_LAYOUT_COLOURS (cycling after the last)."""
    cls = CACHE_LAYOUTS[name]
    if cls.colour is not None:
        return cls.colour
    uncoloured = [n for n, c in CACHE_LAYOUTS.items() if c.colour is None]
    return _NEW_LAYOUT_COLOURS[uncoloured.index(name) % len(_NEW_LAYOUT_COLOURS)]


def _style_colour(key: str, colour: str | None) -> str:
    return colour if colour is not None else layout_colour(_LAYOUT_OF.get(key, key))


def swatches() -> list[Swatch]:
    """Every thing the palette colours, once each: the layouts and paths of the style table, registered layouts not
    in it (in registration order), the engines, the models and NEUTRAL."""
    out = [
        Swatch("layout", key, _style_colour(key, colour), what, shade, SAME_AS.get(key))
        for key, colour, what, shade in _STYLES
    ]
    keys = {s.name for s in out}
    out += [
        Swatch("layout", n, layout_colour(n), (CACHE_LAYOUTS[n].__doc__ or n).split("\n")[0], None, SAME_AS.get(n))
        for n in CACHE_LAYOUTS
        if n not in keys
    ]
    out.append(Swatch("layout", "cached", layout_colour(REFERENCE), "a cache in 01's counted work (any exact layout "
                      "does that work): the reference layout's colour", None, REFERENCE))  # fmt: skip
    out += [Swatch("engine", n, c, what) for n, (c, what) in ENGINE_COLOURS.items()]
    out += [Swatch("model", n, c, f"the model preset {n}", shade) for n, (c, shade) in MODEL_COLOURS.items()]
    out.append(Swatch("neutral", "neutral", NEUTRAL, "none of the palette's things"))
    return out


def colour_of(kind: str, name: str) -> str:
    """The one colour of `name` of `kind` in every figure: "layout" (a registered layout or eviction policy, by its
    class's colour, or a key of the style table such as "hf static", "int4"), "engine" ("kvlib", "hf"), "model" (a
    preset of kvlib.core.config.PRESETS; NEUTRAL for a model from a local folder, which has no colour). Raises
    KvlibError (one line) for an unknown kind, layout or engine."""
    if kind == "layout":
        table = {s.name: s.colour for s in swatches() if s.kind == "layout"}
        if name not in table:
            raise KvlibError(f"colour_of: unknown layout {name!r}; choose one of {', '.join(table)}")
        return table[name]
    if kind == "engine":
        if name not in ENGINE_COLOURS:
            raise KvlibError(f"colour_of: unknown engine {name!r}; choose one of {', '.join(ENGINE_COLOURS)}")
        return ENGINE_COLOURS[name][0]
    if kind == "model":
        return MODEL_COLOURS[name][0] if name in MODEL_COLOURS else NEUTRAL
    raise KvlibError(f"colour_of: unknown kind {kind!r}; choose one of layout, engine, model")


def _lab(colour: Any) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) of a matplotlib colour, from its sRGB values."""

    def linear(u: float) -> float:
        return u / 12.92 if u <= 0.04045 else ((u + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(u) for u in matplotlib.colors.to_rgb(colour))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def ciede2000(lab1: tuple[float, float, float], lab2: tuple[float, float, float]) -> float:
    """The CIEDE2000 colour difference of two CIE L*a*b* colours (Sharma, Wu and Dalal, 2005, equations 1-22)."""
    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_mean = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_mean**7 / (c_mean**7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p = math.degrees(math.atan2(b1, a1p)) % 360 if c1p else 0.0
    h2p = math.degrees(math.atan2(b2, a2p)) % 360 if c2p else 0.0
    dh = 0.0 if c1p * c2p == 0 else (h2p - h1p + 180) % 360 - 180
    d_hue = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dh / 2))
    l_mean, cp_mean = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        h_mean = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        h_mean = (h1p + h2p) / 2
    else:
        h_mean = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(h_mean - 30)) + 0.24 * math.cos(math.radians(2 * h_mean))
         + 0.32 * math.cos(math.radians(3 * h_mean + 6)) - 0.20 * math.cos(math.radians(4 * h_mean - 63)))  # fmt: skip
    rotation = 30 * math.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * math.sqrt(cp_mean**7 / (cp_mean**7 + 25**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / math.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_mean, 1 + 0.015 * cp_mean * t
    r_t = -math.sin(math.radians(2 * rotation)) * r_c
    dl, dc, dhh = (l2 - l1) / s_l, (c2p - c1p) / s_c, d_hue / s_h
    return math.sqrt(dl**2 + dc**2 + dhh**2 + r_t * dc * dhh)


def colour_distance(a: Any, b: Any) -> float:
    """How different two colours look (CIEDE2000 of their sRGB values): below NEAR_IDENTICAL they read as one colour."""
    return ciede2000(_lab(a), _lab(b))


def _colours() -> dict[str, str]:
    """Every name `color` knows, and its colour: the style table's keys and registered layouts, "cached", the engines
    and the models."""
    return {s.name: s.colour for s in swatches() if s.kind != "neutral"}


def _order() -> tuple[str, ...]:
    return tuple(s.name for s in swatches() if s.kind != "neutral")


COLORS: dict[str, str] = _colours()  # at import; `color` and `order` read the registry again for later layouts
ORDER: tuple[str, ...] = _order()


def style_key(name: object) -> str | None:
    """The key in COLORS of a path or layout name (None: not a known one). Marks in brackets ("[0 evicted]") and
    sizes in parentheses are ignored: "paged (block 16)" -> "paged", "hf static cache" -> "hf static"."""
    text = re.sub(r"\[.*?\]", "", str(name)).strip().lower()
    if text in _colours():
        return text
    if text.startswith("llama.cpp"):  # llama.cpp's cache types: the engine's colour, a shade per type in a figure
        return "llama.cpp"
    engine = "hf " if text.startswith(("hf ", "hf's", "hugging face")) else ""
    text = re.sub(r"^(kvlib|hf|hugging face)('s)?\s+", "", text)
    if text == "none":  # a cache mode: no cache
        return engine + "naive"
    rules = (
        ("naive", ("naive", "no cache", "use_cache=false")),
        ("static_context", ("static_context", "static (context", "context")),
        ("paged_keep", ("paged_keep", "paged (keep")),
        ("", ("quanto", "hqq", "fp8")),  # Hugging Face's quantized caches: none of the palette's things
        ("int4 kivi", ("kivi",)),
        ("int8 tail", ("int8 per-token, 32", "int8, ", "int8 with")),
        ("int8", ("int8",)),
        ("int4", ("int4",)),
        ("knorm", ("k-norm",)),
        ("static", ("full precision",)),
    )
    colours = _colours()
    for key, needles in rules:
        if any(n in text for n in needles):
            if not key:
                return None
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
    """The colour of a path, layout, engine or model (by its name or a label naming it) in every figure; NEUTRAL for
    a name that is none of the palette's things."""
    key = style_key(name)
    return _colours()[key] if key is not None else NEUTRAL


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


def line_colours(labels: Any) -> dict[str, Any]:
    """{label: colour} for lines: like `colors`, but a colour repeated in one figure (a layout with several options)
    turns alternately darker and lighter (35%, 35%, 70%, ...), so that no dashed or dotted line fades into white."""
    out: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for v in order(labels):
        c = color(v)
        k = seen.get(c, 0)
        seen[c] = k + 1
        t = min(0.7, 0.35 * ((k + 1) // 2))
        rgb = matplotlib.colors.to_rgb(c)
        out[v] = c if k == 0 else tuple(x * (1 - t) if k % 2 else x + (1 - x) * t for x in rgb)
    return out


def palette(labels: Any) -> dict[str, Any]:
    """{label: colour} for these paths or layouts (seaborn's `palette=`); pair it with hue_order=order(labels)."""
    return colors(labels)[0]


def bars(data: Any, x: str, y: str, hue: str, ax: Any, **kwargs: Any) -> Any:
    """A bar chart whose bars take the colours and order of their path or layout (`hue`); no error bars unless
    `errorbar` is given (use it for counts that do not vary between runs)."""
    palette, hue_order = colors(data[hue].unique())
    kwargs.setdefault("errorbar", None)
    kwargs.setdefault("legend", False)
    kwargs.setdefault("saturation", 1)  # the palette's colour itself, not seaborn's desaturated bar
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
        markers, dashes = line_styles(kwargs["hue_order"])
        kwargs.update(style=hue, style_order=kwargs["hue_order"], markers=markers, dashes=dashes)
    else:
        kwargs.setdefault("marker", "o")
    out = sns.lineplot(data=data, x=x, y=y, hue=hue, ax=ax, estimator=ESTIMATOR, errorbar=ERRORBAR, **kwargs)
    if hue is not None:
        by = [c for c in (kwargs.get("style"), kwargs.get("units")) if isinstance(c, str) and c != hue]
        mark_coinciding(ax, data, x, y, hue, by)
    return out


_MARKERS = ("o", "X", "s", "P", "D", "^", "v", "*", "p", "h", "<", ">")
_DASHES: tuple[Any, ...] = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (2, 2), (6, 2), (1, 2.5))


def line_styles(labels: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """({label: marker}, {label: dashes}) for seaborn's `markers=` and `dashes=`: each path or layout keeps its marker
    and dashes in every figure (by its place in the study's order), and no two labels of one figure share either
    (a label whose own is taken gets the next free one), so lines that coincide stay visible."""
    rank = {key: i for i, key in enumerate(_order())}
    markers: dict[str, str] = {}
    dashes: dict[str, Any] = {}
    for v in (str(v) for v in labels):
        key = style_key(v)
        i = rank[key] if key is not None else len(rank)
        m = next(k for k in range(i, i + len(_MARKERS)) if _MARKERS[k % len(_MARKERS)] not in markers.values())
        d = next((k for k in range(i, i + len(_DASHES)) if _DASHES[k % len(_DASHES)] not in dashes.values()), i)
        markers[v], dashes[v] = _MARKERS[m % len(_MARKERS)], _DASHES[d % len(_DASHES)]
    return markers, dashes


COINCIDE = 0.005  # two lines nowhere further apart than this fraction of their axis read as one line


def coinciding(data: Any, x: str, y: str, hue: str, by: Any = ()) -> list[tuple[list[str], bool]]:
    """Lines of one figure that would hide one another: groups of `hue` labels (in the study's order) whose median
    `y` against `x` (per level of the `by` columns) are defined at the same points and nowhere further apart than
    COINCIDE x the axis's span (on the log scale `tidy` will give the axis when the medians span more than
    LOG_SPAN, else on the linear one), each with True when the medians are exactly equal."""
    by = list(by)
    med = data.groupby([hue, *by, x], observed=True)[y].median().dropna()
    if med.empty:
        return []
    values = med.to_numpy(dtype=float)
    log = bool((values > 0).all() and values.max() / values.min() > LOG_SPAN)
    scaled = med.map(math.log) if log else med
    tolerance = COINCIDE * (scaled.max() - scaled.min())
    series = {str(label): dict(group.droplevel(0).items()) for label, group in scaled.groupby(level=0)}
    labels = [v for v in order(series) if v in series]
    parent = {v: v for v in labels}
    exact = {v: True for v in labels}

    def root(v: str) -> str:
        while parent[v] != v:
            v = parent[v]
        return v

    for a, b in ((a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]):
        sa, sb = series[a], series[b]
        if sa.keys() != sb.keys() or any(abs(sa[k] - sb[k]) > tolerance for k in sa):
            continue
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra
            exact[ra] = exact[ra] and exact[rb]
        exact[ra] = exact[ra] and all(sa[k] == sb[k] for k in sa)
    groups: dict[str, list[str]] = {}
    for v in labels:
        groups.setdefault(root(v), []).append(v)
    return [(g, exact[r]) for r, g in groups.items() if len(g) > 1]


@dataclass
class Parting:
    """One line as `parting` draws it: its labels (more than one when their lines coincide throughout), whether those
    are exactly equal, and where it is drawn from: `start`, the last x at which it still lies under the earlier line
    `under` (None: nothing beneath it, drawn from the first x)."""

    labels: list[str]
    exact: bool
    start: Any
    under: str | None

    @property
    def label(self) -> str:
        """The legend's label: the labels joined by " = " (exactly equal) or " ≈ " (closer than a line's width)."""
        return (" = " if self.exact else " ≈ ").join(self.labels)


def parting(wide: Any) -> list[Parting]:
    """Lines drawn so that none hides under another: `wide` holds one column per line (in drawing order) against x
    (its index, sorted). Columns that coincide everywhere (nowhere further apart than COINCIDE x the axis's span,
    linear, or log when the values span more than LOG_SPAN) become one line with a joint label; a later line that
    starts under an earlier one is drawn from the last x before it leaves it. Raises KvlibError on an empty frame."""
    if wide.empty:
        raise KvlibError("parting: no lines to draw")
    values = wide.to_numpy(dtype=float)
    finite = values[~(values != values)]  # NaN-free
    log = bool((finite > 0).all() and finite.max() / finite.min() > LOG_SPAN)
    scaled = wide.map(math.log) if log else wide
    tolerance = COINCIDE * (float(scaled.max().max()) - float(scaled.min().min()))
    apart = {
        (a, b): (scaled[a] - scaled[b]).abs().gt(tolerance).to_numpy()
        for i, a in enumerate(wide.columns)
        for b in wide.columns[:i]
    }
    out: list[Parting] = []
    for column in wide.columns:
        same = next((p for p in out if not apart[(column, p.labels[0])].any()), None)
        if same is not None:
            same.labels.append(column)
            same.exact = same.exact and bool((wide[column] == wide[same.labels[0]]).all())
            continue
        under, start = None, 0
        for p in out:
            first_apart = int(apart[(column, p.labels[0])].argmax())  # it lies under p before this row
            if first_apart > start:
                under, start = p.labels[0], first_apart
        out.append(Parting([column], True, wide.index[max(start - 1, 0)] if under else wide.index[0], under))
    return out


def mark_coinciding(ax: Any, data: Any, x: str, y: str, hue: str, by: Any = ()) -> list[tuple[list[str], bool]]:
    """Name, in `ax`'s legend, the lines that coincide (`coinciding`): "static [= paged (block 16)]" when the data
    are equal, "[≈ ...]" when they are closer than a line's width; the bracket does not change a label's colour.
    Returns the groups."""
    groups = coinciding(data, x, y, hue, by)
    legend = ax.get_legend()
    if legend is None:
        return groups
    for text in legend.get_texts():
        for group, exact in groups:
            if text.get_text() in group:
                others = ", ".join(v for v in group if v != text.get_text())
                text.set_text(f"{text.get_text()} [{'=' if exact else '≈'} {others}]")
    return groups


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


def extend_legend(ax: Any, handles: list[Any]) -> None:
    """Add labelled artists drawn after seaborn made `ax`'s legend (reference lines, floors) to that legend,
    keeping its entries and their texts (`mark_coinciding`'s brackets included)."""
    entries = _legend_entries(ax)
    ax.legend([h for h, _ in entries] + handles, [t for _, t in entries] + [h.get_label() for h in handles])


def legend_below(ax: Any, ncol: int = 1) -> None:
    """Move the legend under the panel, where it cannot hide data (in `ncol` columns)."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, title=None, ncol=ncol)


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
