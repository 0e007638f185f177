"""Notebook 04's page: what the cache costs in memory. The bytes kvlib's caches hold against the formula, one
generation's peak split into weights, cache and the rest, Gemma 3's hybrid sliding/global cache against a full one
(computed and measured: kvlib.study.memory_windows), the KV bytes of published architectures with and without their
windows (the windowed ones: kvlib.study.memory_windows), and the longest context a memory budget leaves room for. The
computations are kvlib.study.costs'; here they become the page's tables, figures, sentences and headline rows.

The concept: every layer keeps a key and a value per token per key/value head, so the cache grows with
batch x length (on a sliding-window layer, only up to the window) while the weights stay fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import seaborn as sns

from kvlib import study
from kvlib.caches.base import REFERENCE
from kvlib.core.config import ModelConfig
from kvlib.measure.memory import bytes_per_element
from kvlib.models.loading import LoadedModel
from kvlib.study import costs, plotting

MIB, GIB = 2**20, 2**30

# ---- parameters -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 04's own parameters, checked (lists sorted, without repeats), and the two models' configurations."""

    batch_sizes: list[int]  # caches measured at every batch size ...
    seq_lens: list[int]  # ... and every length (tokens per sequence)
    layouts: list[str]  # kvlib cache layouts to measure
    breakdown_new_tokens: int  # tokens of the one generation whose peak memory is split
    budget_gib: float  # memory budget (GiB) for the longest context that fits ...
    budget_batch_sizes: list[int]  # ... at these batch sizes
    hybrid_weights: str  # pretrained, random or auto, for the hybrid model
    hybrid_measured_lens: list[int]  # prefill lengths of the hybrid model's real caches (batch 1)
    hybrid_max_tokens: int  # the computed hybrid curve runs up to this many tokens
    hybrid_ratio_at: list[int]  # the hybrid cache against a full one, reported at these lengths
    window_context: int  # published architectures: windowed vs full cache at this context (tokens)
    cfg: ModelConfig  # the configuration of the notebook's `model`
    hybrid_cfg: ModelConfig  # the configuration of `hybrid_model` (it has sliding-window layers)


def check_parameters(
    model: str,
    batch_sizes: Any,
    seq_lens: Any,
    layouts: Any,
    breakdown_new_tokens: Any,
    budget_gib: Any,
    budget_batch_sizes: Any,
    hybrid_model: str,
    hybrid_weights: Any,
    hybrid_measured_lens: Any,
    hybrid_max_tokens: Any,
    hybrid_ratio_at: Any,
    window_context: Any,
) -> Parameters:
    """The notebook's parameters checked (papermill's text included) before any model is loaded; a one-line
    KvlibError naming the first bad one: a bad value, a hybrid model without sliding-window layers, or a length
    that does not fit a model's context."""
    batch_sizes = study.int_list("batch_sizes", batch_sizes)
    seq_lens = study.int_list("seq_lens", seq_lens)
    budget_batch_sizes = study.int_list("budget_batch_sizes", budget_batch_sizes)
    breakdown_new_tokens = study.positive_int("breakdown_new_tokens", breakdown_new_tokens)
    budget_gib = study.positive_number("budget_gib", budget_gib)
    layouts = study.str_list("layouts", layouts, choices=["dynamic", "static"])
    hybrid_measured_lens = study.int_list("hybrid_measured_lens", hybrid_measured_lens)
    hybrid_ratio_at = study.int_list("hybrid_ratio_at", hybrid_ratio_at)
    hybrid_max_tokens = study.positive_int("hybrid_max_tokens", hybrid_max_tokens)
    window_context = study.positive_int("window_context", window_context)
    hybrid_weights = study.choice("hybrid_weights", hybrid_weights, ["pretrained", "random", "auto"])
    hcfg = costs.require_sliding_layers(study.model_config(hybrid_model))
    for name, value in (
        ("hybrid_measured_lens", max(hybrid_measured_lens)),
        ("hybrid_ratio_at", max(hybrid_ratio_at)),
        ("hybrid_max_tokens", hybrid_max_tokens),
    ):
        study.check_context(hcfg, value, 0, f"max({name}) (with 0 new tokens)")
    cfg = study.model_config(model)
    study.check_context(cfg, max(seq_lens), breakdown_new_tokens, "max(seq_lens) + breakdown_new_tokens")
    return Parameters(
        batch_sizes, seq_lens, layouts, breakdown_new_tokens, budget_gib, budget_batch_sizes, hybrid_weights,
        hybrid_measured_lens, hybrid_max_tokens, hybrid_ratio_at, window_context, cfg, hcfg,
    )  # fmt: skip


# ---- measured against the formula ----------------------------------------------------------------------------

CACHE_BYTES_CAPTION = (
    "Measured once per configuration (byte counts do not vary between runs, so there are no error bars); grey "
    "crosses: the formula. Left: one line per layout and batch size (the batch size written at the line's end), in "
    "the layout's colour and dashes; a layout that holds the same bytes as another is named in the legend "
    "([= ...]) and drawn over it with other dashes and markers. Right: one bar per layout, over every batch size."
)


def cache_bytes_figure(measured: pd.DataFrame, model: str, dtype_name: str) -> Any:
    """Two panels from `costs.measured_cache_bytes` rows: MiB held against tokens per sequence (one line per layout
    and batch size, in the layout's colour and dashes, the batch size written at the line's end, the formula as grey
    crosses; layouts with equal bytes named in the legend), and held / formula bytes per length and layout. The
    Figure."""
    fig, axes = plotting.figure(ncols=2, title=f"KV cache: held bytes vs the formula, {model} {dtype_name}")
    palette, order = plotting.colors(measured["layout"].unique())
    markers, dashes = plotting.line_styles(order)  # each layout's own, as in every figure
    first = measured["batch_size"].min()
    for i, layout in enumerate(order):  # the first drawn widest: a line drawn over it leaves its colour visible
        width = 1.6 + 2.4 * (len(order) - 1 - i) / max(len(order) - 1, 1)
        style = (0, dashes[layout]) if dashes[layout] else "-"
        for b, rows in measured[measured["layout"] == layout].sort_values("tokens").groupby("batch_size"):
            axes[0].plot(
                rows["tokens"],
                rows["held_mib"],
                color=palette[layout],
                linewidth=width,
                linestyle=style,
                marker=markers[layout],
                markersize=4 + 2 * width,
                label=layout if b == first else None,
            )
    axes[0].scatter(measured["tokens"], measured["formula_mib"], marker="x", color=plotting.NEUTRAL, zorder=3,
                    label="formula")  # fmt: skip
    last = measured[measured["tokens"] == measured["tokens"].max()].groupby("batch_size")["held_mib"].max()
    for batch, mib in last.items():
        axes[0].annotate(f"batch {batch}", (measured["tokens"].max(), mib), xytext=(8, 0), textcoords="offset points",
                         va="center", fontsize=9)  # fmt: skip
    axes[0].legend()
    plotting.mark_coinciding(axes[0], measured, "tokens", "held_mib", "layout", by=["batch_size"])
    plotting.label(axes[0], "Cache size against length", "tokens per sequence (count)", "KV cache held (MiB)")
    plotting.bars(measured, "tokens", "held_over_formula", "layout", axes[1], legend=True)
    plotting.label(axes[1], "Held / formula", "tokens per sequence (count)", "held bytes / formula bytes (ratio)")
    return fig


def per_token_bytes(measured: pd.DataFrame) -> float:
    """Bytes one token of one sequence costs (measured): the median over `costs.measured_cache_bytes` rows of held
    bytes / (batch x tokens)."""
    return (measured["held_bytes"] / (measured["batch_size"] * measured["tokens"])).median()


def cache_bytes_headline(measured: pd.DataFrame, lm: LoadedModel) -> dict[str, Any]:
    """The headline row (keyword arguments of `Outputs.headline`): the KV cache per token, in MiB, measured."""
    per_token = per_token_bytes(measured)
    return dict(
        metric="kv_mib_per_token",
        label=f"KV cache per token ({lm.cfg.name}, {lm.dtype_name})",
        value=per_token / MIB,
        unit="MiB",
        headline=True,
        note=f"measured; {per_token / 1024:.1f} KiB per token per sequence",
        condition=f"{lm.cfg.name}, {lm.dtype_name}",
    )


def cache_bytes_sentence(measured: pd.DataFrame, lm: LoadedModel) -> str:
    """Markdown: in how many configurations the bytes held equal the formula (else the largest ratio), one token's
    bytes against the formula's terms, and the largest cache measured."""
    exact = int((measured["held_bytes"] == measured["formula_bytes"]).sum())
    per_token = per_token_bytes(measured)
    bpe = bytes_per_element(lm.dtype)
    return (
        f"In **{exact} of {len(measured)}** configurations the bytes held equal the formula exactly"
        + ("." if exact == len(measured) else f"; the largest ratio is {measured['held_over_formula'].max():.3f}.")
        + f" One token of one sequence costs **{per_token / 1024:.1f} KiB** "
        f"({per_token / MIB:.4f} MiB; formula: 2 x {lm.cfg.n_layer} layers x {lm.cfg.n_kv_head} kv heads x "
        f"{lm.cfg.head_dim} x {bpe} bytes = {lm.cfg.kv_bytes_per_token(bpe):,} bytes). "
        f"The largest cache measured, batch {measured['batch_size'].max()} x {measured['tokens'].max()} tokens, holds "
        f"{study.fmt(measured['held_mib'].max())} MiB."
    )


# ---- weights, cache and the rest ------------------------------------------------------------------------------


def breakdown_layout(layouts: list[str]) -> str:
    """The layout whose generation is split into weights, cache and the rest: the reference layout when measured,
    else the first one."""
    return REFERENCE if REFERENCE in layouts else layouts[0]


def breakdown_figure(breakdown: pd.DataFrame) -> Any:
    """One bar per component of `costs.memory_breakdown` rows (MiB): the KV cache in its layout's colour (its label
    names the layout), the other parts in shades of grey (none of the palette's things). The Figure."""
    batch, prompt = breakdown["batch_size"].iloc[0], breakdown["prompt_len"].iloc[0]
    layout = breakdown["layout"].iloc[0]
    fig, ax = plotting.figure(width=6, title=f"Peak memory of one generation, batch {batch}, prompt {prompt}")
    parts = [
        f"KV cache\n({layout})" if c == "KV cache" else c.replace(" weight ", "\nweight ")
        for c in breakdown["component"]
    ]
    palette = plotting.palette([p for p in parts if not p.startswith("KV cache")])  # NEUTRAL, in lighter shades
    palette |= {p: plotting.color(layout) for p in parts if p.startswith("KV cache")}
    sns.barplot(data=breakdown.assign(component=parts), x="component", y="mib", hue="component", palette=palette,
                order=parts, legend=False, saturation=1, ax=ax)  # fmt: skip
    plotting.label(ax, "", "part of peak memory (component)", "memory (MiB)")
    return fig


def breakdown_caption(breakdown: pd.DataFrame) -> str:
    """The breakdown figure's caption: how the peak was measured (RSS on CPU, torch's allocation on CUDA)."""
    return (
        f"One run, peak measured as {breakdown['peak_kind'].iloc[0]}; no error bars (one run). The KV cache in its "
        "layout's colour, the other parts grey."
    )


def crossover_tokens(lm: LoadedModel, per_token: float) -> float:
    """Tokens (batch x length) at which the cache holds as many bytes as the weights: weight bytes / bytes per
    token."""
    return lm.model.weight_bytes() / per_token


def breakdown_headlines(lm: LoadedModel, per_token: float) -> list[dict[str, Any]]:
    """Headline rows (keyword arguments of `Outputs.headline`): the weights in MiB, and the tokens (batch x length)
    at which the cache outweighs them (`crossover_tokens`)."""
    return [
        dict(metric="weights_mib", label=f"Weights ({lm.cfg.name}, {lm.dtype_name})",
             value=lm.model.weight_bytes() / MIB, unit="MiB"),
        dict(metric="cache_equals_weights_tokens", label="Tokens (batch x length) at which the cache outweighs the "
             "weights", value=crossover_tokens(lm, per_token), unit="tokens"),
    ]  # fmt: skip


def breakdown_sentence(breakdown: pd.DataFrame, lm: LoadedModel, per_token: float) -> str:
    """Markdown: weights, cache (and its share of the peak), the fast path's packed copy when there is one, the
    rest (said to be unmeasured when the parts exceed the peak), and the tokens at which the cache outweighs the
    weights."""
    parts = breakdown.set_index("component")["bytes"]
    crossover = crossover_tokens(lm, per_token)
    peak_bytes = breakdown["peak_bytes"].iloc[0]
    parts_bytes = parts["weights"] + parts["packed weight copy"] + parts["KV cache"]
    return (
        f"Weights: **{study.fmt(parts['weights'] / MIB)} MiB**; KV cache: **{study.fmt(parts['KV cache'] / MIB)} MiB** "
        f"({parts['KV cache'] / peak_bytes:.2%} of the peak); "
        + (
            f"kvlib's CPU fast path also holds a packed copy of the weights for its kernels: "
            f"{study.fmt(parts['packed weight copy'] / MIB)} MiB; "
            if parts["packed weight copy"]
            else ""
        )
        + "the rest: "
        f"{study.fmt(parts['rest'] / MIB)} MiB"
        + (
            f" (weights, cache and packed copy add up to more than the measured peak of "
            f"{study.fmt(peak_bytes / MIB)} MiB, so the peak missed part of what the run held and the rest is shown "
            "as 0, not measured)"
            if parts_bytes > peak_bytes
            else ""
        )
        + ". The cache grows with batch x length and the weights do not: "
        f"the cache outweighs the weights once batch x length exceeds **{crossover:,.0f} tokens** "
        f"(e.g. batch {max(1, math.ceil(crossover / lm.cfg.n_positions))} at the full "
        f"{lm.cfg.n_positions}-token context)."
    )


# ---- larger models: KV bytes per token ------------------------------------------------------------------------

ARCHITECTURES_CAPTION = (
    "Computed from published configs (2 bytes per element), not measured; no error bars. Coloured: the models this "
    "study runs, in their colour in every figure; grey: architectures it does not run. The family follows each name."
)
# the columns of the table the page shows
ARCHITECTURE_COLUMNS = ["architecture", "n_layer", "n_head", "n_kv_head", "head_dim", "kv_kib_per_token",
                        "kv_gib_full_context"]  # fmt: skip


def architectures() -> pd.DataFrame:
    """`costs.kv_bytes_table` in 16-bit (2 bytes per element), one row per published architecture, plus
    `kv_kib_per_token` (KiB)."""
    arch = costs.kv_bytes_table(bytes_per_element=2)
    arch["kv_kib_per_token"] = arch["kv_bytes_per_token"] / 1024
    return arch


def architectures_figure(arch: pd.DataFrame) -> Any:
    """One bar per architecture of `architectures()`: KiB per token (log scale: the values span decades and no shape
    is read from them), named with its family; a model preset the study runs in its model colour
    (plotting.colour_of), the others grey. The Figure."""
    fig, ax = plotting.figure(width=9, height=5, title="KV cache per token, 16-bit, computed from published configs")
    named = arch.assign(name=arch["architecture"] + "  ·  " + arch["family"])
    palette = {r.name: plotting.colour_of("model", r.architecture) for r in named.itertuples()}
    sns.barplot(data=named, y="name", x="kv_kib_per_token", hue="name", palette=palette, legend=False, saturation=1,
                ax=ax)  # fmt: skip
    plotting.log_axis(ax, "x")
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=9)
    plotting.label(ax, "", "KV cache per token per sequence (KiB, log scale)", "architecture  ·  family (name)")
    return fig


def architectures_sentence(arch: pd.DataFrame, lm: LoadedModel, per_token: float) -> str:
    """Markdown: Llama-2-7B's KiB per token against Llama-3-8B's (what grouped-query attention saves), and the
    measured model's per token (measured, and in 16-bit)."""
    llama2, llama3 = (arch.set_index("architecture").loc[n, "kv_kib_per_token"] for n in ("Llama-2-7B", "Llama-3-8B"))
    bpe = bytes_per_element(lm.dtype)
    return (
        f"Llama-2-7B stores {llama2:,.0f} KiB per token, Llama-3-8B {llama3:,.0f} KiB: grouped-query attention "
        f"(8 key/value heads for 32 query heads) makes its cache {llama2 / llama3:.0f}x smaller. "
        f"{lm.cfg.name} stores {per_token / 1024:,.1f} KiB per token in {lm.dtype_name} "
        f"({lm.cfg.kv_bytes_per_token(bpe) * 2 / bpe / 1024:,.1f} KiB in 16-bit)."
    )


# ---- the longest context that fits ----------------------------------------------------------------------------


def context_fits(
    lm: LoadedModel, budget_gib: float, batch_sizes: list[int], per_token: float, arch: pd.DataFrame
) -> pd.DataFrame:
    """`costs.context_budget` in `budget_gib` GiB at each batch size: the measured model (its weights, `per_token`
    bytes measured, its context) and every published architecture of `arch` with a parameter count."""
    return costs.context_budget(
        budget_gib * GIB,
        batch_sizes,
        lm.cfg.name,
        lm.model.weight_bytes(),
        per_token,
        lm.cfg.n_positions,
        architectures=arch,
    )


def _mine(fits: pd.DataFrame) -> pd.DataFrame:
    """The measured model's rows of `costs.context_budget`, indexed by batch size."""
    return fits[fits["measured"]].set_index("batch_size")


def budget_headline(fits: pd.DataFrame, lm: LoadedModel, budget_gib: float) -> dict[str, Any]:
    """The headline row (keyword arguments of `Outputs.headline`): the longest context the memory allows the
    measured model at the smallest batch size (tokens)."""
    mine = _mine(fits)
    b0 = mine.index.min()
    return dict(
        metric="max_context_budget",
        label=f"Longest context in {budget_gib:g} GiB, batch {b0}, memory only",
        value=mine.loc[b0, "max_tokens_memory"],
        unit="tokens",
        note=f"{lm.cfg.name} {lm.dtype_name}, measured; its context limit is {lm.cfg.n_positions}",
    )


def budget_table(fits: pd.DataFrame, dtype_name: str) -> pd.DataFrame:
    """Tokens per sequence the memory allows, one row per model (measured in `dtype_name` or computed in 16-bit),
    one column per batch size."""
    suffix = fits["measured"].map({True: f" ({dtype_name}, measured)", False: " (16-bit, computed)"})
    return fits.assign(model=fits["model"] + suffix).pivot(index="model", columns="batch_size",
                                                           values="max_tokens_memory")  # fmt: skip


def budget_sentence(fits: pd.DataFrame, lm: LoadedModel, budget_gib: float) -> str:
    """Markdown: the measured model's room in the budget at the smallest and largest batch size, whether memory or
    its context limits it, and what Llama-3-8B's 16-bit weights leave (or that they do not fit)."""
    mine = _mine(fits)
    b0, b1 = mine.index.min(), mine.index.max()
    big = fits[(fits["model"] == "Llama-3-8B") & (fits["batch_size"] == b0)].iloc[0]
    big_fit = big["max_tokens_memory"]
    budget_bytes = budget_gib * GIB
    return (
        f"In {budget_gib:g} GiB, after its {study.fmt(lm.model.weight_bytes() / MIB)} MiB of weights, {lm.cfg.name} "
        f"has room for **{mine.loc[b0, 'max_tokens_memory']:,} tokens** of cache at batch {b0}"
        + (f" and {mine.loc[b1, 'max_tokens_memory']:,} per sequence at batch {b1}; " if b1 != b0 else "; ")
        + f"its context is {lm.cfg.n_positions} tokens, so at batch {b0} the limit is: "
        f"**{mine.loc[b0, 'limited_by']}**. "
        + (
            f"For {big['model']} in 16-bit the weights alone take {big['weight_bytes'] / GIB:.1f} GiB "
            f"({big['weight_bytes'] / budget_bytes:.0%} of the budget), leaving room for "
            f"{big_fit:,} tokens of cache at batch {b0}: the cache, not the weights, decides how long and how many "
            "conversations fit (table above: tokens per sequence)."
            if big_fit > 0
            else f"{big['model']} does not fit in {budget_gib:g} GiB in 16-bit: its weights alone take "
            f"{big['weight_bytes'] / GIB:.1f} GiB."
        )
    )
