"""Notebook 07's page: every cache layout side by side, and the paged cache (part 1 of 2).

This module holds the page's parameters (checked before anything runs), the one table of every layout on the same
prompts (its view, its figure, the best saving at equal tokens, the sentence on exactness and speed) and the paged
cache's section (reserved-but-unused memory on mixed batches, and its decode step). Part 2, the layouts that store
less (quantized codes, fewer key/value heads, a sliding window, a shared prefix), is
kvlib.study.strategies.page_savings. The measurements themselves are the other modules of kvlib.study.strategies;
the functions here turn their tidy frames into what the page shows: figures, markdown sentences and headline rows
(keyword arguments of kvlib.study.Outputs.headline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kvlib import study
from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE, layout_class
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.study import plotting
from kvlib.study.strategies.comparison import best_saving_at_equal_tokens
from kvlib.study.strategies.gqa import check_kv_heads

KIB, MIB = 2**10, 2**20
HeadlineRow = dict[str, Any]  # the keyword arguments of kvlib.study.Outputs.headline: out.headline(**row)

# ---- parameters ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 07's own parameters, checked (see check_parameters), and the model's config they were checked
    against. Sizes are token counts, `spreads` fractions from 0 to 1, `memory_layouts` registered layout names."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    repeats: int
    warmup: int
    block_size: int
    sink: int
    window: int
    mixed_batch_size: int
    mixed_max_prompt_len: int
    mixed_max_new_tokens: int
    lengths: list[int]
    memory_prompt_len: int
    memory_layouts: list[str]
    gqa_kv_heads: list[int] | None
    prefix_batch_size: int
    prefix_len: int
    suffix_len: int
    prefix_new_tokens: int
    spreads: list[float]
    cfg: ModelConfig


def check_parameters(
    model: str,
    *,
    batch_size: Any,
    prompt_len: Any,
    new_tokens: Any,
    repeats: Any,
    warmup: Any,
    block_size: Any,
    sink: Any,
    window: Any,
    mixed_batch_size: Any,
    mixed_max_prompt_len: Any,
    mixed_max_new_tokens: Any,
    lengths: Any,
    memory_prompt_len: Any,
    memory_layouts: Any,
    gqa_kv_heads: Any,
    prefix_batch_size: Any,
    prefix_len: Any,
    suffix_len: Any,
    prefix_new_tokens: Any,
    spreads: Any,
) -> Parameters:
    """The notebook's parameters, checked before any model is loaded or any folder made: each value as the
    parameters cell or papermill gives it (text such as "[28, 48]" or "null" is read as YAML), checked by
    kvlib.study's rules, and every run fitted to `model`'s context (its config only, no weights). Raises one
    KvlibError naming the first bad parameter; `lengths` must hold two different values (the memory sentence says
    "from length a to b"), each above `memory_prompt_len`."""
    batch_size = study.positive_int("batch_size", batch_size)
    prompt_len = study.positive_int("prompt_len", prompt_len)
    new_tokens = study.positive_int("new_tokens", new_tokens)
    repeats = study.positive_int("repeats", repeats)
    warmup = study.positive_int("warmup", warmup, minimum=0)
    block_size = study.positive_int("block_size", block_size)
    sink = study.positive_int("sink", sink, minimum=0)
    window = study.positive_int("window", window)
    mixed_batch_size = study.positive_int("mixed_batch_size", mixed_batch_size)
    mixed_max_prompt_len = study.positive_int("mixed_max_prompt_len", mixed_max_prompt_len)
    mixed_max_new_tokens = study.positive_int("mixed_max_new_tokens", mixed_max_new_tokens)
    lengths = study.int_list("lengths", lengths)
    study.require_sweep("lengths", lengths)  # memory "from length a to b": two lengths
    memory_prompt_len = study.positive_int("memory_prompt_len", memory_prompt_len)
    memory_layouts = study.str_list("memory_layouts", memory_layouts, list(CACHE_LAYOUTS))
    gqa_kv_heads = study.optional(study.int_list, "gqa_kv_heads", gqa_kv_heads)  # None, null or ~: the default
    prefix_batch_size = study.positive_int("prefix_batch_size", prefix_batch_size)
    prefix_len = study.positive_int("prefix_len", prefix_len)
    suffix_len = study.positive_int("suffix_len", suffix_len)
    prefix_new_tokens = study.positive_int("prefix_new_tokens", prefix_new_tokens)
    spreads = study.fraction_list("spreads", spreads)
    cfg = study.model_config(model)
    check_kv_heads(cfg.n_head, gqa_kv_heads, "gqa_kv_heads", "parameter")
    study.check_context(cfg, prompt_len, new_tokens, "prompt_len + new_tokens")
    study.check_context(cfg, mixed_max_prompt_len, mixed_max_new_tokens, "mixed_max_prompt_len + mixed_max_new_tokens")
    study.check_context(cfg, max(lengths), 0, "max(lengths)")
    study.check_context(cfg, prefix_len + suffix_len, prefix_new_tokens, "prefix_len + suffix_len + prefix_new_tokens")
    if min(lengths) <= memory_prompt_len:
        raise KvlibError(f"every length must exceed memory_prompt_len ({memory_prompt_len}), got {lengths}")
    return Parameters(
        batch_size, prompt_len, new_tokens, repeats, warmup, block_size, sink, window, mixed_batch_size,
        mixed_max_prompt_len, mixed_max_new_tokens, lengths, memory_prompt_len, memory_layouts, gqa_kv_heads,
        prefix_batch_size, prefix_len, suffix_len, prefix_new_tokens, spreads, cfg,
    )  # fmt: skip


def spread_of(row: pd.Series, column: str) -> study.Spread:
    """The spread over repeats of a timing `column` ("tpot_ms", "ttft_ms") of one row of a strategies table: its
    median and the <column>_min / _max columns, over the row's `repeats`."""
    return study.Spread(row[column], row[f"{column}_min"], row[f"{column}_max"], int(row["repeats"]))


# ---- one table: every layout on the same prompts ---------------------------------------------------------------

# The reading view: at most 8 columns, those the sentences below use (every column: the CSV, `full_table_note`)
COMPARISON_COLUMNS = [
    "variant", "kib_per_token", "saving_vs_static_pct", "waste_pct", "lossy_tokens", "tpot_ms", "tokens_equal",
    "first_divergence_step",
]  # fmt: skip


def comparison_view(table: pd.DataFrame) -> pd.DataFrame:
    """The reading view of strategies.comparison_table's frame (COMPARISON_COLUMNS, 8), one row per variant, with
    the bytes held per stored token in KiB (kib_per_token) instead of bytes; every column stays in the CSV."""
    return table.assign(kib_per_token=table["bytes_per_token"] / KIB)[COMPARISON_COLUMNS]


def full_table_note(path: Path) -> str:
    """Markdown under a reading view: where every column is (`path`, as study.Outputs.csv returned it)."""
    return f"*The table shows the columns the text uses; every column is in `data/{path.name}`.*"


def untouched_lossy(table: pd.DataFrame) -> pd.Series:
    """Per row of a comparison table: a lossy layout that quantized or evicted nothing in this run (lossy_tokens 0),
    whose numbers therefore say nothing about its lossy storage (bool Series, the table's index)."""
    return ~table["exact"] & (table["lossy_tokens"] == 0)


def marked_variants(table: pd.DataFrame) -> pd.Series:
    """The variants' names as the figure shows them: a lossy layout that lost nothing carries a mark such as
    " [0 quantized]" (its layout's `loses`), so it is not passed off as a result of its lossy storage."""
    marks = table["cache"].map(lambda c: f" [0 {layout_class(c).loses}]")
    return table["variant"].where(~untouched_lossy(table), table["variant"] + marks)


def comparison_figure(
    table: pd.DataFrame, model_name: str, dtype_name: str, batch_size: int, prompt_len: int, new_tokens: int
) -> Figure:
    """Two panels, one row per variant in the study's order and colours: left, the KV cache held per stored token
    (KiB); right, the median decode step (ms) with min–max error bars over the repeats (log scale when the steps
    differ by decades). The title names the model, dtype and workload."""
    fig, axes = plotting.figure(ncols=2, width=6.5, height=4.5, title=f"Cache layouts, {model_name} {dtype_name}, "
                                f"batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens")  # fmt: skip
    marked = marked_variants(table)
    palette, order = plotting.colors(marked)
    sns.barplot(
        data=comparison_view(table).assign(variant=marked),
        y="variant",
        x="kib_per_token",
        hue="variant",
        palette=palette,
        order=order,
        saturation=1,  # the palette's colour itself, as the right panel's points
        ax=axes[0],
    )
    plotting.label(axes[0], "Memory held per cached token", "KV cache held per token (KiB)", "layout (name)")
    err = table.assign(lo=table["tpot_ms"] - table["tpot_ms_min"], hi=table["tpot_ms_max"] - table["tpot_ms"])
    err = err.assign(label=marked.to_numpy()).set_index("label").loc[order]  # the left panel's order and colours
    for i, (name, r) in enumerate(err.iterrows()):
        axes[1].errorbar(r["tpot_ms"], i, xerr=[[r["lo"]], [r["hi"]]], fmt="o", capsize=3, color=palette[name])
    axes[1].set_yticks(range(len(err)), [])  # the same rows as the left panel, named there
    axes[1].set_ylim(axes[0].get_ylim())
    plotting.label(axes[1], "Time per output token", "decode step, median (ms)", "layout, as on the left (name)")
    plotting.log_if_decades(axes[1], "x")  # when the steps differ by decades
    return fig


def comparison_caption(table: pd.DataFrame, repeats: int) -> str:
    """The comparison figure's caption: what each panel shows over `repeats`, and the meaning of the [0 ...] mark
    when a lossy layout lost nothing in this run."""
    return (
        f"Left: bytes held at the end / tokens stored, one run (byte counts do not vary). Right: median decode step "
        f"over {repeats} interleaved repeats; error bars: min–max over those repeats. Colours: each layout's colour "
        "in every figure of the report."
        + (
            " [0 quantized] / [0 evicted]: a lossy layout that kept every token exactly in this run (e.g. all of "
            "them in its full-precision tail), so its bars say nothing about its lossy storage."
            if untouched_lossy(table).any()
            else ""
        )
    )


def _lost(b: pd.Series) -> str:
    return f"{b['lossy_tokens']} of {b['stored_tokens']} tokens per sequence {layout_class(b['cache']).loses}"


def best_saving_headline(table: pd.DataFrame) -> HeadlineRow | None:
    """The headline row best_saving_equal_tokens (%): the largest saving against the static cache of the same run
    among the layouts whose tokens equalled the exact ones (strategies.best_saving_at_equal_tokens); None when no
    layout did."""
    best = best_saving_at_equal_tokens(table)
    if best.empty:
        return None
    b = best.iloc[0]
    return {
        "metric": "best_saving_equal_tokens",
        "label": "Best KV memory saving at equal tokens (vs the static cache, same run)",
        "value": b["saving_vs_static_pct"],
        "unit": "%",
        "headline": True,
        "note": f"{b['variant']}; {'exact' if b['exact'] else f'lossy ({_lost(b)}), tokens happened to match'}",
    }


def best_saving_sentence(table: pd.DataFrame) -> str:
    """Markdown: which layout saved the most memory while producing exactly the static cache's tokens, its KiB per
    stored token against the static cache's, and, for a lossy one, that its matching tokens are no guarantee."""
    best = best_saving_at_equal_tokens(table)
    if best.empty:
        return "No layout other than the static cache both saved memory and kept every token here."
    b = best.iloc[0]
    static = table.set_index("variant").loc[REFERENCE]
    return (
        f"The largest saving that still produced exactly the static cache's tokens: **{b['variant']}**, "
        f"**{b['saving_vs_static_pct']:.1f}%** less memory than the static cache of the same run "
        f"({b['bytes_per_token'] / KIB:.2f} vs {static['bytes_per_token'] / KIB:.2f} KiB per stored token)"
        + (
            "."
            if b["exact"]
            else f" — but this layout is lossy ({_lost(b)}): its tokens matched on these prompts, which is not a "
            "guarantee."
        )
    )


def comparison_sentence(table: pd.DataFrame) -> str:
    """Markdown: exact layouts that changed a token; lossy layouts whose free-running tokens diverged, of those that
    quantized or evicted something (the others are named as testing nothing); the fastest and slowest median decode
    step, with the spread caveat when their min–max ranges overlap, else what the slowest pays for on every step."""
    lossy = table[~table["exact"]]
    tested = lossy[lossy["lossy_tokens"] > 0]  # quantized or evicted something: their error measures the layout
    untested = lossy[lossy["lossy_tokens"] == 0]
    diverged = tested[~tested["tokens_equal"]]
    exact_bad = table[table["exact"] & ~table["tokens_equal"]]
    fast, slow = table.loc[table["tpot_ms"].idxmin()], table.loc[table["tpot_ms"].idxmax()]
    apart = spread_of(fast, "tpot_ms").separated(spread_of(slow, "tpot_ms"))
    caveat = study.spread_caveat(apart, "repeats", "min–max ranges")
    text = (
        f"Exact layouts that changed a token: **{len(exact_bad)}** ({', '.join(exact_bad['variant']) or 'none'}). "
        f"Lossy layouts whose free-running tokens diverged from the exact ones: {len(diverged)} of the {len(tested)} "
        "that quantized or evicted tokens in this run"
        + (
            f" ({', '.join(f'{r.variant} at step {r.first_divergence_step}' for r in diverged.itertuples())})"
            if len(diverged)
            else ""
        )
        + (
            f"; {', '.join(untested['variant'])} quantized or evicted none of the {untested['stored_tokens'].iloc[0]} "
            "tokens per sequence they stored (lossy_tokens 0), so their equal tokens and zero error test nothing "
            "about them."
            if len(untested)
            else "."
        )
        + f" Fastest median decode step: {fast['variant'] if not apart else '**' + fast['variant'] + '**'} "
        f"({fast['tpot_ms']:.3g} ms); slowest: {slow['variant']} "
        f"({slow['tpot_ms']:.3g} ms)"
    )
    if caveat:
        text += f" ({caveat})."
    elif layout_class(slow["cache"]).step_overhead:
        text += f": {slow['variant']} pays for {layout_class(slow['cache']).step_overhead} on every step."
    else:
        text += "."
    return text


# ---- paged: reserved memory that holds no token ----------------------------------------------------------------

WASTE_CAPTION = (
    "One run per spread and layout (byte counts are deterministic); no error bars. "
    "static: preallocated to the batch's longest sequence; static_context: to the model's context; "
    "paged_keep: blocks kept until the batch ends; paged: blocks freed when a sequence ends."
)


def waste_figure(waste: pd.DataFrame, mixed_batch_size: int) -> Figure:
    """Waste (% of held bytes not holding a live token) against the length spread of the mixed batch, one line per
    layout of strategies.paged_waste's frame."""
    title = f"Reserved but unused KV memory, batch of {mixed_batch_size} mixed lengths"
    fig, ax = plotting.figure(width=7, title=title)
    plotting.lines(waste, x="spread", y="waste_pct", hue="layout", ax=ax)
    plotting.label(ax, "Waste against how mixed the batch is", "length spread (0 = equal, 1 = 1..max) (fraction)",
                   "waste: held but not live (% of held)")  # fmt: skip
    plotting.legend_below(ax)
    return fig


def _most_mixed(waste: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    spread = waste["spread"].max()
    return spread, waste[waste["spread"] == spread].set_index("layout")


def waste_headline(waste: pd.DataFrame, block_size: int) -> HeadlineRow:
    """The headline row paged_waste_pct (%): the paged cache's waste at the largest spread measured, with the
    contiguous (static) cache's in its note."""
    w = _most_mixed(waste)[1]
    return {
        "metric": "paged_waste_pct",
        "label": f"Paged cache waste, mixed batch (block {block_size})",
        "value": w.loc["paged", "waste_pct"],
        "unit": "%",
        "note": f"contiguous (static): {w.loc['static', 'waste_pct']:.1f}%",
    }


def waste_sentence(waste: pd.DataFrame) -> str:
    """Markdown: every layout's waste at the largest spread measured, set against vLLM's reported 60–80% (contiguous)
    and under 4% (paged) when the batch was mixed at all, and whether every run's tokens equalled the static
    layout's."""
    spread, w = _most_mixed(waste)
    ws = w["waste_pct"]
    vllm = "in line with" if w.loc["static", "waste_pct"] >= 60 and w.loc["paged", "waste_pct"] < 4 else "unlike"
    return (
        f"At spread {spread:g}, the contiguous cache preallocated to the batch's longest sequence wasted "
        f"**{ws['static']:.1f}%** of what it held, preallocated to the full context {ws['static_context']:.1f}%, "
        f"the growing (dynamic) cache {ws['dynamic']:.1f}%, and the paged cache **{ws['paged']:.1f}%** "
        f"(keeping blocks until the end: {ws['paged_keep']:.1f}%). "
        + (
            f"vLLM reports 60–80% waste for contiguous preallocation and under 4% with paging; these numbers are "
            f"**{vllm}** that. "
            if spread > 0
            else "At spread 0 every sequence has the maximum lengths, so the batch holds no mix of lengths to waste "
            "memory on: vLLM's figures, for mixed requests, do not apply. "
        )
        + f"Tokens equal to the static layout in every run: "
        f"**{bool(waste['tokens_match_static'].all())}**."
    )


def paged_latency_sentence(latency: pd.DataFrame, block_size: int, repeats: int) -> str:
    """Markdown: the median decode step (ms) of the static, paged (block `block_size`) and dynamic caches of
    strategies.paged_latency's frame, the paged / static ratio with the spread caveat when their min–max ranges over
    `repeats` overlap, and why kvlib's paged step is slower than an engine's."""
    lat = latency.set_index("variant")
    paged_name = f"paged (block {block_size})"
    tp = lat["tpot_ms"]
    paged_apart = spread_of(lat.loc["static"], "tpot_ms").separated(spread_of(lat.loc[paged_name], "tpot_ms"))
    paged_caveat = study.spread_caveat(paged_apart, "repeats", "min–max ranges")
    return (
        f"Decode step, median over {repeats} repeats: static **{tp['static']:.3g} ms**, paged "
        f"**{tp[paged_name]:.3g} ms** (paged / static: {tp[paged_name] / tp['static']:.2f}x"
        + (f"; {paged_caveat}" if paged_caveat else "")
        + f"), dynamic {tp['dynamic']:.3g} ms. kvlib's paged cache gathers each sequence's blocks into a "
        "contiguous tensor before attention; real engines read the blocks in place inside the attention kernel."
    )
