"""Notebook 02's page: naive decoding against kvlib's cached decoders, measured.

One concept: what a KV cache buys. The same model, prompt and number of new tokens are decoded greedily without a
cache (naive: every step re-runs the whole sequence so far) and with each kvlib cache layout, by the harness
(kvlib.measure.harness, interleaved repeats after warm-up runs). The functions here check the page's parameters,
turn the harness's tidy frames (with kvlib.study.with_units' ms columns) into the page's figures, markdown sentences
and headline rows (keyword arguments of kvlib.study.Outputs.headline: `out.headline(**row)`), and run the check that
cached decoding gives the naive tokens. Every "faster"/"slower"/"grew" follows the study's one rule for "different"
(kvlib.core.stats, through study.Spread and study.spread_caveat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from kvlib import study
from kvlib.caches.base import REFERENCE
from kvlib.core.errors import KvlibError
from kvlib.measure.harness import RunSpec
from kvlib.measure.roofline import bandwidth_source
from kvlib.models.decode import generate
from kvlib.models.prompts import prompts_for
from kvlib.study import plotting

NAIVE = "none"  # the cache name of the naive baseline (no cache), as the harness and the `caches` parameter spell it
HeadlineRow = dict[str, Any]  # the keyword arguments of kvlib.study.Outputs.headline: out.headline(**row)
SUMMARY_COLUMNS = ["ttft_ms", "tpot_p50_ms", "total_time_s", "decode_tokens_per_s", "mbu"]

# ---- parameters ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 02's own parameters, checked (see check_parameters), and the harness's run specs built from them.
    Sizes are token counts; `caches` holds NAIVE and at least one kvlib cache layout, in the order given."""

    prompt_len: int
    max_new_tokens: int
    batch_size: int
    caches: list[str]
    repeats: int
    warmup: int
    check_new_tokens: int
    specs: list[RunSpec]

    @property
    def cached(self) -> list[str]:
        """The cache layouts measured (every entry of `caches` but the naive baseline), in the order given."""
        return [c for c in self.caches if c != NAIVE]

    @property
    def main(self) -> str:
        """The cache the headline numbers quote: the reference layout if measured, else the first one given."""
        return headline_layout(self.cached)


def headline_layout(cached: list[str]) -> str:
    """The cache layout the headline numbers quote: kvlib.caches.base.REFERENCE if in `cached`, else cached[0]."""
    return REFERENCE if REFERENCE in cached else cached[0]


def check_parameters(
    model: str,
    weights: str,
    device: str,
    dtype: str,
    seed: int,
    *,
    prompt_len: Any,
    max_new_tokens: Any,
    batch_size: Any,
    caches: Any,
    repeats: Any,
    warmup: Any,
    check_new_tokens: Any,
) -> Parameters:
    """Every parameter checked before anything runs (values as papermill passes them: "[none, static]" text too);
    a one-line KvlibError naming the parameter otherwise. Builds and validates one kvlib RunSpec per cache and checks
    that prompt_len + check_new_tokens fits the model's context. Loads no model and writes nothing."""
    prompt_len = study.positive_int("prompt_len", prompt_len)
    max_new_tokens = study.positive_int("max_new_tokens", max_new_tokens, minimum=2)
    batch_size = study.positive_int("batch_size", batch_size)
    caches = study.str_list("caches", caches)
    repeats = study.positive_int("repeats", repeats)
    warmup = study.positive_int("warmup", warmup, minimum=0)
    check_new_tokens = study.positive_int("check_new_tokens", check_new_tokens)
    if NAIVE not in caches or len(caches) < 2:
        raise KvlibError(f"caches must hold 'none' (the naive baseline) and at least one cache layout, got {caches}")
    specs = [
        RunSpec("kvlib", c, model, weights, batch_size, prompt_len, max_new_tokens, device, dtype, seed) for c in caches
    ]
    for spec in specs:
        spec.validate()
    study.check_context(study.model_config(model), prompt_len, check_new_tokens, "prompt_len + check_new_tokens")
    return Parameters(prompt_len, max_new_tokens, batch_size, caches, repeats, warmup, check_new_tokens, specs)


# ---- measurements ----------------------------------------------------------------------------------------------


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Median per path of TTFT (ms), median step latency (ms), total time (s), decode throughput (tokens/s) and MBU
    (a fraction), from the harness's runs with units (kvlib.study.with_units): one row per path."""
    return runs.groupby("path")[SUMMARY_COLUMNS].median()


def edge(steps: pd.DataFrame, path: str, first: bool) -> study.Spread:
    """Latency (ms) of the first (or last) tenth of the decode steps of `path`, over every repeat."""
    s = steps[steps["path"] == path]
    k = max(1, s["step"].nunique() // 10)
    e = s[s["step"] < k] if first else s[s["step"] >= s["step"].max() - k + 1]
    return study.Spread.of(e["latency_ms"])


def speedups(runs: pd.DataFrame, cached: list[str]) -> dict[str, study.Spread]:
    """Per cache layout of `cached`: naive / cached total time, paired by repeat (study.paired_ratio), as a Spread
    (median and quartiles of the per-repeat ratios; above 1: the cache was faster)."""
    return {
        c: study.Spread.of(study.paired_ratio(runs, "total_time_s", {"cache": NAIVE}, {"cache": c})) for c in cached
    }


def condition(lm: Any, batch_size: int, prompt_len: int, max_new_tokens: int) -> str:
    """What the headline numbers hold for: model, dtype, device and sizes (the rows' `condition` field)."""
    return f"{study.condition(lm)}, batch {batch_size}, prompt {prompt_len}, {max_new_tokens} new"


def token_check(
    lm: Any, caches: list[str], batch_size: int, prompt_len: int, new_tokens: int, seed: int
) -> tuple[pd.DataFrame, dict[str, bool]]:
    """One more greedy generation of `new_tokens` tokens per cache (NAIVE included) on the harness's prompts. Returns
    the first sequence's tokens (index "new token", one column per path label) and, per cache layout, whether its
    tokens (every sequence of the batch) equal the naive ones."""
    ids = prompts_for(lm.cfg.vocab_size, lm.tokenizer, batch_size, prompt_len, seed, lm.device)  # the harness's
    gens = {c: generate(lm.model, ids, new_tokens, cache=c) for c in caches}
    tokens = pd.DataFrame({study.path_label("kvlib", c): g.tokens[0].tolist() for c, g in gens.items()})
    tokens.index.name = "new token"
    identical = {c: bool(torch.equal(gens[c].tokens, gens[NAIVE].tokens)) for c in caches if c != NAIVE}
    return tokens, identical


# ---- figures ---------------------------------------------------------------------------------------------------


def step_latency_figure(steps: pd.DataFrame, model_name: str, batch_size: int, prompt_len: int) -> Figure:
    """Two panels of decode-step latency (ms) against position (tokens already in the sequence), one line per path
    with its interquartile band over repeats, both linear from 0 (how a step grows with the position is the point,
    which a log scale would flatten): every path, then the cached paths alone, on their own scale."""
    fig, axes = plotting.figure(
        ncols=2, title=f"Decode-step latency against position, {model_name}, batch {batch_size}, prompt {prompt_len}"
    )
    plotting.lines(steps, "position", "latency_ms", "path", axes[0])
    axes[0].set_ylim(bottom=0)
    plotting.keep_linear(axes[0])
    plotting.legend_below(axes[0])
    plotting.label(axes[0], "All paths", "position: tokens already in the sequence (count)", "decode-step latency (ms)")
    plotting.lines(steps[steps["cache"] != NAIVE], "position", "latency_ms", "path", axes[1])
    axes[1].set_ylim(bottom=0)
    plotting.legend_below(axes[1])
    plotting.label(
        axes[1], "Cached paths only", "position: tokens already in the sequence (count)", "decode-step latency (ms)"
    )
    return fig


def totals_figure(runs: pd.DataFrame, model_name: str, batch_size: int, max_new_tokens: int) -> Figure:
    """Two panels, one point per path with its interquartile range over repeats: total time of a generation (s) and
    median time per output token (ms)."""
    fig, axes = plotting.figure(ncols=2, title=f"{max_new_tokens} new tokens, {model_name}, batch {batch_size}")
    plotting.points(runs, "path", "total_time_s", None, axes[0])
    plotting.label(axes[0], "Total time of a generation", "decoding path (name)", "total time (s)")
    plotting.points(runs, "path", "tpot_p50_ms", None, axes[1])
    plotting.label(axes[1], "Median time per output token", "decoding path (name)", "per-token latency (ms)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=15)
    return fig


# ---- sentences -------------------------------------------------------------------------------------------------


def step_trend_text(steps: pd.DataFrame, main: str, prompt_len: int, max_new_tokens: int) -> str:
    """Markdown: how a naive and a `main`-cache decode step's latency changed from the first to the last tenth of
    the steps (medians, ms), and what the spread allows to say about it. `steps`: the harness's steps with units."""
    naive, best = study.path_label("kvlib", NAIVE), study.path_label("kvlib", main)
    e_n0, e_n1 = edge(steps, naive, True), edge(steps, naive, False)
    e_c0, e_c1 = edge(steps, best, True), edge(steps, best, False)
    n0, n1, c0, c1 = e_n0.median, e_n1.median, e_c0.median, e_c1.median
    first_pos, last_pos = prompt_len, prompt_len + max_new_tokens - 2
    if steps["step"].nunique() < 2:  # one decode step per run: a single position, no trend
        return (
            f"Each run has a single decode step (max_new_tokens = {max_new_tokens}), at position {first_pos}: there "
            f"is no trend against position to report. That step cost {n0:.1f} ms naively and {c0:.2f} ms with the "
            f"{main} cache ({n0 / c0:.1f}x)."
        )
    text = (
        f"From position {first_pos} to {last_pos}, a naive step went from **{n0:.1f} ms to {n1:.1f} ms** "
        f"({n1 / n0:.1f}x), a {main}-cache step from **{c0:.2f} ms to {c1:.2f} ms** ({c1 / c0:.2f}x) (medians of the "
        f"first and last tenth of the steps). At the start a naive step cost {n0 / c0:.1f}x a cached one, at the end "
        f"{n1 / c1:.1f}x."
    )
    naive_grew = e_n0.separated(e_n1)
    if naive_grew is False or (naive_grew and n1 / n0 < 1.2):
        text += (
            " **Unexpected:** the naive step barely grew with the position; at these sizes its cost is dominated by "
            "work that does not depend on the length (the weights, the language-model head)."
        )
    cached_grew = e_c0.separated(e_c1)
    if c1 / c0 > 1.5 and cached_grew:
        text += (
            f" The cached step grew noticeably too ({c1 / c0:.1f}x): attention over the cache reads every stored key "
            "and value, which starts to matter at these lengths."
        )
    elif c1 / c0 > 1.5:
        text += f" The cached step's {c1 / c0:.1f}x is {study.spread_caveat(cached_grew, 'steps and repeats')}."
    return text


def speedup_lines(ratios: dict[str, study.Spread]) -> list[str]:
    """One markdown bullet per cache layout: faster or slower than naive only when the paired ratio's interval
    excludes 1 (kvlib.core.stats), else the ratio with the caveat. `ratios`: speedups()."""
    lines = []
    for c, ratio in ratios.items():
        faster = ratio.median >= 1
        how = (  # faster or slower only when the paired ratio's interval excludes 1 (kvlib.core.stats)
            f"**{ratio.median if faster else 1 / ratio.median:.2f}x** {'faster' if faster else 'slower'} than naive"
            if ratio.excludes(1)
            else f"naive / cached total time {ratio.median:.2f}x"
        )
        lines.append(
            f"- {c} cache: {how} (naive / cached total time, IQR {ratio.q25:.2f}–{ratio.q75:.2f}, {ratio.n} paired "
            "repeats"
            + (f"; {study.spread_caveat(ratio.excludes(1), 'paired repeats')}" if not ratio.excludes(1) else "")
            + ")"
        )
    return lines


def _main_spreads(runs: pd.DataFrame, main: str) -> tuple[study.Spread, study.Spread, study.Spread, study.Spread]:
    """TTFT (ms), median step (ms) and MBU (%) of the `main` cache's runs, and the naive median step (ms)."""
    ttft = study.Spread.of(runs.loc[runs["cache"] == main, "ttft_ms"])
    tpot = study.Spread.of(runs.loc[runs["cache"] == main, "tpot_p50_ms"])
    tpot_naive = study.Spread.of(runs.loc[runs["cache"] == NAIVE, "tpot_p50_ms"])
    mbu = study.Spread.of(runs.loc[runs["cache"] == main, "mbu"]).scaled(100)  # as a percentage
    return ttft, tpot, tpot_naive, mbu


def _bandwidths(runs: pd.DataFrame, main: str) -> pd.Series:
    """The read bandwidth (bytes/s) each of the `main` cache's runs divided its MBU by; empty without the column."""
    if "bandwidth_bytes_per_s" not in runs:
        return pd.Series(dtype=float)
    return runs.loc[runs["cache"] == main, "bandwidth_bytes_per_s"]


def totals_text(runs: pd.DataFrame, main: str, ratios: dict[str, study.Spread], max_new_tokens: int) -> str:
    """Markdown: the verdict on the `main` cache against naive decoding (total times, s, medians; a claim only when
    the paired ratio's interval excludes 1), one bullet per cache layout (speedup_lines), then TTFT, per-token
    latency and MBU with their spreads. `runs`: the harness's runs with units; `ratios`: speedups()."""
    speedup = ratios[main]
    total = runs.groupby("cache")["total_time_s"].median()
    ttft, tpot, tpot_naive, mbu = _main_spreads(runs, main)
    beyond = speedup.excludes(1)  # the paired ratio's interval excludes 1: a real difference; None: n too small
    if beyond is None or (beyond and speedup.median > 1):
        verdict = (
            f"Generating {max_new_tokens} tokens took {total[NAIVE]:.2f} s naively and {total[main]:.2f} s with the "
            f"{main} cache (medians)"
            + (f", {study.spread_caveat(beyond, 'paired repeats')}:" if beyond is None else ":")
        )
    elif beyond is False:  # not apart: no claim either way (kvlib.core.stats)
        verdict = (
            f"These runs could not tell the {main} cache from naive decoding ({total[NAIVE]:.2f} s naive against "
            f"{total[main]:.2f} s; the paired ratio's interquartile range holds 1):"
        )
    else:
        verdict = (
            f"**Contrary to expectation, the {main} cache was slower here** ({total[NAIVE]:.2f} s naive against "
            f"{total[main]:.2f} s; the paired ratio's interval lies below 1):"
        )
    detail = (
        f"With the cache, the first token came after {ttft.text('.1f', 'ms')} and each further token took "
        f"{tpot.text('.2f', 'ms')}; a naive step took {tpot_naive.text('.1f', 'ms')}. "
        + (
            f"A cached step read its bytes at {mbu.median:.3g}% of this machine's read bandwidth (MBU, IQR "
            f"{mbu.q25:.3g}–{mbu.q75:.3g}% over {mbu.n} repeats), against "
            f"{bandwidth_source(_bandwidths(runs, main)) or 'the read bandwidth measured in the runs'}."
            if mbu.n
            else "MBU was not measured (the read bandwidth was skipped, e.g. KVLIB_NO_ROOFLINE=1)."
        )
    )
    if mbu.median > 100:
        detail += (
            " **An MBU above 100% is impossible**: the step cannot read memory faster than the machine can. The "
            "measured read bandwidth understates this machine's (it was likely measured while other work ran, or the "
            "step's reads partly hit the processor's caches), so this MBU is an upper bound on the true one."
        )
    return verdict + "\n\n" + "\n".join(speedup_lines(ratios)) + "\n\n" + detail


def tokens_text(identical: dict[str, bool], new_tokens: int, batch_size: int) -> str:
    """Markdown: per cache layout, whether its tokens were identical to naive decoding's (token_check)."""
    return (
        f"{new_tokens} new tokens for each of {batch_size} sequence(s): "
        + "; ".join(f"{c} cache: **{'identical' if same else 'DIFFERENT'}** to naive" for c, same in identical.items())
        + ". The first sequence:"
    )


# ---- headline rows ---------------------------------------------------------------------------------------------


def row(
    metric: str,
    label: str,
    value: float,
    unit: str,
    spread: study.Spread | None = None,
    headline: bool = False,
    note: str = "",
    layout: str = "",
    condition: str = "",
    baseline: str = "",
) -> HeadlineRow:
    """The keyword arguments of kvlib.study.Outputs.headline for one row (its parameters, in its order): the typed
    fields layout (the cache layout measured), condition (what the number holds for) and baseline (what it is
    compared with) are what the report's findings read."""
    return dict(metric=metric, label=label, value=value, unit=unit, spread=spread, headline=headline, note=note,
                layout=layout, condition=condition, baseline=baseline)  # fmt: skip


def headline_rows(runs: pd.DataFrame, main: str, ratios: dict[str, study.Spread], cond: str) -> list[HeadlineRow]:
    """The page's timing headline rows, in order: speedup of the `main` cache over naive (x; typed fields layout,
    condition and baseline, which the report's findings read), its TTFT (ms), cached and naive median step (ms) and
    MBU (%). `ratios`: speedups(); `cond`: condition()."""
    speedup = ratios[main]
    ttft, tpot, tpot_naive, mbu = _main_spreads(runs, main)
    speedup_caveat = study.spread_caveat(speedup.excludes(1), "paired repeats")
    speedup_note = (
        cond + "; naive / cached total time, paired by repeat" + (f"; {speedup_caveat}" if speedup_caveat else "")
    )
    bandwidth = bandwidth_source(_bandwidths(runs, main), short=True)
    mbu_note = cond + f"; bytes a step must read / (step time x {bandwidth or 'measured read bandwidth'})"
    return [
        row("speedup", f"Speedup of cached ({main}) over naive decoding", speedup.median, "x", speedup, True,
            speedup_note, layout=main, condition=cond, baseline=NAIVE),
        row("ttft_ms", f"Time to first token ({main} cache)", ttft.median, "ms", ttft, True, cond),
        row("tpot_ms", f"Per-token latency, cached ({main}), median step", tpot.median, "ms", tpot, True, cond),
        row("tpot_naive_ms", "Per-token latency, naive, median step", tpot_naive.median, "ms", tpot_naive, False, cond),
        row("mbu", f"Model bandwidth utilisation, cached ({main}) decode", mbu.median, "%", mbu, True, mbu_note),
    ]  # fmt: skip


def tokens_headline(identical: dict[str, bool], new_tokens: int, batch_size: int) -> HeadlineRow:
    """Headline row: how many cache layouts gave tokens identical to naive decoding (paths), of how many."""
    return row("tokens_identical", "Cached paths with tokens identical to naive", sum(identical.values()), "paths",
               note=f"of {len(identical)}; {new_tokens} tokens x batch {batch_size}")  # fmt: skip
