"""Notebook 06's long-context section: the decode step where the cache outweighs the weights.

At short prompts the cache is a few percent of the bytes a decode step reads, so no figure of the prompt sweep shows
the regime a KV cache study is about. This section times the step at long contexts and a batch (SmolLM2 float32:
45 KiB of cache a token, so batch 4 x 4096 tokens is 720 MiB against 513 MiB of weights), kvlib's static and int8
caches against Hugging Face's two, from one shared prefill (kvlib.measure.bench.long, the bench's long rows), and
says what it shows against the memory floor: `check_parameters`, `measure`, `figure`, `caption`, `sentence`,
`headline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from kvlib import study
from kvlib.core.stats import Spread
from kvlib.measure.bench.long import LongResult, LongRow, long_spec, measure_long
from kvlib.measure.harness import ModelPool
from kvlib.measure.roofline import machine_probe, roofline_enabled
from kvlib.study import plotting

PATHS = {  # the bench's engine labels -> how the study's figures name a path (and colour it)
    "kvlib static": "kvlib static cache",
    "kvlib int8": "kvlib int8 cache",
    "hf-dynamic": "hf dynamic cache",
    "hf-static": "hf static cache",
}
NO_LONG_TEXT = "No long-context rows in this profile (long_contexts is empty)."


@dataclass(frozen=True)
class LongSweep:
    """The section's checked parameters: `row` (model, batch, the longest context, dtype), the contexts, the
    counted rounds, the weights, device and seed."""

    row: LongRow
    contexts: list[int]
    rounds: int
    weights: str
    device: str
    seed: int


def check_parameters(
    *,
    model: str,
    weights: str,
    device: str,
    dtype: str,
    seed: int,
    long_contexts: Any,
    long_batch: Any,
    long_rounds: Any,
) -> LongSweep | None:
    """The section's parameters, checked before anything runs (a one-line KvlibError naming the first bad one);
    None when `long_contexts` is empty (the section is skipped). The longest context plus the rounds must fit the
    model's context."""
    contexts = [] if long_contexts in ([], "[]", "", None) else study.int_list("long_contexts", long_contexts)
    if not contexts:
        return None
    batch = study.positive_int("long_batch", long_batch)
    rounds = study.positive_int("long_rounds", long_rounds)
    row = LongRow(model, batch, max(contexts), dtype)
    long_spec(row, rounds, weights, device, seed)  # fits the model's context; a preset without sliding layers, with HF
    return LongSweep(row, contexts, rounds, weights, device, seed)


def measure(sweep: LongSweep, pool: ModelPool) -> LongResult:
    """The section's rows and steps (`measure_long`), MBU against this report's machine probe (NaN when the
    roofline is off)."""
    bandwidth = machine_probe(sweep.device, sweep.row.dtype).bandwidth_bytes_per_s if roofline_enabled() else math.nan
    return measure_long(
        sweep.row, pool, sweep.rounds, bandwidth, sweep.seed, sweep.device, sweep.contexts, weights=sweep.weights
    )


def tidy(result: LongResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, steps) as DataFrames, each with a `path` column naming the engine as the study's figures do."""
    rows, steps = pd.DataFrame(result.rows), pd.DataFrame(result.steps)
    return rows.assign(path=rows["engine"].map(PATHS)), steps.assign(path=steps["engine"].map(PATHS))


def figure(rows: pd.DataFrame, steps: pd.DataFrame, weight_bytes: float, where: str) -> Figure:
    """Two panels against the context (tokens each step attends over): the decode step (ms; median and interquartile
    band over the rounds) of every path, with the memory floor of kvlib's full-precision and int8 caches dotted; and the
    cache each path holds (MiB), with the weights' bytes as a grey line (where the cache outweighs them)."""
    batch = int(rows["batch_size"].iloc[0])
    fig, axes = plotting.figure(ncols=2, width=5.5, height=3.8, title=f"Long contexts, {where}, batch {batch}")
    step_ax, mem_ax = list(axes)
    plotting.lines(steps, "context", "latency_ms", "path", step_ax)
    floors = []
    dtype = str(rows["dtype"].iloc[0])
    for engine, name in (("kvlib static", f"{dtype} cache"), ("kvlib int8", "int8 cache")):
        r = rows[rows["engine"] == engine].sort_values("context")
        colour = plotting.color(PATHS[engine])
        floors += step_ax.plot(r["context"], r["floor_ms"], ls=":", lw=1.6, color=colour, label=f"floor, {name}")
        mem_ax.plot(
            r["context"], r["cache_mib"], marker="o", color=colour,
            label=f"{dtype} cache (kvlib static, both HF caches)" if engine == "kvlib static" else "int8 cache",
        )  # fmt: skip
    plotting.extend_legend(step_ax, floors)
    plotting.label(step_ax, "Decode step", "context (tokens)", "step (ms)")
    mem_ax.axhline(weight_bytes / 2**20, color=plotting.NEUTRAL, lw=1.2, ls="--", label="weights (read every step)")
    mem_ax.legend()
    plotting.label(mem_ax, "Bytes of cache each step reads", "context (tokens)", "cache (MiB)")
    for ax in (step_ax, mem_ax):
        ax.set_ylim(bottom=0)
        plotting.keep_linear(ax)
        plotting.legend_below(ax)
    return fig


def caption(rounds: int) -> str:
    """The figure's caption: what was timed and how, and what the dotted floors are."""
    return (
        f"Each point: the median of {rounds} decode steps (one a round, the paths interleaved, every path fed the "
        "same token), band: interquartile range. Every path's cache is filled from one prefill of a passage of the "
        "novel. Dotted: the memory floor, the bytes a step reads (every weight once and the cache as it holds the "
        "context) over the machine probe's read bandwidth; the int8 cache's floor counts its codes and scales."
    )


def _paired(steps: pd.DataFrame, context: int, numerator: str, denominator: str) -> Spread:
    """Per-round ratio numerator's step / denominator's step at `context` (the engines of one round ran back to
    back, so the ratio carries less of the machine's drift than a ratio of medians)."""
    s = steps[steps["context"] == context].pivot_table(index="round", columns="engine", values="latency_ms")
    return Spread.of(s[numerator] / s[denominator])


def _verdict(ratio: Spread, faster: str, slower: str) -> str:
    """'faster' / 'slower' when the interquartile range of the paired ratio excludes 1, else that it does not."""
    apart = ratio.excludes(1.0)
    if apart is None:
        return f"too few rounds (n={ratio.n}) to call a difference"
    if not apart:
        return "no difference beyond the rounds' spread"
    return faster if ratio.median > 1 else slower


def sentence(rows: pd.DataFrame, steps: pd.DataFrame, weight_bytes: float) -> str:
    """The section's markdown at the longest context: cache against weights, kvlib's step against the floor and
    against Hugging Face's faster cache, and the int8 cache's bytes, time (paired ratio, judged by its spread) and
    error, saying so when the saved bytes did not buy speed."""
    c = int(rows["context"].max())
    at = rows[rows["context"] == c].set_index("engine")
    static, int8 = at.loc["kvlib static"], at.loc["kvlib int8"]
    hf = "hf-static" if at.loc["hf-static", "tpot_p50_ms"] <= at.loc["hf-dynamic", "tpot_p50_ms"] else "hf-dynamic"
    weights_mib = weight_bytes / 2**20
    vs_hf = _paired(steps, c, hf, "kvlib static")
    vs_int8 = _paired(steps, c, "kvlib static", "kvlib int8")
    dtype = str(static["dtype"])
    text = (
        f"At {c} tokens and batch {int(static['batch_size'])} the {dtype} cache is {static['cache_mib']:.3g} MiB "
        f"against {weights_mib:.3g} MiB of weights ({static['cache_mib'] / weights_mib:.2f}x). kvlib's step took "
        f"**{static['tpot_p50_ms']:.1f} ms** against a floor of {static['floor_ms']:.1f} ms (MBU "
        f"{static['mbu']:.2f}); Hugging Face's faster cache ({PATHS[hf]}) took {at.loc[hf, 'tpot_p50_ms']:.1f} ms, "
        f"{vs_hf.median:.2f}x kvlib's step paired round by round (IQR {vs_hf.q25:.2f}-{vs_hf.q75:.2f}): "
        f"{_verdict(vs_hf, 'kvlib faster', 'kvlib slower')}. "
    )
    floor = float(at.loc[["hf-dynamic", "hf-static"], "kld_vs_kvlib_static"].max())
    int8_verdict = _verdict(vs_int8, "the int8 cache faster", "the int8 cache slower")
    text += (
        f"The int8 cache reads {int8['cache_mib']:.3g} MiB instead of {static['cache_mib']:.3g} (its floor "
        f"{int8['floor_ms']:.1f} ms); its step took {int8['tpot_p50_ms']:.1f} ms, the float32 cache's step "
        f"{vs_int8.median:.2f}x its own (IQR {vs_int8.q25:.2f}-{vs_int8.q75:.2f}): {int8_verdict}, at a KL "
        f"divergence of {int8['kld_vs_kvlib_static']:.2e} nats and top-1 agreement "
        f"{int8['top1_vs_kvlib_static']:.0%} against the exact cache over the same steps (Hugging Face's exact "
        f"caches differ from it by at most {floor:.1e} nats there: the floor a lossy cache is judged above)."
    )
    if vs_int8.excludes(1.0) is not True or vs_int8.median <= 1:
        share = int8["cache_mib"] / static["cache_mib"]
        text += (
            f" Reading {share:.0%} of the cache's bytes did not make the step faster here, unlike the throughput "
            "gains papers report for quantized caches on GPUs (KIVI)"
            + (
                f": kvlib's {dtype} step runs at {static['mbu']:.0%} of the speed its bytes allow (its MBU), so the "
                "bytes it reads are not what bounds it here (its kernels' speed is, or a busy machine)."
                if static["mbu"] < 0.5
                else "."
            )
        )
    return text


def headline(rows: pd.DataFrame, steps: pd.DataFrame, where: str) -> dict[str, Any]:
    """The headline long_context_step_ms: kvlib static's step at the longest context (ms, spread over the rounds),
    as keyword arguments of study.Outputs.headline."""
    c = int(rows["context"].max())
    batch = int(rows["batch_size"].iloc[0])
    s = Spread.of(steps[(steps["context"] == c) & (steps["engine"] == "kvlib static")]["latency_ms"])
    return {
        "metric": "long_context_step_ms",
        "label": f"Decode step at {c} tokens, batch {batch}",
        "value": s.median,
        "unit": "ms",
        "spread": s,
        "note": where,
    }
