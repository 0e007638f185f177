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

import pandas as pd
import yaml

from kvlib.config import KvlibError, ModelConfig

# transformers imports tqdm.auto, which in a notebook without ipywidgets warns on every import; the study's
# notebooks show no progress bars, so the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# ---- parameters ----------------------------------------------------------------------------------------------


def _parse(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvlibError(f"parameter {name}: cannot read {value!r} (write a list as [1, 2, 4])") from None
    return value


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """A whole number >= minimum (bools are refused: True is not a batch size)."""
    value = _parse(name, value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KvlibError(f"parameter {name} must be a whole number >= {minimum}, got {value!r}")
    return value


def positive_number(name: str, value: Any) -> float:
    value = _parse(name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise KvlibError(f"parameter {name} must be a positive number, got {value!r}")
    return float(value)


def int_list(name: str, value: Any, minimum: int = 1) -> list[int]:
    """A non-empty list of whole numbers >= minimum, sorted and without repeats; accepts "[1, 2]" and 4."""
    value = _parse(name, value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise KvlibError(f"parameter {name} must be a non-empty list of whole numbers, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise KvlibError(f"parameter {name} must hold whole numbers >= {minimum}, got {value!r}")
    return sorted(set(value))


def fraction_list(name: str, value: Any) -> list[float]:
    """A non-empty list of numbers from 0 to 1, sorted and without repeats; accepts "[0, 0.5]" and 0.5."""
    value = _parse(name, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise KvlibError(f"parameter {name} must be a non-empty list of numbers from 0 to 1, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise KvlibError(f"parameter {name} must hold numbers from 0 to 1, got {value!r}")
    return sorted({float(v) for v in value})


def str_list(name: str, value: Any, choices: Iterable[str] | None = None) -> list[str]:
    """A non-empty list of names (order kept); accepts "[a, b]" and a single name."""
    value = _parse(name, value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise KvlibError(f"parameter {name} must be a non-empty list of names, got {value!r}")
    if choices is not None:
        allowed = list(choices)
        bad = [v for v in value if v not in allowed]
        if bad:
            raise KvlibError(f"parameter {name}: unknown {bad}; choose from {allowed}")
    return list(dict.fromkeys(value))


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    allowed = list(choices)
    if value not in allowed:
        raise KvlibError(f"parameter {name} must be one of {allowed}, got {value!r}")
    return value


def check_context(
    cfg: ModelConfig, prompt_len: int, max_new_tokens: int, what: str = "prompt_len + max_new_tokens"
) -> None:
    """Fail before any work when a run would not fit the model's context."""
    if prompt_len + max_new_tokens > cfg.n_positions:
        raise KvlibError(
            f"{what} = {prompt_len} + {max_new_tokens} exceeds the {cfg.name} context of {cfg.n_positions} positions"
        )


def model_config(model: str) -> ModelConfig:
    """The shapes of a preset or of a local folder saved by save_pretrained, without loading any weights."""
    from kvlib.config import config_from_hf, get_preset

    path = Path(model)
    if path.is_dir() and (path / "config.json").exists():
        from transformers import AutoConfig

        return config_from_hf(AutoConfig.from_pretrained(path), name=path.name)
    return get_preset(model)


# ---- summaries ------------------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    """Three significant digits, thousands separated, no exponent from 1e-4 up: 0.0352, 18.7, 1,024."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{float(f'{value:.3g}'):g}" if value else "0"


@dataclass(frozen=True)
class Spread:
    """A median with its interquartile range (25th to 75th percentile) over n values."""

    median: float
    q25: float
    q75: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        s = pd.Series(list(values), dtype="float64").dropna()
        if s.empty:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(float(s.median()), float(s.quantile(0.25)), float(s.quantile(0.75)), len(s))

    def scaled(self, factor: float) -> Spread:
        """The same spread in another unit (x100 for a fraction as a percentage)."""
        return Spread(self.median * factor, self.q25 * factor, self.q75 * factor, self.n)

    def text(self, fmt: str = ".3g", unit: str = "") -> str:
        """'12.3 ms (IQR 11.9–12.8, n=3)'."""
        u = f" {unit}" if unit else ""
        return f"{self.median:{fmt}}{u} (IQR {self.q25:{fmt}}–{self.q75:{fmt}}, n={self.n})"


def summarise(df: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Median, 25th and 75th percentile and count of `value` per group of `by`: one row per group."""
    g = df.groupby(list(by), sort=True, dropna=False)[value]
    out = g.agg(median="median", q25=lambda s: s.quantile(0.25), q75=lambda s: s.quantile(0.75), n="count")
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
        # A relative out_dir is taken from the project folder, not the working directory, so that the default
        # lands in reports/ whether the notebook runs in JupyterLab (cwd notebooks/) or by papermill from the root.
        self.out_dir = PROJECT_ROOT / Path(self.out_dir).expanduser()
        self.data_dir = self.out_dir / "data"
        self.figures_dir = self.out_dir / "figures"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.figures_dir.mkdir(parents=True, exist_ok=True)

    def csv(self, df: pd.DataFrame, name: str) -> Path:
        path = self.data_dir / f"{self.prefix}_{name}.csv"
        df.to_csv(path, index=False)
        return path

    def figure(self, fig: Any, name: str, caption: str, key: bool = False) -> None:
        """Save `fig` as PNG, show it with its caption below, and list it for the report (`key`: on the index)."""
        import matplotlib.pyplot as plt
        from IPython.display import Markdown, display

        path = self.figures_dir / f"{self.prefix}_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        title = fig._suptitle.get_text() if fig._suptitle is not None else (fig.axes[0].get_title() if fig.axes else "")
        self.figures = [f for f in self.figures if f["file"] != path.name]
        self.figures.append({"file": path.name, "title": title, "caption": caption, "key": key})
        display(fig)
        plt.close(fig)
        display(Markdown(f"*{caption}*"))
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
    ) -> None:
        """One number for the report; `headline` puts it in the index's headline table."""
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
            }
        )
        self.save()

    def loaded(self, lm: Any) -> None:
        """Record the model a notebook measured (weights actually used, provenance); show the banner if random."""
        from IPython.display import Markdown, display

        from kvlib.provenance import provenance

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
        if banner:
            display(Markdown(banner))

    def describe(self, **info: Any) -> None:
        """Record facts about the runs: weights actually used, model, device, provenance, ..."""
        self.meta.update(info)
        self.save()

    def save(self) -> None:
        columns = ["notebook", "metric", "label", "value", "unit", "q25", "q75", "n", "headline", "note"]
        pd.DataFrame(self.headline_rows, columns=columns).to_csv(
            self.data_dir / f"{self.prefix}_headline.csv", index=False
        )
        meta = {"notebook": self.notebook, **self.meta, "figures": self.figures}
        (self.data_dir / f"{self.prefix}_meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
