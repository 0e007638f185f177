"""Notebook 05's page: how the batch size changes decode throughput, per-token latency and memory.

One concept: decoding B sequences together reads the weights once per step for all of them, so while a step is
bound by reading memory, throughput should grow almost B-fold and each sequence's latency barely move. The page
checks its parameters (`check_parameters`), measures the grid (`measure`: tidy runs and steps), draws the three
panels (`batch_figure`, `batch_caption`) and says what the runs show (`scaling`, `headline_rows`, `sentence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from kvlib import study
from kvlib.measure.harness import ModelPool, RunSpec, measure_grid
from kvlib.measure.roofline import bandwidth_source
from kvlib.models.decode import NAIVE
from kvlib.study import plotting

# ---- parameters -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """Notebook 05's checked parameters and the runs they ask for (`specs`: cached runs at every batch size, then
    naive runs at the batch sizes up to `naive_max_batch_size`)."""

    batch_sizes: list[int]  # sorted, without repeats, at least two
    prompt_len: int  # tokens in each prompt
    max_new_tokens: int  # tokens per sequence of the cached runs
    cache: str  # the kvlib cache layout measured
    naive_max_batch_size: int  # 0: no naive runs
    naive_new_tokens: int  # tokens per sequence of the naive runs
    repeats: int  # measured runs per configuration
    warmup: int  # unrecorded runs per configuration first
    specs: list[RunSpec]  # validated


def check_parameters(
    *,
    model: str,
    weights: str,
    device: str,
    dtype: str,
    seed: int,
    batch_sizes: Any,
    prompt_len: Any,
    max_new_tokens: Any,
    cache: str,
    naive_max_batch_size: Any,
    naive_new_tokens: Any,
    repeats: Any,
    warmup: Any,
) -> Sweep:
    """Notebook 05's parameters (every one but out_dir; list parameters may be YAML text, as papermill's -p passes
    them), checked before anything runs: a one-line KvlibError naming the first bad one. `batch_sizes` must hold
    two different sizes ("from batch b0 to batch b1" compares two points)."""
    batch_sizes = study.int_list("batch_sizes", batch_sizes)
    study.require_sweep("batch_sizes", batch_sizes)  # "from batch b0 to batch b1" needs two batch sizes
    prompt_len = study.positive_int("prompt_len", prompt_len)
    max_new_tokens = study.positive_int("max_new_tokens", max_new_tokens, minimum=2)
    naive_max_batch_size = study.positive_int("naive_max_batch_size", naive_max_batch_size, minimum=0)
    naive_new_tokens = study.positive_int("naive_new_tokens", naive_new_tokens, minimum=2)
    repeats = study.positive_int("repeats", repeats)
    warmup = study.positive_int("warmup", warmup, minimum=0)
    specs = [
        RunSpec("kvlib", cache, model, weights, b, prompt_len, max_new_tokens, device, dtype, seed) for b in batch_sizes
    ]
    specs += [
        RunSpec("kvlib", NAIVE, model, weights, b, prompt_len, naive_new_tokens, device, dtype, seed)
        for b in batch_sizes
        if b <= naive_max_batch_size
    ]
    for spec in specs:
        spec.validate()
    return Sweep(
        batch_sizes, prompt_len, max_new_tokens, cache, naive_max_batch_size, naive_new_tokens, repeats, warmup, specs
    )


# ---- measurements ---------------------------------------------------------------------------------------------


def measure(sweep: Sweep, pool: ModelPool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every spec of `sweep`, `sweep.repeats` times after `sweep.warmup` unrecorded runs (interleaved):
    (runs, steps), the harness's tidy rows (one per run; one per decode step), as saved to 05_runs / 05_steps."""
    m = measure_grid(sweep.specs, repeats=sweep.repeats, warmup=sweep.warmup, pool=pool)
    return m.runs, m.steps


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians per (path, batch size) of throughput (tokens/s), median step latency (ms), TTFT (ms), KV cache (MiB)
    and memory-bandwidth utilisation; `runs` carries study.with_units' columns."""
    columns = ["decode_tokens_per_s", "tpot_p50_ms", "ttft_ms", "kv_cache_mib", "mbu"]
    return runs.groupby(["path", "batch_size"])[columns].median()


# ---- the figure -----------------------------------------------------------------------------------------------


def peak_is_increase(runs: pd.DataFrame) -> bool:
    """Whether a run's peak increase (peak minus memory just before) means what it says: only where the peak is reset
    before the run and counts every allocation in it (torch's CUDA allocator) and it covers the cache each cached run
    holds. On CPU it is the resident set's high-water mark, which does not rise while the allocator reuses memory
    freed by earlier runs, so it can be smaller than the cache the run holds."""
    cached_rows = runs[runs["cache"] != NAIVE]
    return bool(
        (runs["peak_mem_kind"] == "cuda_allocated").all()
        and (cached_rows["peak_mem_delta_bytes"] >= cached_rows["kv_cache_bytes"]).all()
    )


def memory_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The memory panel's rows: path, cache, batch_size, repeat, `memory` ("KV cache", and "peak increase in the
    run" where `peak_is_increase`) and `mib`; a naive run holds no cache, so it has no KV-cache row."""
    increase = peak_is_increase(runs)
    mem = runs.melt(
        id_vars=["path", "cache", "batch_size", "repeat"],
        value_vars=["kv_cache_mib", "peak_mem_delta_mib"] if increase else ["kv_cache_mib"],
        var_name="memory",
        value_name="mib",
    )
    mem = mem[(mem["cache"] != NAIVE) | (mem["memory"] != "kv_cache_mib")]  # a naive run holds no cache
    mem["memory"] = mem["memory"].map({"kv_cache_mib": "KV cache", "peak_mem_delta_mib": "peak increase in the run"})
    return mem


def batch_figure(runs: pd.DataFrame, batch_sizes: Sequence[int], where: str, prompt_len: int) -> Figure:
    """Three panels against the batch size (log2 axis, ticks at `batch_sizes`): decode throughput (tokens/s), median
    per-token latency (ms), and memory (MiB: `memory_rows`); `where` is the model/dtype/device (`condition`)."""
    fig, axes = plotting.figure(ncols=3, width=4.8, title=f"Batch size, {where}, prompt {prompt_len}")
    plotting.lines(runs, "batch_size", "decode_tokens_per_s", "path", axes[0])
    plotting.label(axes[0], "Decode throughput", "batch size (sequences)", "tokens generated per second (tokens/s)")
    plotting.lines(runs, "batch_size", "tpot_p50_ms", "path", axes[1])
    plotting.label(axes[1], "Per-token latency (median step)", "batch size (sequences)", "latency per token (ms)")
    increase = peak_is_increase(runs)
    plotting.lines(memory_rows(runs), "batch_size", "mib", "path", axes[2], style="memory" if increase else None)
    plotting.label(
        axes[2], "Memory" if increase else "KV cache held at the end", "batch size (sequences)", "memory (MiB)"
    )
    plotting.legend_below(axes[2])
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    return fig


def batch_caption(runs: pd.DataFrame, repeats: int, max_new_tokens: int, naive_new_tokens: int) -> str:
    """The figure's caption: spread, tokens per path, what throughput counts, and what the memory panel shows (the
    peak increase, or why it is left out: the CSV keeps it as peak_mem_delta_bytes)."""
    return (
        plotting.iqr_note(repeats)
        + f" Cached: {max_new_tokens} new tokens per sequence; naive: {naive_new_tokens}. Decode throughput counts "
        "every sequence's tokens, prefill excluded. Memory: the KV cache's tensors at the end of a run, counted "
        "exactly"
        + (
            "; peak increase: torch's peak CUDA allocation during a run (reset before it) minus its allocation just "
            "before."
            if peak_is_increase(runs)
            else ". The run's peak memory increase is not plotted: "
            + (
                "on CPU it is the process's resident high-water mark, which does not rise while the allocator reuses "
                "memory freed by earlier runs: it can be smaller than the cache the run itself holds"
                if (runs["peak_mem_kind"] != "cuda_allocated").any()
                else "in some runs it came out smaller than the cache the run itself holds"
            )
            + ", so it cannot mean 'memory this run added' (the CSV keeps it as peak_mem_delta_bytes)."
        )
    )


# ---- what the runs show ---------------------------------------------------------------------------------------


def throughput_spread(runs: pd.DataFrame, path: str, batch: int) -> study.Spread:
    """Median and quartiles of decode tokens/s over the repeats of one path at one batch size."""
    return study.Spread.of(runs[(runs["path"] == path) & (runs["batch_size"] == batch)]["decode_tokens_per_s"])


@dataclass(frozen=True)
class Scaling:
    """How throughput and latency moved with the batch (medians over repeats; see `scaling`)."""

    cached_label: str  # the cached path's label
    tput: pd.Series  # median decode tokens/s per (path, batch_size)
    lat: pd.Series  # median per-token latency (ms) per (path, batch_size)
    b0: int  # smallest batch size
    b1: int  # largest batch size
    gain: float  # cached throughput at b1 / at b0 (x)
    slower: float  # cached per-token latency at b1 / at b0 (x)
    best_path: str  # path and batch of the best throughput measured
    best_batch: int
    best: float  # tokens/s
    peak_batch: int  # the cached path's best batch size
    apart: bool | None  # whether b0's and b1's throughputs are apart (None: too few repeats; kvlib.core.stats)
    caveat: str  # study.spread_caveat(apart)


def scaling(runs: pd.DataFrame, cache: str, batch_sizes: Sequence[int]) -> Scaling:
    """The comparisons the page's sentence and headlines make, from `runs` (study.with_units' columns) of the
    `cache` layout and naive runs at `batch_sizes` (two different sizes at least: check_parameters checked it)."""
    cached_label = study.path_label("kvlib", cache)
    tput = runs.groupby(["path", "batch_size"])["decode_tokens_per_s"].median()
    lat = runs.groupby(["path", "batch_size"])["tpot_p50_ms"].median()
    (best_path, best_batch), best = tput.idxmax(), tput.max()
    b0, b1 = min(batch_sizes), max(batch_sizes)
    apart = throughput_spread(runs, cached_label, b0).separated(throughput_spread(runs, cached_label, b1))
    return Scaling(
        cached_label=cached_label,
        tput=tput,
        lat=lat,
        b0=b0,
        b1=b1,
        gain=tput[(cached_label, b1)] / tput[(cached_label, b0)],
        slower=lat[(cached_label, b1)] / lat[(cached_label, b0)],
        best_path=best_path,
        best_batch=best_batch,
        best=best,
        peak_batch=tput[cached_label].idxmax(),
        apart=apart,  # None: n too small (kvlib.core.stats)
        caveat=study.spread_caveat(apart),
    )


def headline_rows(
    runs: pd.DataFrame, cache: str, batch_sizes: Sequence[int], where: str, prompt_len: int
) -> list[dict[str, Any]]:
    """The page's headline numbers, as keyword arguments of study.Outputs.headline: best_throughput (tokens/s, with
    its spread; on the index) and batch_throughput_gain (x, the largest batch over the smallest, cached path)."""
    s = scaling(runs, cache, batch_sizes)
    return [
        {
            "metric": "best_throughput",
            "label": "Best decode throughput",
            "value": s.best,
            "unit": "tokens/s",
            "spread": throughput_spread(runs, s.best_path, s.best_batch),
            "headline": True,
            "note": f"{where}, {s.best_path}, batch {s.best_batch}, prompt {prompt_len}",
        },
        {
            "metric": "batch_throughput_gain",
            "label": f"Throughput gain, batch {s.b1} over batch {s.b0} ({cache} cache)",
            "value": s.gain,
            "unit": "x",
            "note": f"median decode tokens/s at batch {s.b1} / at batch {s.b0}" + (f"; {s.caveat}" if s.caveat else ""),
        },
    ]


def sentence(runs: pd.DataFrame, cache: str, batch_sizes: Sequence[int]) -> str:
    """The page's markdown: throughput and latency from the smallest to the largest batch against perfect scaling,
    the best throughput, what the spread allows to claim about it (noise, a drop, more than perfect scaling, a peak
    before the largest batch), cached / naive throughput at the batch sizes both ran, and the cached path's MBU with
    the read bandwidth it divides by (`mbu_sentence`)."""
    s = scaling(runs, cache, batch_sizes)
    tput, lat, label, b0, b1, gain = s.tput, s.lat, s.cached_label, s.b0, s.b1, s.gain
    text = (
        f"With the {cache} cache, going from batch {b0} to batch {b1} changed decode throughput from "
        f"{tput[(label, b0)]:,.0f} to {tput[(label, b1)]:,.0f} tokens/s (**{gain:.2f}x**, against "
        f"{b1 / b0:.3g}x for perfect scaling), while each sequence's per-token latency went from "
        f"{lat[(label, b0)]:.2f} to {lat[(label, b1)]:.2f} ms ({s.slower:.2f}x). "
        f"The best throughput measured was **{s.best:,.0f} tokens/s** ({s.best_path}, batch {s.best_batch})."
    )
    why = (
        "B sequences cost about as much as B separate ones, so a decode step here is most likely limited by "
        "arithmetic (or by threads competing for the cores), not by reading the weights."
    )
    if s.apart is None:  # no claim either way: too few repeats (kvlib.core.stats)
        text += f" Whether batching changed throughput cannot be told from these runs ({s.caveat})."
    elif s.apart is False:  # not apart: no claim either way, and no cause (kvlib.core.stats)
        text += (
            f" These runs could not tell the throughput at batch {b1} from batch {b0}: the interquartile ranges of "
            "their repeats overlap."
        )
    elif gain < 1.2:
        change = f"lowered throughput ({gain:.2f}x)" if gain < 1 else f"raised throughput only {gain:.2f}x"
        text += f" **Batching {change}** on this machine, contrary to the usual expectation: {why}"
    elif gain > b1 / b0 and throughput_spread(runs, label, b0).scaled(b1 / b0).separated(
        throughput_spread(runs, label, b1)
    ):
        text += (
            f" **More than perfect scaling** ({gain:.1f}x for {b1 / b0:.3g}x the sequences) is not plausible for the "
            "computation itself: the smaller batches were most likely slowed by other work on the machine while they "
            "ran (see the spread in the figure); treat this gain as an upper bound."
        )
    elif s.peak_batch != b1:
        fell = throughput_spread(runs, label, s.peak_batch).separated(throughput_spread(runs, label, b1))
        text += (
            f" Throughput peaked at batch {s.peak_batch} and fell beyond it (likely: larger batches no longer fit the "
            "processor's caches, or the step became compute-bound)."
            if fell
            else f" Throughput was highest at batch {s.peak_batch}, but batch {b1} is "
            + ("within its spread" if fell is False else f"not comparable with it ({study.spread_caveat(fell)})")
            + ", so there is no evidence that it fell beyond it."
        )
    naive_label = study.path_label("kvlib", NAIVE)
    common = [b for b in batch_sizes if (naive_label, b) in tput.index]
    if common:
        ratios = ", ".join(f"{tput[(label, b)] / tput[(naive_label, b)]:.1f}x at batch {b}" for b in common)
        text += (
            f" Decode throughput with the cache relative to naive decoding (cached tokens/s / naive tokens/s, "
            f"medians): {ratios}."
        )
    return text + mbu_sentence(runs, label, b0, b1)


def mbu_sentence(runs: pd.DataFrame, label: str, b0: int, b1: int) -> str:
    """' MBU ... against <the bandwidth it divides by>.': the `label` path's median MBU at batch b0 and b1 (the
    summary table's mbu column, a fraction) and the read bandwidth of the runs, named by
    kvlib.measure.roofline.bandwidth_source; "" when MBU was not measured (KVLIB_NO_ROOFLINE)."""
    if "mbu" not in runs:
        return ""
    mbu = runs[runs["path"] == label].groupby("batch_size")["mbu"].median()
    if b0 not in mbu.index or b1 not in mbu.index or pd.isna(mbu[b0]) or pd.isna(mbu[b1]):
        return ""
    source = bandwidth_source(runs.get("bandwidth_bytes_per_s", pd.Series(dtype=float)))
    return (
        f" MBU (the table's mbu column: bytes a decode step must read / (its median step time x read bandwidth)) "
        f"of the {label} path was {100 * mbu[b0]:.3g}% at batch {b0} and {100 * mbu[b1]:.3g}% at batch {b1} "
        "(medians), against "
        f"{source or 'the read bandwidth measured in the runs'}."
    )
