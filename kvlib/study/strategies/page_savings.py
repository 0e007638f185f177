"""Notebook 07's page: the layouts that store or compute less, one section each (part 2 of 2).

This module holds what the page shows for quantized codes (fewer bytes per value), grouped- and multi-query
attention (fewer key/value heads), the sliding window with attention sinks (memory that stops growing) and prefix
sharing (a common beginning prefilled once): the tables as shown, figures, markdown sentences and headline rows
(keyword arguments of kvlib.study.Outputs.headline), each computed from the tidy frame its measurement in
kvlib.study.strategies returns. Part 1 (parameters, every layout side by side, the paged cache) is
kvlib.study.strategies.page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kvlib import study
from kvlib.caches.base import REFERENCE
from kvlib.study import plotting
from kvlib.study.strategies.common import Variant
from kvlib.study.strategies.page import KIB, MIB, HeadlineRow, spread_of

# ---- quantized: fewer bytes per value --------------------------------------------------------------------------

QUANTIZED_COLUMNS = [  # the reading view: at most 8 columns (every column: the CSV)
    "engine", "variant", "status", "quantized_tokens", "saving_vs_full_pct", "rel_logit_diff", "token_agreement_pct",
    "tpot_ms",
]  # fmt: skip
# How the sentences name the full-precision cache a quantized variant is measured against (its `reference`)
REFERENCES = {
    "full precision (static)": "kvlib's full-precision static cache",
    "HF dynamic (full precision)": "Hugging Face's full-precision dynamic cache",
}


def quantized_view(quant: pd.DataFrame) -> pd.DataFrame:
    """The columns of strategies.quantized_error's frame that the page shows (those present), one row per variant."""
    return quant[[c for c in QUANTIZED_COLUMNS if c in quant]]


def _measured(quant: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(lossy variants that quantized at least one token, lossy ones that quantized none, unavailable rows)."""
    ok = quant[quant["status"] == "ok"]
    lossy_q = ok[~ok["exact"].astype(bool)]
    measured = lossy_q[lossy_q["quantized_tokens"] > 0]  # quantized at least one token: a quantization result
    untested = lossy_q[lossy_q["quantized_tokens"] == 0]  # every token stayed in the full-precision tail
    return measured, untested, quant[quant["status"] != "ok"]


def _int8(quant: pd.DataFrame) -> pd.DataFrame:
    """kvlib's int8 variants that quantized something, fewest held bytes first."""
    measured = _measured(quant)[0]
    return measured[(measured["engine"] == "kvlib") & (measured["bits"] == 8)].sort_values("held_bytes")


def _agreement(r: Any, batch_size: int, new_tokens: int) -> str:
    return (
        f"token agreement with that cache {r.token_agreement_pct:.1f}% ({r.agreeing_steps} of {r.compared_steps} "
        f"teacher-forced token choices: {new_tokens} steps x {batch_size} sequences)"
    )


def int8_headline(quant: pd.DataFrame) -> HeadlineRow | None:
    """The headline row int8_saving_pct (%): the saving of kvlib's smallest int8 variant that quantized a token,
    against the full-precision static cache of the same run, its note saying how many tokens were quantized and the
    relative logit error; None when no int8 variant quantized any token."""
    int8 = _int8(quant)
    if not len(int8):
        return None
    q = int8.iloc[0]
    return {
        "metric": "int8_saving_pct",
        "label": "int8 KV cache: memory saving vs the full-precision static cache, same run",
        "value": q["saving_vs_full_pct"],
        "unit": "%",
        "note": f"{q['variant']}; {q['quantized_tokens']} of {q['stored_tokens']} tokens per sequence quantized; "
        f"relative logit error {q['rel_logit_diff']:.2e}",
    }


def quantized_sentence(quant: pd.DataFrame, batch_size: int, new_tokens: int) -> str:
    """Markdown: the int8 saving (how many tokens were quantized, against which cache, the logit error and the token
    agreement with its denominator: `new_tokens` steps x `batch_size` sequences), the same for every lower-bit
    variant that quantized something; the variants that quantized nothing, named as no quantization result; and
    the unavailable backends with the reason."""
    measured, untested, missing = _measured(quant)
    int8 = _int8(quant)
    if len(int8):
        q = int8.iloc[0]
        text = (
            f"kvlib's {q['variant']} cache quantized {q['quantized_tokens']} of the {q['stored_tokens']} tokens it "
            f"stored per sequence and holds **{q['saving_vs_full_pct']:.1f}%** fewer bytes than kvlib's "
            f"full-precision static cache of the same run, with a largest logit error of "
            f"{q['max_abs_logit_diff']:.3g} ({q['rel_logit_diff']:.2%} of the largest logit) and "
            f"{_agreement(q, batch_size, new_tokens)}. "
        )
    else:
        text = "No kvlib int8 variant quantized any token in this run, so there is no int8 saving to report. "
    text += " ".join(
        f"{r.variant}: {r.quantized_tokens} of {r.stored_tokens} tokens per sequence quantized, "
        f"{r.saving_vs_full_pct:.1f}% saving against {REFERENCES.get(r.reference, r.reference)} of the same run, "
        f"{_agreement(r, batch_size, new_tokens)}."
        for r in measured[measured["bits"].fillna(16) < 8].itertuples()
    )
    if len(untested):
        text += (
            f" **Not quantization results:** {', '.join(untested['variant'])} quantized none of the "
            f"{untested['stored_tokens'].iloc[0]} tokens per sequence they stored (the whole run fit in their "
            "full-precision tail), so their bytes and agreement are those of full-precision storage; the table marks "
            "them with quantized_tokens 0. A longer run (prompt_len + new_tokens beyond the tail) would measure them."
        )
    if len(missing):
        text += f" Unavailable here: {', '.join(missing['variant'])} ({missing['status'].iloc[0]})."
    return text


# ---- grouped-query and multi-query attention: fewer key/value heads --------------------------------------------

GQA_COLUMNS = ["attention", "n_kv_head", "held_bytes", "formula_bytes", "reduction", "expected_reduction",
               "reduction_exact", "tpot_ms"]  # fmt: skip  # the reading view (every column: the CSV)
GQA_CAPTION = (
    "One run per model (byte counts are deterministic); no error bars. Bars in the static cache's colour: every model "
    "ran with it; the attention kind is named under each head count."
)


def label_random_weights(gqa: pd.DataFrame) -> pd.DataFrame:
    """strategies.gqa_reduction's frame with " (random weights)" appended to the attention of every model built
    with seeded random weights, so no table or figure passes it off as a pretrained model."""
    return gqa.assign(attention=gqa["attention"] + gqa["weights"].map({"random": " (random weights)"}).fillna(""))


def gqa_view(gqa: pd.DataFrame) -> pd.DataFrame:
    """The columns of the key/value-head table that the page shows, one row per model."""
    return gqa[GQA_COLUMNS]


def gqa_figure(gqa: pd.DataFrame, batch_size: int, slots: int) -> Figure:
    """Bars of the KV cache held (MiB) per key/value head count, each named by its attention kind under the count,
    in the static cache's colour (the cache every model ran with: strategies.gqa_reduction); the panel names the
    batch and the static cache's `slots` (prompt + new tokens)."""
    fig, ax = plotting.figure(width=6, title="KV cache against key/value heads")
    heads = gqa["n_kv_head"].astype(str) + "\n" + gqa["attention"].str.replace(" (", "\n(", regex=False)
    sns.barplot(data=gqa.assign(held_mib=gqa["held_bytes"] / MIB, heads=heads), x="heads", y="held_mib",
                color=plotting.colour_of("layout", REFERENCE), saturation=1, ax=ax)  # fmt: skip
    plotting.label(ax, f"batch {batch_size}, {slots} slots", "key/value heads (count)", "KV cache held (MiB)")
    return fig


def _fewest(gqa: pd.DataFrame) -> tuple[pd.Series, int, int]:
    """(the row with the fewest key/value heads, n_head, its n_kv_head)."""
    few = gqa.loc[gqa["n_kv_head"].idxmin()]
    return few, int(few["n_head"]), int(few["n_kv_head"])


def gqa_headline(gqa: pd.DataFrame) -> HeadlineRow | None:
    """The headline row gqa_reduction (x): how many times smaller the cache with the fewest key/value heads is than
    the multi-head cache of the same batch and slots; None when only the multi-head model was measured."""
    few, n_head, n_few = _fewest(gqa)
    if n_few == n_head:
        return None
    return {
        "metric": "gqa_reduction",
        "label": f"KV cache reduction with {n_few} key/value head(s), vs multi-head",
        "value": few["reduction"],
        "unit": "x",
        "note": f"{few['attention']}; multi-head cache bytes (same batch and slots) / held bytes; expected "
        f"n_head / n_kv_head = {few['expected_reduction']:g}",
    }


def gqa_sentence(gqa: pd.DataFrame, model_name: str, weights: str, n_kv_head: int, weight_bytes: int) -> str:
    """Markdown: the page's model (`model_name`, `weights`, its own `n_kv_head`) against a multi-head cache; in how
    many models the held bytes shrank by exactly n_head / n_kv_head; every model's decode step (ms) and the fewest
    heads' step against the multi-head one with the spread caveat; and the multi-head cache's share of the bytes a
    decode step reads (cache + `weight_bytes` of weights), which bounds what fewer heads can save."""
    few, n_head, n_few = _fewest(gqa)
    if n_few == n_head:
        return f"Only the multi-head model ({n_head} key/value heads) was measured: nothing to compare it with."
    mha_bytes = few["held_bytes"] * few["reduction"]  # the multi-head cache of the same batch and slots
    share = mha_bytes / (mha_bytes + weight_bytes)
    own = gqa[gqa["n_kv_head"] == n_kv_head]
    own_text = (
        f"The page's model ({model_name}, {weights} weights) shares {n_kv_head} key/value heads among "
        f"{n_head} query heads: its cache is **{own['reduction'].iloc[0]:g}x** smaller than a multi-head one. "
        if len(own) and n_kv_head != n_head
        else ""
    )
    text = own_text + (
        f"Held bytes shrink by exactly n_head / n_kv_head in **{int(gqa['reduction_exact'].sum())} of {len(gqa)}** "
        f"models ({few['attention']}, {n_few} key/value head{'s' if n_few > 1 else ''}: **{few['reduction']:g}x** "
        "smaller than the multi-head cache of the same batch and slots). Decode step: "
        + ", ".join(f"{int(r.n_kv_head)} kv head(s) {r.tpot_ms:.3g} ms" for r in gqa.itertuples())
    )
    mha = gqa[gqa["n_kv_head"] == n_head]
    if len(mha):
        m = mha.iloc[0]
        step_caveat = study.spread_caveat(
            spread_of(m, "tpot_ms").separated(spread_of(few, "tpot_ms")), "repeats", "min–max ranges"
        )
        text += f" ({n_few} / {n_head} heads: {few['tpot_ms'] / m['tpot_ms']:.2f}x the step" + (
            f"; {step_caveat})" if step_caveat else ")"
        )
    text += (
        f". Full, the multi-head cache is {share:.0%} of the bytes a decode step reads (cache + "
        f"{weight_bytes / MIB:.3g} MiB of weights), so fewer key/value heads can shorten a step by at most about "
        "that share"
        + (" here: the weights dominate at these sizes; the share grows with batch x length." if share < 0.25 else ".")
    )
    return text


# ---- sliding window with attention sinks: memory that stops growing --------------------------------------------

MEMORY_CAPTION = "One run per layout and length (byte counts are deterministic); no error bars."


def memory_variants(variants: Mapping[str, Variant], layouts: Sequence[str]) -> dict[str, Variant]:
    """The variants (label -> (layout, options)) whose layout is one of `layouts`, in their order."""
    return {k: v for k, v in variants.items() if v[0] in layouts}


def memory_figure(memory: pd.DataFrame, model_name: str, dtype_name: str) -> Figure:
    """The KV cache held (KiB) against the sequence length (prompt + new tokens), one line per variant of
    strategies.memory_by_length's frame, batch 1."""
    fig, ax = plotting.figure(width=7, title="KV cache held against sequence length, batch 1")
    plotting.lines(memory.assign(held_kib=memory["held_bytes"] / KIB), x="total_tokens", y="held_kib", hue="variant",
                   ax=ax)  # fmt: skip
    plotting.label(ax, f"{model_name} {dtype_name}", "sequence length, prompt + new (tokens)", "KV cache held (KiB)")
    plotting.legend_below(ax)
    return fig


def window_sentence(win: pd.DataFrame) -> str:
    """Markdown from strategies.window_memory's frame: how the static and window caches grew from the shortest to the
    longest length (KiB), whether the window's memory stayed flat once full, that it was exact while the sequence
    fit in sink + window, and for each longer length whether its greedy tokens diverged and how many teacher-forced
    token choices agreed with the static cache."""
    w = win[win["cache"] != REFERENCE].set_index("total_tokens")  # the window layout's rows
    st = win[win["cache"] == REFERENCE].set_index("total_tokens")
    lengths, sink, window = win["total_tokens"], int(win["sink"].iloc[0]), int(win["window"].iloc[0])
    evicted = w[~w["fits"]]
    flat = evicted["held_bytes"].nunique() <= 1
    st_kib, w_kib = st["held_bytes"] / KIB, w["held_bytes"] / KIB
    return (
        f"From length {min(lengths)} to {max(lengths)}, the static cache grew from {st_kib.iloc[0]:,.0f} to "
        f"**{st_kib.iloc[-1]:,.0f} KiB**, the window cache from {w_kib.iloc[0]:,.0f} to **{w_kib.iloc[-1]:,.0f} KiB**"
        + (
            (": flat once the window was full, as designed. " if flat else ": it still grew after the window filled. ")
            if len(evicted) > 1
            else ". "
        )
        + f"While the sequence fit in {sink} + {window} tokens it was exact (tokens equal: "
        f"{bool(w[w['fits']]['tokens_equal'].all()) if w['fits'].any() else 'no such length measured'}). "
        + (
            "Once tokens were evicted: "
            + "; ".join(
                f"length {t}: greedy tokens "
                + ("unchanged" if r.tokens_equal else f"diverged at step {r.first_divergence_step}")
                + f", {r.token_agreement_pct:.1f}% of teacher-forced token choices agree with the static cache "
                f"({r.agreeing_steps} of {r.compared_steps})"
                for t, r in zip(evicted.index, evicted.itertuples(), strict=True)
            )
            + ". A window trades exactness for bounded memory; how much it costs depends on how much the model needs "
            "the evicted middle."
            if len(evicted)
            else "No measured length exceeded the window."
        )
    )


# ---- prefix sharing: prefill the common beginning once ---------------------------------------------------------


PREFIX_COLUMNS = ["variant", "prefill_tokens", "held_mib", "ttft_ms", "ttft_ms_min", "ttft_ms_max", "tpot_ms",
                  "tokens_equal"]  # fmt: skip  # the reading view (every column: the CSV)


def prefix_view(prefix: pd.DataFrame) -> pd.DataFrame:
    """The reading view of strategies.prefix_sharing's frame (PREFIX_COLUMNS, 8), one row per variant, with the cache
    held in MiB (held_mib); every column stays in the CSV."""
    return prefix.assign(held_mib=prefix["held_bytes"] / MIB)[PREFIX_COLUMNS]


def _prefix_pair(prefix: pd.DataFrame) -> tuple[pd.Series, pd.Series, float, str]:
    """(the first full-prompts row, the shared-prefix row, their time-to-first-token ratio, the spread caveat)."""
    full = prefix.iloc[0]
    shared = prefix[prefix["variant"].str.startswith("shared")].iloc[0]
    apart = spread_of(full, "ttft_ms").separated(spread_of(shared, "ttft_ms"))
    return full, shared, full["ttft_ms"] / shared["ttft_ms"], study.spread_caveat(apart, "repeats", "min–max ranges")


def prefix_headline(prefix: pd.DataFrame) -> HeadlineRow:
    """The headline row prefix_ttft_speedup (x): time to first token of the full prompts over that of the shared
    prefix (strategies.prefix_sharing's frame), with the spread caveat in its note when their ranges overlap."""
    full, shared, speedup, caveat = _prefix_pair(prefix)
    return {
        "metric": "prefix_ttft_speedup",
        "label": "Prefix sharing: time-to-first-token speedup (full prompts / shared prefix)",
        "value": speedup,
        "unit": "x",
        "note": f"{int(full['batch_size'])} prompts sharing {int(full['prefix_len'])} tokens; {full['variant']} / "
        f"{shared['variant']}" + (f"; {caveat}" if caveat else ""),
    }


def prefix_sentence(prefix: pd.DataFrame) -> str:
    """Markdown: positions prefilled and time to first token (ms) with the prefix shared against full prompts, their
    ratio (with the spread caveat, or "slower" when sharing did not pay), the cache held (MiB), and whether every
    token equalled those of prefilling each full prompt."""
    full, shared, speedup, caveat = _prefix_pair(prefix)
    return (
        f"{int(full['batch_size'])} prompts sharing a {int(full['prefix_len'])}-token prefix: the model prefilled "
        f"**{int(shared['prefill_tokens'])}** positions instead of {int(full['prefill_tokens'])}; time to first token "
        f"**{shared['ttft_ms']:.3g} ms** instead of {full['ttft_ms']:.3g} ms ({full['variant']} / shared: "
        f"{speedup:.2f}x"
        + (
            f"; {caveat}"
            if caveat
            else (
                ", slower: the saved prefill did not pay for the sharing's overhead at this size" if speedup < 1 else ""
            )
        )
        + f"); the cache held {shared['held_bytes'] / MIB:.3g} MiB instead of {full['held_bytes'] / MIB:.3g} MiB. "
        f"Tokens equal to prefilling every full prompt: **{bool(prefix['tokens_equal'].all())}**."
    )
