"""Notebook 03's page: Hugging Face `generate` with and without its caches, beside kvlib's decoders.

One concept: whether the cache's gain holds inside a production library, and whether kvlib's numbers agree with it.
Hugging Face's modes (NAIVE: use_cache=False, its DynamicCache, its StaticCache) and kvlib's cached decoders are
timed by the harness (kvlib.measure.harness: interleaved repeats after warm-up runs, TTFT from before the cache is
created); every path's tokens and logits are compared by kvlib.measure.verify. The functions here check the page's
parameters and turn the tidy frames (with kvlib.study.with_units' ms columns) into the page's figure, markdown
sentences and headline rows (keyword arguments of kvlib.study.Outputs.headline: `out.headline(**row)`). A ratio is
"faster" or "slower" only by the study's one rule for "different" (kvlib.core.stats, through study.Spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from kvlib import study
from kvlib.measure.harness import RunSpec
from kvlib.measure.verify import verify
from kvlib.study import plotting

NAIVE = "none"  # the cache mode without a cache: Hugging Face's use_cache=False
HF_MODES = [NAIVE, "dynamic", "static"]  # Hugging Face's cache modes, in the order the figure shows them
HeadlineRow = dict[str, Any]  # the keyword arguments of kvlib.study.Outputs.headline: out.headline(**row)
SUMMARY_COLUMNS = ["ttft_ms", "tpot_p50_ms", "decode_tokens_per_s", "tokens_per_s", "total_time_s"]
PANELS = [  # the figure's panels: runs' column, title, y label
    ("ttft_ms", "Time to first token", "TTFT (ms)"),
    ("tpot_p50_ms", "Per-token latency (median step)", "latency per token (ms)"),
    ("decode_tokens_per_s", "Decode throughput", "tokens generated per second (tokens/s)"),
]

# ---- parameters ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """Notebook 03's own parameters, checked (see check_parameters), and the harness's run specs built from them
    (Hugging Face's modes first, then kvlib's caches). Sizes are token counts."""

    prompt_len: int
    max_new_tokens: int
    batch_size: int
    hf_caches: list[str]
    kvlib_caches: list[str]
    repeats: int
    warmup: int
    check_new_tokens: int
    specs: list[RunSpec]


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
    hf_caches: Any,
    kvlib_caches: Any,
    repeats: Any,
    warmup: Any,
    check_new_tokens: Any,
) -> Parameters:
    """Every parameter checked before anything runs (values as papermill passes them: "[none, static]" text too);
    a one-line KvlibError naming the parameter otherwise. Builds and validates one RunSpec per Hugging Face mode
    and per kvlib cache, and checks that prompt_len + check_new_tokens fits the model's context. Loads no model and
    writes nothing."""
    prompt_len = study.positive_int("prompt_len", prompt_len)
    max_new_tokens = study.positive_int("max_new_tokens", max_new_tokens, minimum=2)
    batch_size = study.positive_int("batch_size", batch_size)
    hf_caches = study.str_list("hf_caches", hf_caches, choices=HF_MODES)
    kvlib_caches = study.str_list("kvlib_caches", kvlib_caches)
    repeats = study.positive_int("repeats", repeats)
    warmup = study.positive_int("warmup", warmup, minimum=0)
    check_new_tokens = study.positive_int("check_new_tokens", check_new_tokens)
    specs = [
        RunSpec(engine, c, model, weights, batch_size, prompt_len, max_new_tokens, device, dtype, seed)
        for engine, modes in (("hf", hf_caches), ("kvlib", kvlib_caches))
        for c in modes
    ]
    for spec in specs:
        spec.validate()
    study.check_context(study.model_config(model), prompt_len, check_new_tokens, "prompt_len + check_new_tokens")
    return Parameters(
        prompt_len, max_new_tokens, batch_size, hf_caches, kvlib_caches, repeats, warmup, check_new_tokens, specs
    )


# ---- measurements ----------------------------------------------------------------------------------------------


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Median per path of TTFT (ms), median step latency (ms), decode and overall throughput (tokens/s) and total
    time (s), from the harness's runs with units (kvlib.study.with_units): one row per path."""
    return runs.groupby("path")[SUMMARY_COLUMNS].median()


def hf_speedups(runs: pd.DataFrame, hf_caches: list[str]) -> dict[str, study.Spread]:
    """Per Hugging Face cache mode: use_cache=False total time / cached total time, paired by repeat, as a Spread
    (above 1: the cache was faster); empty when NAIVE was not measured."""
    if NAIVE not in hf_caches:
        return {}
    return {
        c: study.Spread.of(
            study.paired_ratio(runs, "total_time_s", {"engine": "hf", "cache": NAIVE}, {"engine": "hf", "cache": c})
        )
        for c in hf_caches
        if c != NAIVE
    }


def kvlib_over_hf(
    runs: pd.DataFrame, kvlib_caches: list[str], hf_caches: list[str]
) -> dict[str, tuple[study.Spread, study.Spread]]:
    """Per cache measured by both engines: kvlib / Hugging Face median step latency and TTFT, paired by repeat, as
    Spreads (below 1: kvlib was faster)."""
    out = {}
    for c in (c for c in kvlib_caches if c in hf_caches):
        tp = study.Spread.of(
            study.paired_ratio(runs, "tpot_p50_s", {"engine": "kvlib", "cache": c}, {"engine": "hf", "cache": c})
        )
        tt = study.Spread.of(
            study.paired_ratio(runs, "ttft_s", {"engine": "kvlib", "cache": c}, {"engine": "hf", "cache": c})
        )
        out[c] = (tp, tt)
    return out


def agreement(lm: Any, batch_size: int, prompt_len: int, new_tokens: int, seed: int) -> pd.DataFrame:
    """kvlib.measure.verify on every path (`new_tokens` greedy tokens on the same prompts): one row per path with
    its comparison against Hugging Face's use_cache=False (tokens, largest logit difference, tolerance) and `ok`."""
    results = verify(lm, batch_size, prompt_len, new_tokens, seed)
    return pd.DataFrame([vars(r) | {"ok": r.ok} for r in results])


# ---- figures ---------------------------------------------------------------------------------------------------


def comparison_figure(runs: pd.DataFrame, model_name: str, batch_size: int, prompt_len: int) -> Figure:
    """Three panels (TTFT in ms, median per-token latency in ms, decode throughput in tokens/s) against the cache
    mode, one series per engine, points with their interquartile ranges over repeats."""
    fig, axes = plotting.figure(
        ncols=3,
        width=4.8,
        title=f"Hugging Face generate vs kvlib, {model_name}, batch {batch_size}, prompt {prompt_len}",
    )
    for ax, (col, title, unit) in zip(axes, PANELS, strict=True):
        plotting.points(runs, "cache", col, "engine", ax, order=HF_MODES)
        plotting.label(ax, title, "cache mode (name)", unit)
    return fig


def comparison_caption(repeats: int) -> str:
    """The comparison figure's caption: its error bars, and what cache mode none means."""
    return plotting.iqr_note(repeats) + " Cache mode none: no cache (use_cache=False)."


# ---- sentences -------------------------------------------------------------------------------------------------


def comparison_lines(hf: dict[str, study.Spread], both: dict[str, tuple[study.Spread, study.Spread]]) -> list[str]:
    """Markdown bullets: each Hugging Face cache's speed against use_cache=False (`hf`: hf_speedups; "slower,
    contrary to expectation" only when the interval lies below 1, else the caveat when not beyond the spread), then
    kvlib / Hugging Face per-token latency and TTFT per cache both measured (`both`: kvlib_over_hf)."""
    lines = []
    for c, r in hf.items():
        beyond = r.excludes(1)  # the paired ratio's interval excludes 1; None: n too small (kvlib.core.stats)
        if beyond and r.median <= 1:
            verdict = (
                " — **slower, contrary to expectation**: at these sizes `generate`'s fixed cost per step outweighs "
                "the recomputation the cache saves"
            )
        else:
            verdict = "" if beyond else f" ({study.spread_caveat(beyond, 'paired repeats')})"
        lines.append(
            f"- Hugging Face with its {c} cache: **{r.median:.2f}x** the speed of use_cache=False (use_cache=False "
            f"total time / cached total time, IQR {r.q25:.2f}–{r.q75:.2f}){verdict}"
        )
    for c, (tp, tt) in both.items():
        tp_caveat = study.spread_caveat(tp.excludes(1), "paired repeats")
        lines.append(
            f"- {c} cache, kvlib / Hugging Face: per-token latency **{tp.median:.2f}x** "
            f"(IQR {tp.q25:.2f}–{tp.q75:.2f}{'; ' + tp_caveat if tp_caveat else ''}), time to first token "
            f"{tt.median:.2f}x"
        )
    return lines


def comparison_text(runs: pd.DataFrame, lines: list[str]) -> str:
    """Markdown: the bullets of comparison_lines (or why there is nothing to compare pairwise), the fastest and
    slowest path by median per-token latency (ms; "fastest" with a caveat unless apart from the runner-up), and
    what both engines' TTFT counts. `runs`: the harness's runs with units."""
    med = runs.groupby("path")["tpot_p50_ms"].median()
    fastest, slowest = med.idxmin(), med.idxmax()
    if len(med) > 1:  # "fastest" only when apart from the next fastest (kvlib.core.stats)
        runner_up = med.drop(fastest).idxmin()
        apart = study.Spread.of(runs.loc[runs["path"] == fastest, "tpot_p50_ms"]).separated(
            study.Spread.of(runs.loc[runs["path"] == runner_up, "tpot_p50_ms"])
        )
        fastest_caveat = "" if apart else f", not apart from {runner_up}: {study.spread_caveat(apart)}"
    return (
        (
            "Medians over paired repeats (a ratio below 1 means kvlib was faster):\n\n" + "\n".join(lines)
            if lines
            else "Nothing to compare pairwise: no Hugging Face run without a cache (none) and no cache measured by "
            "both engines."
        )
        + (
            f"\n\nFastest median per-token latency: {fastest} ({med[fastest]:.2f} ms{fastest_caveat}); slowest: "
            f"{slowest} ({med[slowest]:.2f} ms). "
            if len(med) > 1
            else f"\n\nOnly one path was measured ({fastest}, {med[fastest]:.2f} ms per token). "
        )
        + "Both engines' times to first token start at the same point, before the cache "
        "is created: it counts creating the cache, the prefill and the first token, and for Hugging Face also "
        "`generate`'s own set-up (argument checks), which kvlib does not have."
    )


def agreement_text(table: pd.DataFrame) -> str:
    """Markdown: every path agrees (with the largest logit difference and the tolerance), or which paths do not.
    `table`: agreement()."""
    bad = table.loc[~table["ok"], "path"].tolist()
    return (
        f"**All {len(table)} paths agree**: identical tokens, largest logit difference "
        f"{table['max_abs_logit_diff'].max():.1e} (tolerance {table['tolerance'].iloc[0]:.1e})."
        if not bad
        else f"**Disagreement** on {', '.join(bad)}: see the table."
    )


# ---- headline rows ---------------------------------------------------------------------------------------------


def row(
    metric: str, label: str, value: float, unit: str, spread: study.Spread | None = None, note: str = ""
) -> HeadlineRow:
    """The keyword arguments of kvlib.study.Outputs.headline for one of the page's rows (none on the index)."""
    return dict(metric=metric, label=label, value=value, unit=unit, spread=spread, note=note)


def headline_rows(
    hf: dict[str, study.Spread],
    both: dict[str, tuple[study.Spread, study.Spread]],
    max_new_tokens: int,
    prompt_len: int,
) -> list[HeadlineRow]:
    """The page's timing headline rows, in order: each Hugging Face cache's speedup over use_cache=False (x; `hf`:
    hf_speedups), then kvlib / Hugging Face per-token latency per cache both measured (ratio; `both`:
    kvlib_over_hf)."""
    note = f"total time, {max_new_tokens} new tokens, prompt {prompt_len}"
    rows = [
        row(f"hf_speedup_{c}", f"Speedup of HF {c} cache over use_cache=False", r.median, "x", r, note)
        for c, r in hf.items()
    ]
    return rows + [
        row(f"kvlib_over_hf_tpot_{c}", f"Per-token latency, kvlib / HF ({c} cache)", tp.median, "ratio", tp)
        for c, (tp, _) in both.items()
    ]


def agreement_headline(table: pd.DataFrame, new_tokens: int) -> HeadlineRow:
    """Headline row: how many paths agree with Hugging Face's use_cache=False in tokens and logits (paths), of how
    many. `table`: agreement()."""
    return row("paths_agreeing", "Paths agreeing with HF use_cache=False (tokens and logits)", int(table["ok"].sum()),
               "paths", note=f"of {len(table)}; {new_tokens} new tokens")  # fmt: skip
