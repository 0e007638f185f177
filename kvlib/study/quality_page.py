"""Notebook 08's page: what a lossy cache costs in quality, on real text.

One concept: each lossy layout judged as its paper judged it, by the perplexity of real text read through the cache
next to the full cache's (StreamingLLM's sinks and window, its re-computation baseline, quantized caches with their
bytes and decode latency, and where greedy text first leaves the full cache's). The measurements are
kvlib.study.quality's (one tidy row per variant); the functions here check the page's parameters and turn those
frames into the page's tables, figures, markdown sentences and headline rows (keyword arguments of
kvlib.study.Outputs.headline: `out.headline(**row)`). Perplexities are deterministic (no error bars); decode
latencies are compared by their min–max ranges (kvlib.core.stats, through study.Spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from kvlib import study
from kvlib.caches.base import evicts
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.perplexity import METHODS
from kvlib.study import agreement, plotting, quality
from kvlib.study.quality import FULL, HF_FULL, RECOMPUTE, Text

HeadlineRow = dict[str, Any]  # the keyword arguments of kvlib.study.Outputs.headline: out.headline(**row)
RANDOM_NOTE = "**Random weights: the perplexities below are meaningless; this run only proves the pipeline.**"
THEIRS_NOTE = "**Theirs** (the paper's figures, not measured here):"
QUANT_COLUMNS = ["variant", "bits_per_element", "bytes_per_token", "saving_pct", "perplexity", "ppl_change_pct"]
COST_COLUMNS = ["engine", "variant", "bytes_per_token", "ppl_change_pct", "ppl_tokens", "tpot_ms", "tpot_ms_min",
                "tpot_ms_max", "tpot_vs_full", "repeats"]  # fmt: skip
FRONTIER_CAPTION = (
    "One pass per variant (deterministic: no error bars). Grey marks are published claims, not measured "
    "here: llama.cpp's q8_0 cache (+0.005 ppl, shown as a percentage of a base of about 6) and the KIVI / "
    "Hugging Face statement that int4 is close to full precision (placed at 0%). The y axis is linear "
    "between -0.1% and +0.1% and logarithmic beyond."
)

# ---- parameters ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 08's own parameters, checked (see check_parameters), and the model's config. Sizes are token counts;
    `budgets` and `sinks` sorted without repeats; `method` one of kvlib.measure.perplexity.METHODS."""

    tokens: int
    passages: int
    passage_tokens: int
    budget_tokens: int
    floor_tokens: int
    budgets: list[int]
    sinks: list[int]
    rolling_width: int
    recompute_every: int
    kivi_group: int
    residuals: list[int]
    hf_tokens: int
    hf_bits: list[int]
    hf_residual: int
    latency_prompt_len: int
    latency_new_tokens: int
    latency_repeats: int
    greedy_prompts: int
    greedy_prompt_len: int
    greedy_new_tokens: int
    greedy_sink: int
    greedy_window: int
    method: str
    cfg: ModelConfig

    @property
    def budget(self) -> int:
        """The largest budget W (tokens): the one the sentences, headlines and figure quote."""
        return max(self.budgets)


def check_parameters(
    model: str, *, tokens: Any, passages: Any, passage_tokens: Any, budget_tokens: Any, floor_tokens: Any,
    budgets: Any, sinks: Any, rolling_width: Any, recompute_every: Any,
    kivi_group: Any, residuals: Any, hf_tokens: Any, hf_bits: Any, hf_residual: Any, latency_prompt_len: Any,
    latency_new_tokens: Any, latency_repeats: Any, greedy_prompts: Any, greedy_prompt_len: Any,
    greedy_new_tokens: Any, greedy_sink: Any, greedy_window: Any, method: Any,
) -> Parameters:  # fmt: skip
    """Every parameter checked before anything runs (values as papermill passes them: "[16, 32]" text too); a
    one-line KvlibError naming the parameter otherwise. Also: a Llama-architecture model, every length within its
    context, budget_tokens below passage_tokens, every sink count below every budget and every budget below tokens.
    Loads no model and writes nothing."""
    positive = study.positive_int
    tokens = positive("tokens", tokens, minimum=2)
    passages = positive("passages", passages)
    passage_tokens = positive("passage_tokens", passage_tokens, minimum=2)
    budget_tokens = positive("budget_tokens", budget_tokens)
    floor_tokens = positive("floor_tokens", floor_tokens, minimum=2)
    recompute_every = positive("recompute_every", recompute_every)
    latency_prompt_len = positive("latency_prompt_len", latency_prompt_len)
    latency_new_tokens = positive("latency_new_tokens", latency_new_tokens, minimum=2)
    latency_repeats = positive("latency_repeats", latency_repeats)
    budgets = study.int_list("budgets", budgets)
    sinks = study.int_list("sinks", sinks, minimum=0)
    rolling_width = positive("rolling_width", rolling_width)
    kivi_group = positive("kivi_group", kivi_group)
    residuals = study.int_list("residuals", residuals, minimum=2)
    hf_tokens = positive("hf_tokens", hf_tokens, minimum=2)
    hf_bits = study.int_list("hf_bits", hf_bits)
    hf_residual = positive("hf_residual", hf_residual)
    greedy_prompts = positive("greedy_prompts", greedy_prompts)
    greedy_prompt_len = positive("greedy_prompt_len", greedy_prompt_len)
    greedy_new_tokens = positive("greedy_new_tokens", greedy_new_tokens)
    greedy_sink = positive("greedy_sink", greedy_sink, minimum=0)
    greedy_window = positive("greedy_window", greedy_window)
    method = study.choice("method", method, METHODS)
    cfg = study.model_config(model)
    if cfg.arch != "llama":
        raise KvlibError(f"parameter model: notebook 8 needs a Llama-architecture model, {model} is {cfg.arch}")
    study.check_context(cfg, tokens, 0, "tokens")
    study.check_context(cfg, passage_tokens, 0, "passage_tokens")
    study.check_context(cfg, greedy_prompt_len, greedy_new_tokens, "greedy_prompt_len + greedy_new_tokens")
    study.check_context(cfg, latency_prompt_len, latency_new_tokens, "latency_prompt_len + latency_new_tokens")
    agreement.check_budget(cfg, budget_tokens, "budget_tokens")
    agreement.check_budget(cfg, agreement.timed_budget(latency_prompt_len), "latency_prompt_len (timed at half of it)")
    if budget_tokens >= passage_tokens:
        raise KvlibError(
            f"parameter budget_tokens ({budget_tokens}) must be below passage_tokens ({passage_tokens}), "
            "or nothing is evicted"
        )
    if max(sinks) >= min(budgets):
        raise KvlibError(f"every sink count must be below every budget: sinks {sinks}, budgets {budgets}")
    if max(budgets) >= tokens:
        raise KvlibError(f"every budget must be below tokens ({tokens}), or nothing is evicted: {budgets}")
    return Parameters(
        tokens, passages, passage_tokens, budget_tokens, floor_tokens, budgets, sinks, rolling_width,
        recompute_every, kivi_group, residuals, hf_tokens,
        hf_bits, hf_residual, latency_prompt_len, latency_new_tokens, latency_repeats, greedy_prompts,
        greedy_prompt_len, greedy_new_tokens, greedy_sink, greedy_window, method, cfg,
    )  # fmt: skip


# ---- the text and StreamingLLM: window only against attention sinks -------------------------------------------


def row(metric: str, label: str, value: float, unit: str, headline: bool = False, note: str = "") -> HeadlineRow:
    """The keyword arguments of kvlib.study.Outputs.headline for one of the page's rows (deterministic: no spread)."""
    return dict(metric=metric, label=label, value=value, unit=unit, headline=headline, note=note)


def meaningless(meaningful: bool) -> str:
    """The suffix a sentence carries when its perplexities come from random weights ('' otherwise)."""
    return "" if meaningful else " (Random weights: meaningless.)"


def text_sentence(text: Text, tokens: int, span: str, method: str) -> str:
    """Markdown: which text (quality.load_text), which spans the two parts of the page score, and which method."""
    return (
        f"Text: {text.name}. Layouts against the exact cache: {span}. StreamingLLM table: text tokens 0-{tokens - 1}, "
        f"read as one text. Method `{method}`. A perplexity belongs to its span: compare numbers of one span only."
    )


def full_cache_sentence(stream: pd.DataFrame, tokens: int) -> str:
    """Markdown: the full cache's perplexity (the first row of quality.streaming's table), tokens scored, span."""
    return (
        f"Full cache: perplexity **{stream['perplexity'].iloc[0]:.3f}** over {tokens - 1} tokens scored (text tokens "
        f"1-{tokens - 1}, each given all earlier ones from token 0; another span gives another perplexity)."
    )


def streaming_table(stream: pd.DataFrame) -> pd.DataFrame:
    """Perplexity of every evicting variant: rows (sink count, positions convention), columns budget (tokens)."""
    evicting = stream[stream["cache"].map(evicts)]
    return evicting.pivot_table(index=["sink", "positions"], columns="budget", values="perplexity")


@dataclass(frozen=True)
class SinksAtBudget:
    """The StreamingLLM comparison at budget W: the rows at W by sink count (original positions), window only's
    perplexity (0 sinks), 4 sinks' (nan if not run), the best sink count > 0 (None if none) and window only / its
    perplexity; the rows with positions counted within the cache; the full cache's perplexity."""

    budget: int
    at_budget: pd.DataFrame
    window_only: float
    four: float
    best_sink: int | None
    ratio: float
    cache_positions: pd.DataFrame
    full_ppl: float


def sinks_at_budget(stream: pd.DataFrame, W: int) -> SinksAtBudget:
    """The comparison the page's sentence and headlines quote at budget `W` (the largest), from quality.streaming's
    table."""
    at_w = stream[(stream["budget"] == W) & (stream["positions"] != "cache")].set_index("sink")
    window_only, four = at_w.loc[0, "perplexity"], at_w.loc[4, "perplexity"] if 4 in at_w.index else float("nan")
    best_sink = at_w.drop(index=0)["perplexity"].idxmin() if len(at_w) > 1 else None
    ratio = window_only / at_w.loc[best_sink, "perplexity"] if best_sink is not None else float("nan")
    cachepos = stream[(stream["budget"] == W) & (stream["positions"] == "cache")]
    return SinksAtBudget(W, at_w, window_only, four, best_sink, ratio, cachepos, stream["perplexity"].iloc[0])


def streaming_headlines(s: SinksAtBudget, text: Text, tokens: int) -> list[HeadlineRow]:
    """Headline rows (ppl): window only at W, and 4 sinks + W - 4 recent (on the index only when meaningful)."""
    W = s.budget
    return [
        row("window_only_ppl", f"Window-only perplexity at budget {W}", s.window_only, "ppl",
            note=f"full cache {s.full_ppl:.3f}; {text.name}, {tokens} tokens"),
        row("sink4_ppl", f"4 sinks + {W - 4} recent, perplexity at budget {W}", s.four, "ppl",
            headline=text.meaningful, note=f"window only: {s.window_only:.3f}; full cache {s.full_ppl:.3f}"),
    ]  # fmt: skip


def sinks_sentence(s: SinksAtBudget, tokens: int, meaningful: bool) -> str:
    """Markdown: window only against the best sink count at W, whether the paper's collapse reproduced (window only
    at least quality.SINK_EFFECT times the sinks' perplexity), and 4 sinks with positions counted in the cache."""
    W, at_w, window_only, four, best_sink, ratio = s.budget, s.at_budget, s.window_only, s.four, s.best_sink, s.ratio
    reproduced = ratio >= quality.SINK_EFFECT  # window only at least 10% above the best sink count
    pos_text = ""
    if len(s.cache_positions):
        pos_text = (f" With StreamingLLM's positions counted within the cache, 4 sinks give "
                    f"{s.cache_positions['perplexity'].iloc[0]:.3f} (original positions: {four:.3f}); with 0 sinks "
                    "the two conventions are the same computation.")  # fmt: skip
    return (
        f"At budget {W} on {tokens} tokens, window only gives perplexity **{window_only:.3f}** against "
        f"**{at_w.loc[best_sink, 'perplexity']:.3f}** with {best_sink} sink(s) ({ratio:.2f}x) and {s.full_ppl:.3f} "
        f"for the full cache. The paper's 1000x collapse (5158 against 5.40, Llama-2-13B, 65K tokens, cache 1024) "
        + (f"**reproduced in direction, far smaller in size**: window only is {ratio:.2f}x the sinks' perplexity "
           f"here, against {5158 / 5.40:.0f}x in the paper (a much longer text, and a cache of 1024)."
           if reproduced else "**did not reproduce** at this scale: the window-only cache is within "
           f"{ratio:.2f}x of the sinks' perplexity (less than {quality.SINK_EFFECT:.1f}x).")
        + pos_text
        + meaningless(meaningful)
    )  # fmt: skip


def streaming_position_figure(
    nll: dict[str, torch.Tensor], width: int, budget: int, sinks: list[int], model_name: str
) -> Figure:
    """Rolling perplexity over `width` scored tokens against position in the text (tokens), one line per variant of
    quality.same_budget (the study's colours: the window's variants in darker and lighter shades of it, each with its
    own dashes and markers), dotted at `budget` where eviction starts; the legend under the panel. No line hides
    another (plotting.parting): variants equal throughout share one line and one label ("a = b"), and a variant that
    lies on an earlier line at first (the full cache's, before eviction starts) is drawn from where it leaves it,
    its label saying so. `nll`: quality.streaming's."""
    roll = quality.rolling(nll, width, quality.same_budget(budget, sinks))
    fig, ax = plotting.figure(width=9, height=4.5, title=f"Perplexity against position, {model_name}, budget {budget}")
    order = plotting.order(roll["variant"].unique())
    wide = roll.pivot(index="position", columns="variant", values="rolling_ppl")[order]
    styles = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 3)))  # solid, dashed, dotted, dash-dot
    markers = ("", "o", "s", "^", "D")
    shade = plotting.line_colours(order)  # a repeated colour (the window's) darker, then lighter: no pale dotted line
    for i, line in enumerate(plotting.parting(wide)):
        part = wide.loc[line.start :, line.labels[0]]
        label = line.label + (f" (on the {line.under} line up to position {line.start})" if line.under else "")
        ax.plot(part.index, part.to_numpy(), color=shade[line.labels[0]], linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)], markevery=max(1, len(wide) // 12), markersize=5, linewidth=1.8,
                label=label)  # fmt: skip
    ax.axvline(budget, color=plotting.NEUTRAL, linestyle=":", linewidth=1)
    plotting.label(ax, f"Rolling perplexity over {width} tokens", "position in the text (tokens)", "perplexity (ppl)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    return fig


def streaming_position_caption(text_name: str, width: int, budget: int) -> str:
    """The position figure's caption: one pass per variant, what a point is, the dotted budget line, and how lines
    that coincide are drawn."""
    return (
        f"One pass per variant on {text_name}; each point is exp(mean NLL) of the previous {width} "
        f"scored tokens (deterministic: no error bars). Dotted: the budget {budget}, where eviction starts. No line "
        "hides another: a variant that lies on an earlier line at first (closer than a line's width) is drawn from "
        "where it leaves it, its label naming that line and the position; variants equal throughout share one line "
        "and one label (a = b; a ≈ b when they differ by less than a line's width)."
    )


# ---- the paper's baseline: sliding window with re-computation --------------------------------------------------


def recompute_table(recomp: pd.DataFrame) -> pd.DataFrame:
    """Perplexity per variant (rows, in quality.recompute_comparison's order) and budget (columns)."""
    return recomp.pivot_table(index="variant", columns="budget", values="perplexity", sort=False)


@dataclass(frozen=True)
class RecomputeAtBudget:
    """Re-computation at budget W beside the other rows on the same tokens: perplexities (re-computation, full cache,
    window only, the best sink count's with its label), tokens scored and how they were sampled, the sink cache's
    one pass over the whole text (s) and re-computation's time per scored token (s)."""

    budget: int
    tokens_scored: int
    sample: str
    rec: float
    full: float
    window_only: float
    best_label: str
    best_ppl: float
    one_pass_s: float
    per_token_s: float


def recompute_at_budget(recomp: pd.DataFrame, stream: pd.DataFrame, W: int, every: int) -> RecomputeAtBudget | None:
    """The numbers the sentence and headline quote at budget `W`; None when no token past it was scored.
    `recomp`: quality.recompute_comparison's table; `stream`: quality.streaming's (for the one-pass time)."""
    rw = recomp[recomp["budget"] == W].set_index("variant")["perplexity"] if len(recomp) else pd.Series(dtype=float)
    if not len(rw):
        return None
    n_rec = int(recomp.loc[recomp["budget"] == W, "tokens_scored"].iloc[0])
    sample = "every token" if every == 1 else f"1 token in {every}"
    w0_label = quality.variant_label("window", {"sink": 0, "window": W})
    sink_ppl = rw.drop(index=[RECOMPUTE, FULL, w0_label])
    best_lbl, best_ppl = sink_ppl.idxmin(), sink_ppl.min()
    one_pass = stream.loc[stream["variant"] == best_lbl, "time_s"].iloc[0]
    per_tok = recomp.loc[(recomp["budget"] == W) & (recomp["variant"] == RECOMPUTE), "time_s"].iloc[0] / n_rec
    return RecomputeAtBudget(W, n_rec, sample, rw[RECOMPUTE], rw[FULL], rw[w0_label], best_lbl, best_ppl, one_pass,
                             per_tok)  # fmt: skip


def no_recompute_sentence(W: int, tokens: int) -> str:
    """Markdown: no token past budget `W` to score (the text is too short)."""
    return f"No token past budget {W} to score with re-computation (the text has {tokens} tokens)."


def recompute_headline(r: RecomputeAtBudget) -> HeadlineRow:
    """Headline row: re-computation's perplexity at W (ppl); the other rows on the same tokens in its note."""
    return row("recompute_ppl", f"Sliding window with re-computation, perplexity at budget {r.budget}", r.rec, "ppl",
               note=f"{r.tokens_scored} tokens ({r.sample} past {r.budget}); same tokens: window only "
               f"{r.window_only:.3f}, {r.best_label} {r.best_ppl:.3f}, full {r.full:.3f}")  # fmt: skip


def recompute_sentence(r: RecomputeAtBudget, tokens: int, meaningful: bool) -> str:
    """Markdown: re-computation against window only, the best sinks and the full cache on the same tokens (closer to
    the full cache than window only? within 5% of the sinks?) and its cost per token (ms) against one pass."""
    W, rec, full_same, w0, best_ppl, one_pass = r.budget, r.rec, r.full, r.window_only, r.best_ppl, r.one_pass_s
    closer = "closer to" if abs(rec - full_same) < abs(w0 - full_same) else "no closer to"
    near_sinks = "within" if abs(rec / best_ppl - 1) <= 0.05 else "not within"
    return (
        f"At budget {W}, on the same {r.tokens_scored} tokens ({r.sample} past token {W}): re-computation "
        f"**{rec:.3f}**, window only {w0:.3f}, best sinks ({r.best_label}) **{best_ppl:.3f}**, full cache "
        f"{full_same:.3f}. Re-computation is {closer} the full cache than window only ({rec / full_same:.3f}x "
        f"against {w0 / full_same:.3f}x) and {near_sinks} 5% of the sinks' ({rec / best_ppl:.3f}x); the paper "
        "found it good in quality but slow, its attention quadratic in the window. Its cost: "
        f"**{1e3 * r.per_token_s:.0f} ms a token** scored here, against {one_pass:.1f} s for the whole {tokens}-token "
        f"text in one pass of the sink cache's mask ({1e3 * one_pass / (tokens - 1):.1f} ms a token)."
        + meaningless(meaningful)
    )


# ---- quantized caches: the memory-quality frontier -------------------------------------------------------------


def hf_quantized_sentence(hf_tokens: int) -> str:
    """Markdown introducing the table of Hugging Face's QuantizedCache (quality.hf_quantized_rows)."""
    return (f"Hugging Face's QuantizedCache, token by token on the first {hf_tokens} tokens, against HF's "
            "own model without a cache on the same tokens:")  # fmt: skip


def frontier_figure(quant: pd.DataFrame, model_name: str, quant_tokens: int) -> Figure:
    """Perplexity change against the full cache (%, symmetric log y) against effective bits per stored key/value
    element: one marker per quantized variant (the study's colours, a legend), grey marks for the published claims
    (quality.QUANT_REFERENCES), dotted at +1%. `quant`: quality.run_variants' table, the full cache first."""
    fig, ax = plotting.figure(width=9, height=4.5, title=f"Memory against quality, {model_name}, {quant_tokens} tokens")
    ours = quant.iloc[1:]
    q_colors, _ = plotting.colors(ours["variant"])
    # A legend, not labels that collide; earlier points drawn larger, so that one hidden under another still shows.
    for k, (r, marker) in enumerate(zip(ours.itertuples(), "osD^vP*X", strict=False)):
        size = max(25, 140 - 25 * k)
        ax.scatter(r.bits_per_element, r.ppl_change_pct, color=q_colors[r.variant], marker=marker, s=size,
                   edgecolor="white", linewidth=0.6, zorder=3 + k, label=r.variant)  # fmt: skip
    ref = quality.QUANT_REFERENCES
    for r, marker in zip(ref.itertuples(), "x+", strict=False):
        ax.scatter(r.bits_per_element, r.ppl_change_pct, marker=marker, color="grey", s=60, zorder=3,
                   label="theirs: " + r.reference.split(":")[0].replace(" quantized-cache", ""))  # fmt: skip
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.0, color="lightgrey", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=0.1)  # changes from -0.1% to +20%: linear within +-0.1%, log beyond
    xs = pd.concat([ours["bits_per_element"], ref["bits_per_element"]])
    ax.set_xlim(xs.min() - 0.5, xs.max() + 0.5)  # no point on the frame
    ys = pd.concat([ours["ppl_change_pct"], ref["ppl_change_pct"]])
    ax.set_ylim(min(ys.min(), 0) * 1.5 - 0.05, max(ys.max(), 1.0) * 2)
    plotting.label(ax, "Dotted: +1% perplexity", "effective bits per stored K/V element (bits)",
                   "perplexity change vs full cache (%, symmetric log scale)")  # fmt: skip
    ax.legend(fontsize=8, title="ours (measured) / theirs (claims)", title_fontsize=8)
    return fig


def best_saving_headline(quant: pd.DataFrame, quant_tokens: int, text: Text) -> HeadlineRow | None:
    """Headline row: the best KV memory saving (%) within +1% perplexity (quality.best_saving_within), quantized
    layouts only (their saving per token holds at any length); None when no variant stayed within +1%."""
    best = quality.best_saving_within(quant, 1.0)
    if best is None:
        return None
    return row("best_saving_within_1pct", "Best KV memory saving within +1% perplexity", best["saving_pct"], "%",
               headline=text.meaningful, note=f"{best['variant']}: perplexity {best['ppl_change_pct']:+.2f}%, "
               f"{quant_tokens} tokens of {text.name}; quantized layouts")  # fmt: skip


def frontier_sentence(quant: pd.DataFrame, meaningful: bool) -> str:
    """Markdown: the best memory saving within +1% perplexity (or that none stayed within it) and the largest loss
    among the quantized variants, with its bits per element."""
    best = quality.best_saving_within(quant, 1.0)
    worst = quant.iloc[1:].sort_values("ppl_change_pct").iloc[-1]
    return (
        (f"Best memory saving within +1% perplexity: **{best['saving_pct']:.1f}%** ({best['variant']}, "
         f"{best['ppl_change_pct']:+.2f}%). " if best is not None
         else "No lossy variant stayed within +1% perplexity. ")
        + f"The largest loss: {worst['variant']} at {worst['ppl_change_pct']:+.2f}% "
        f"({worst['bits_per_element']:.2f} bits per element). "
        + ("" if meaningful else "(Random weights: meaningless.)")
    )  # fmt: skip


# ---- what each quantized cache costs per decode step -----------------------------------------------------------


def tpot_spread(r: pd.Series) -> study.Spread:
    """A latency row's TPOT as a Spread: median (ms), min and max over its repeats (a min–max range)."""
    return study.Spread(r["tpot_ms"], r["tpot_ms_min"], r["tpot_ms_max"], int(r["repeats"]))


def latency_sentence(latency: pd.DataFrame, repeats: int) -> str:
    """Markdown: each quantized variant's decode step against its own engine's full-precision cache (x), slower or
    faster only when their min–max ranges are apart (kvlib.core.stats). `latency`: quality.decode_latency's."""
    timed = latency[latency["status"] == "ok"].set_index("variant")
    parts = []
    for engine, full_label in (("kvlib", FULL), ("hf", HF_FULL)):
        if full_label not in timed.index:
            continue
        base = tpot_spread(timed.loc[full_label])
        for label, r in timed[(timed["engine"] == engine) & (timed.index != full_label)].iterrows():
            apart = tpot_spread(r).separated(base)
            how = (f"n too small: fewer than {study.MIN_REPEATS} repeats" if apart is None
                   else "no measurable difference: ranges overlap" if not apart
                   else "slower" if r["tpot_ms"] > base.median else "faster")  # fmt: skip
            parts.append(f"{label} {r['tpot_vs_full']:.2f}x ({how})")
    base_ms = timed.loc[FULL, "tpot_ms"]
    return (
        f"Per decode step, against the same engine's full-precision cache (kvlib's: {base_ms:.3g} ms; min–max ranges "
        f"over {repeats} repeats compared): " + "; ".join(parts) + ". A quantized cache reads fewer bytes but "
        "quantizes each new token and dequantizes what it attends to: which of the two wins shows in these ratios."
    )


# ---- greedy text -----------------------------------------------------------------------------------------------


def divergence_table(div: pd.DataFrame) -> pd.DataFrame:
    """First divergence step per variant (rows) and prompt (columns); blank where the continuation never left the
    full cache's. `div`: quality.greedy_divergence's."""
    return div.pivot_table(index="variant", columns="prompt", values="first_divergence_step", aggfunc="first")


# ---- every lossy layout against the exact cache: KL divergence and top-1 agreement --------------------------------

KLD_CAPTION = (
    "Mean KL divergence from the exact cache's next-token distribution (nats, log scale) against the bytes each layout "
    "holds per passage, as a share of a 16-bit full cache; bars: 95% block-bootstrap intervals. The grey band is the "
    "noise floor (two exact paths compared): a point inside it is indistinguishable from exact."
)


def kld_figure(table: pd.DataFrame, model_name: str, span: str) -> Figure:
    """Mean KLD (log y, 95% CI bars) against bytes held as % of a 16-bit full cache (x), one marker per lossy
    layout (agreement.measure's table; its colour from the study's palette), everything below the floor's upper
    bound shaded. Layouts with equal measures are drawn once with their labels joined; layouts at one x are spread
    sideways a little so that none hides another."""
    fig, ax = plotting.figure(width=9, height=4.8, title=f"What each lossy cache changes, {model_name}")
    lossy = table[table["kind"] == "lossy"]
    hi_floor = max(agreement.floor_bound(table), 1e-15)
    groups = [g for _, g in lossy.groupby(["kld_mean", "vs_16bit_pct"], sort=False)]
    colours, _ = plotting.colors(lossy["variant"])
    at_x: dict[float, int] = {}
    span_x = max(float(lossy["vs_16bit_pct"].max() - lossy["vs_16bit_pct"].min()), 10.0)
    for k, g in enumerate(groups):
        r = g.iloc[0]
        n_here = sum(float(h.iloc[0].vs_16bit_pct) == float(r.vs_16bit_pct) for h in groups)
        i = at_x.setdefault(float(r.vs_16bit_pct), 0)
        at_x[float(r.vs_16bit_pct)] += 1
        x = r.vs_16bit_pct + (i - (n_here - 1) / 2) * 0.012 * span_x
        y = max(r.kld_mean, 1e-15)
        err = [[max(y - r.kld_lo, 0)], [max(r.kld_hi - y, 0)]]
        marker = "osD^vP*Xhp"[k % 10]
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor=colours[r.variant], capsize=3, zorder=3)
        ax.scatter(x, y, marker=marker, color=colours[r.variant], s=70, edgecolor="white", linewidth=0.6, zorder=4,
                   label=" = ".join(g["variant"]))  # fmt: skip
    ax.set_yscale("log")
    bottom = min(hi_floor / 3, float(lossy["kld_lo"].clip(lower=1e-15).min()) / 3)
    ax.axhspan(bottom, hi_floor, color="lightgrey", alpha=0.7, zorder=1, label="noise floor: exact vs exact")
    ax.set_ylim(bottom=bottom)
    plotting.label(ax, span, "bytes held per passage (% of a 16-bit full cache)", "mean KL divergence (nats)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def agreement_headlines(table: pd.DataFrame, span: str, meaningful: bool) -> list[HeadlineRow]:
    """Headline rows: the noise floor's KLD (upper interval end), and the lowest-KLD layout among those holding at
    most half of a 16-bit full cache, with its top-1 agreement (none when no layout holds that little)."""
    floor = table[table["kind"] == "floor"]
    rows = [row("kld_floor", "Noise floor: KLD between two exact paths (upper 95% bound)", agreement.floor_bound(table),
                "nats", note=f"{span}; {', '.join(floor['variant'])}")]  # fmt: skip
    small = table[(table["kind"] == "lossy") & (table["vs_16bit_pct"] <= 50)].sort_values("kld_mean")
    if len(small):
        b = small.iloc[0]
        rows.append(row("kld_best_half", "Lowest KLD holding at most half a 16-bit cache", float(b.kld_mean), "nats",
                        headline=meaningful, note=f"{b.variant}: 95% CI {b.kld_lo:.2g}-{b.kld_hi:.2g}, top-1 "
                        f"agreement {b.top1_pct:.1f}%, {b.vs_16bit_pct:.0f}% of a 16-bit cache; {span}"))  # fmt: skip
    return rows
