"""What the study's notebooks share: parameter checks, where results go, summaries with spread, and the banner.

A notebook stays thin: its parameters cell holds literals, the next cell checks them with the functions here
(papermill's `-p batch_sizes "[1, 2]"` passes a *string*, so list parameters accept YAML text too), and every
result goes through an `Outputs`, which writes

    <out_dir>/data/<NN>_<name>.csv       tidy measurements, one row per measurement
    <out_dir>/data/<NN>_headline.csv     the notebook's headline numbers: metric, value, unit, spread
    <out_dir>/data/<NN>_meta.json        weights actually used, provenance, and the figures with their captions
    <out_dir>/figures/<NN>_<name>.png    figures

where NN is the notebook's number, so the report builder collects them without re-reading notebooks.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import yaml
from IPython import display as ipython  # looked up at each call: a test (or a host) may replace its display

from kvlib.core import checks, stats
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.provenance import provenance
from kvlib.measure.results import check_folder_writable, write_whole
from kvlib.models.loading import model_config  # noqa: F401  (the notebooks' `study.model_config`)
from kvlib.study import plotting

# transformers imports tqdm.auto, which in a notebook without ipywidgets warns on every import; the study's
# notebooks show no progress bars, so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # kvlib/study/__init__.py -> the project

# ---- parameters ----------------------------------------------------------------------------------------------


NULL_TEXTS = ("None",)  # Python's spelling; YAML's (null, Null, NULL, ~, empty) are read by yaml itself


def _parse(name: str, value: Any) -> Any:
    """A parameter's value; text (papermill's -p passes "[1, 2]", "null", ... as strings) is read as YAML, and
    YAML null and Python's None both become None, so `-p x null`, `-p x None` and `x: null` in a file agree."""
    if isinstance(value, str):
        if value.strip() in NULL_TEXTS:
            return None
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvlibError(f"parameter {name}: cannot read {value!r} (write a list as [1, 2, 4])") from None
    return value


def optional(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """None when `value` is null (None, or the text null, ~ or None), else `check(name, value, ...)`: for the
    parameters documented with None as a choice, e.g. `optional(int_list, "gqa_kv_heads", gqa_kv_heads)`."""
    value = _parse(name, value)
    return None if value is None else check(name, value, *args, **kwargs)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """A whole number >= minimum (bools are refused: True is not a batch size)."""
    return checks.whole(name, _parse(name, value), minimum, where="parameter")


def positive_number(name: str, value: Any) -> float:
    """A finite number > 0."""
    return checks.positive_number(name, _parse(name, value), where="parameter")


def int_list(name: str, value: Any, minimum: int = 1) -> list[int]:
    """A non-empty list of whole numbers >= minimum, sorted and without repeats; accepts "[1, 2]" and 4."""
    return sorted(set(checks.whole_list(name, _parse(name, value), minimum, where="parameter")))


def fraction_list(name: str, value: Any) -> list[float]:
    """A non-empty list of numbers from 0 to 1, sorted and without repeats; accepts "[0, 0.5]" and 0.5."""
    return sorted(set(checks.fraction_list(name, _parse(name, value), where="parameter")))


def str_list(name: str, value: Any, choices: Iterable[str] | None = None) -> list[str]:
    """A non-empty list of names (order kept, repeats dropped); accepts "[a, b]" and a single name."""
    return list(dict.fromkeys(checks.name_list(name, _parse(name, value), choices, where="parameter")))


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of `choices`."""
    return checks.one_of(name, _parse(name, value), choices, where="parameter")


def check_context(
    cfg: ModelConfig, prompt_len: int, max_new_tokens: int, what: str = "prompt_len + max_new_tokens"
) -> None:
    """Fail before any work when a run would not fit the model's context."""
    if prompt_len + max_new_tokens > cfg.n_positions:
        raise KvlibError(
            f"{what} = {prompt_len} + {max_new_tokens} exceeds the {cfg.name} context of {cfg.n_positions} positions"
        )


def require_sweep(name: str, values: Sequence[Any]) -> list[Any]:
    """`values` (already checked) unchanged, or a one-line KvlibError when they hold fewer than two distinct values:
    a sweep's trend ("from batch 1 to batch 8 ...") needs at least two points to compare."""
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise KvlibError(
            f"parameter {name} must hold at least two different values (a trend needs two points to compare), "
            f"got {list(values)!r}"
        )
    return list(values)


# ---- summaries ------------------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    """Three significant digits, thousands separated, no exponent from 1e-4 up: 0.0352, 18.7, 1,024."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{float(f'{value:.3g}'):g}" if value else "0"


# The columns of every <NN>_headline.csv: for reading (label, note) and typed fields the findings read (layout,
# condition, baseline), never parsing a label
HEADLINE_COLUMNS = ("notebook", "metric", "label", "value", "unit", "q25", "q75", "n", "headline", "note", "layout",
                    "condition", "baseline")  # fmt: skip
Spread = stats.Spread  # median and nearest-rank quartiles; the study's one rule for "different" is kvlib.core.stats
MIN_REPEATS = stats.MIN_REPEATS  # repeats a side below which no difference is claimed


def spread_caveat(beyond_spread: bool | None, what: str = "repeats", spread: str = "interquartile ranges") -> str:
    """What a sentence comparing measured values must add (kvlib.core.stats.caveat): '' when the difference is beyond
    the spread (Spread.separated / Spread.excludes gave True), else why it may be noise or cannot be judged."""
    return stats.caveat(beyond_spread, what, spread)


def summarise(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Median, nearest-rank quartiles (kvlib.core.stats.quartiles: measured values) and count of `value` per group of
    `by`: one row per group."""
    g = df.groupby(list(by), sort=True, dropna=False)[value]
    out = g.agg(median="median", q25=lambda s: stats.quartiles(s)[0], q75=lambda s: stats.quartiles(s)[1], n="count")
    return out.reset_index()


def paired_ratio(
    runs: pd.DataFrame,
    column: str,
    numerator: Mapping[str, Any],
    denominator: Mapping[str, Any],
    on: Sequence[str] = ("repeat",),
) -> pd.Series:
    """Per-repeat ratio of `column` between the rows matching `numerator` and those matching `denominator`
    (e.g. {"cache": "none"} over {"cache": "static"}), paired on `on`.

    The harness interleaves its specs (repeat r of A, then of B, ...), so the two runs of one repeat saw the same
    machine conditions; their ratio has less noise than a ratio of medians.
    """

    def pick(sel: Mapping[str, Any]) -> pd.Series:
        mask = pd.Series(True, index=runs.index)
        for k, v in sel.items():
            mask &= runs[k] == v
        return runs[mask].set_index(list(on))[column]

    ratio = (pick(numerator) / pick(denominator)).dropna()
    if ratio.empty:
        raise KvlibError(f"no repeats with both {dict(numerator)} and {dict(denominator)} to compare")
    return ratio


def condition(lm: Any) -> str:
    """'<model> <dtype> <device>': what every number of a page measured on `lm` (a LoadedModel) holds for."""
    return f"{lm.cfg.name} {lm.dtype_name} {lm.device}"


def path_label(engine: str, cache: str) -> str:
    """'kvlib naive (no cache)', 'hf static cache', ...: how figures and tables name a decoding path."""
    return f"{engine} naive (no cache)" if cache == "none" else f"{engine} {cache} cache"


def with_units(df: pd.DataFrame) -> pd.DataFrame:
    """The harness's rows plus a `path` label and the columns figures use, in ms and MiB."""
    df = df.assign(path=[path_label(e, c) for e, c in zip(df["engine"], df["cache"], strict=True)])
    for col in ("ttft_s", "tpot_p50_s", "latency_s", "total_time_s"):
        if col in df:
            df[col.removesuffix("_s") + "_ms"] = df[col] * 1e3
    for col in ("kv_cache_bytes", "peak_mem_delta_bytes", "peak_mem_bytes"):
        if col in df:
            df[col.removesuffix("_bytes") + "_mib"] = df[col] / 2**20
    return df


# ---- random-weights banner ------------------------------------------------------------------------------------


def model_line(lm: Any) -> str:
    """Markdown: the model a page measured, exactly: preset, the weights' provenance (a GGUF's package and
    quantization, a folder, or random with its seed), dtype and device."""
    return f"Model: **{lm.cfg.name}**; weights: {lm.weights}, {lm.source}; {lm.dtype_name} on {lm.device}."


def weights_banner(weights: Iterable[str] | str, source: str = "") -> str:
    """Markdown for a loud banner when any run used random weights; '' when every run was pretrained."""
    used = {weights} if isinstance(weights, str) else set(weights)
    if "random" not in used:
        return ""
    where = f" ({source})" if source else ""
    return (
        f"> **⚠ RANDOM WEIGHTS{where}.** Pretrained weights were not available, so the model has the real "
        "architecture with seeded random weights. Times and memory are those of the real model (they do not "
        "depend on weight values); the generated tokens are meaningless."
    )


# ---- outputs --------------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Where one notebook writes its CSVs, figures, headline numbers and metadata (see the module docstring)."""

    notebook: str  # "02_naive_vs_cached"
    out_dir: str | Path
    headline_rows: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = self.notebook.split("_", 1)[0]
        self._banner_shown = False  # the random-weights banner: shown once per page, by the first random model
        out_dir = self.out_dir  # a path is taken as written (not read as YAML), but null is not a folder
        nulls = ("", "~", "null", "Null", "NULL", "None")
        if not isinstance(out_dir, (str, Path)) or (isinstance(out_dir, str) and out_dir.strip() in nulls):
            raise KvlibError(f"parameter out_dir must be a folder (a path), got {self.out_dir!r}")
        # A relative out_dir is taken from the project folder, not the working directory, so that the default
        # lands in reports/ whether the notebook runs in JupyterLab (cwd notebooks/) or by papermill from the root.
        self.out_dir = PROJECT_ROOT / Path(out_dir).expanduser()
        self.data_dir = self.out_dir / "data"
        self.figures_dir = self.out_dir / "figures"
        self._check_out_dir()

    def _check_out_dir(self) -> None:
        """Before any model is loaded: out_dir (or its parent, for a new one) must exist and every folder the
        notebook writes must take files. A mistyped parent is an error, never created silently."""
        parent = self.out_dir.parent
        if not self.out_dir.is_dir() and not parent.is_dir():
            raise KvlibError(f"parameter out_dir: folder {parent} does not exist (it is not created for you)")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise KvlibError(f"parameter out_dir: {self.out_dir} is a file, not a folder")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.figures_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or e
            raise KvlibError(f"parameter out_dir: cannot create folders in {self.out_dir} ({why})") from None
        for folder in (self.data_dir, self.figures_dir):
            check_folder_writable(folder, "parameter out_dir")

    def _replace(self, path: Path, write: Any) -> None:
        """Write `path` whole through a temporary file of its own (kvlib.measure.results.write_whole)."""
        write_whole(path, write)

    def csv(self, df: pd.DataFrame, name: str) -> Path:
        """Save `df` as data/NN_<name>.csv (the notebook's result of this execution; replaced whole, atomically)."""
        path = self.data_dir / f"{self.prefix}_{name}.csv"
        self._replace(path, lambda tmp: df.to_csv(tmp, index=False))
        return path

    def figure(self, fig: Any, name: str, caption: str, key: bool = False) -> None:
        """Save `fig` as PNG, show it with its caption below, and list it for the report (`key`: on the index)."""
        plotting.tidy(fig)  # log scales where values span decades, legends outside the data, no text overlaps
        path = self.figures_dir / f"{self.prefix}_{name}.png"
        self._replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        title = fig._suptitle.get_text() if fig._suptitle is not None else (fig.axes[0].get_title() if fig.axes else "")
        self.figures = [f for f in self.figures if f["file"] != path.name]
        self.figures.append({"file": path.name, "title": title, "caption": caption, "key": key})
        ipython.display(fig)
        plt.close(fig)
        ipython.display(ipython.Markdown(f"*{caption}*"))
        self.save()

    def headline(
        self,
        metric: str,
        label: str,
        value: float,
        unit: str,
        spread: Spread | None = None,
        headline: bool = False,
        note: str = "",
        layout: str = "",
        condition: str = "",
        baseline: str = "",
    ) -> None:
        """One number for the report; `headline` puts it in the index's headline table. `label` and `note` are for
        reading; the report's findings read the typed fields instead: `layout` (the cache layout measured),
        `condition` (model, dtype, sizes: what the number holds for) and `baseline` (what it is compared with)."""
        self.headline_rows = [r for r in self.headline_rows if r["metric"] != metric]
        self.headline_rows.append(
            {
                "notebook": self.notebook,
                "metric": metric,
                "label": label,
                "value": value,
                "unit": unit,
                "q25": spread.q25 if spread else math.nan,
                "q75": spread.q75 if spread else math.nan,
                "n": spread.n if spread else 1,
                "headline": headline,
                "note": note,
                "layout": layout,
                "condition": condition,
                "baseline": baseline,
            }
        )
        self.save()

    def loaded(self, lm: Any) -> None:
        """Record the model a notebook measured (weights actually used, provenance); show the banner if its weights
        are random (once per page). A variant built with random weights on purpose (07's other key/value-head
        counts) is not passed here: it is labelled where it appears, and the page's model keeps its weights."""
        self.describe(
            model=lm.cfg.name,
            weights=sorted({*self.meta.get("weights", []), lm.weights}),
            weights_source=lm.source,
            weights_warning=lm.warning or "",
            device=str(lm.device),
            dtype=lm.dtype_name,
            provenance=provenance(lm.device, lm.dtype_name),
        )
        banner = weights_banner(lm.weights, lm.source)
        if banner and not self._banner_shown:  # once per notebook page, however many models it loads
            self._banner_shown = True
            ipython.display(ipython.Markdown(banner))
        ipython.display(ipython.Markdown(model_line(lm)))

    def also_loaded(self, lm: Any) -> None:
        """Record a further model the page measured beside its own (meta's more_models: model, weights, source) and
        show its provenance line; the page's model (loaded) stays the one its headlines are about."""
        more = [*self.meta.get("more_models", []), {"model": lm.cfg.name, "weights": lm.weights, "source": lm.source}]
        self.describe(more_models=more)
        ipython.display(ipython.Markdown(model_line(lm)))

    def describe(self, **info: Any) -> None:
        """Record facts about the runs: weights actually used, model, device, provenance, ..."""
        self.meta.update(info)
        self.save()

    def save(self) -> None:
        headline = pd.DataFrame(self.headline_rows, columns=list(HEADLINE_COLUMNS))
        self._replace(self.data_dir / f"{self.prefix}_headline.csv", lambda tmp: headline.to_csv(tmp, index=False))
        meta = {"notebook": self.notebook, **self.meta, "figures": self.figures}
        text = json.dumps(meta, indent=1, default=str) + "\n"
        self._replace(self.data_dir / f"{self.prefix}_meta.json", lambda tmp: tmp.write_text(text))
