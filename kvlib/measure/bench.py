"""`python -m kvlib bench` (`make bench`): kvlib's cached decode against Hugging Face `generate` and the memory floor.

A row is one (device, dtype, batch size). In each row the harness (`kvlib.measure.harness.measure_grid`) runs three
engines on the same prompts, interleaved (A B C, then C B A, ...), each after a warm-up, with the same number
of new tokens and the same torch threads (one process):

    kvlib      kvlib.models.decode.generate with its static cache (on a model trained with sliding-window layers,
               Gemma 3: its hybrid cache, which keeps only the window on those layers) and the fast path
               (kvlib.models.fastpath); with --compile (the default) batch-1 rows use the torch.compile'd one-row
               kernel, compiled before any timing
    hf-dynamic Hugging Face generate with its DynamicCache
    hf-static  Hugging Face generate with cache_implementation="static"

Per row: TPOT p50 of each engine (the median over repeats of each run's median decode step), the ratios
HF dynamic / kvlib and best HF / kvlib, kvlib's decode tokens/s, and kvlib's MBU: the bytes a decode step must
read (every weight once and the KV cache; kvlib.measure.roofline) / (kvlib's TPOT x the read bandwidth measured on this
machine). Half-precision rows also report how often kvlib chooses the same token as in float32 given the same
history (teacher-forced agreement) and the first step where free-running decoding departs from float32: half
precision is not expected to be identical, so it is measured, not claimed.

The bench covers `smollm2-135m` (the Llama architecture, the default), distilgpt2 (GPT-2) and `gemma3-270m` (Gemma 3,
hybrid sliding/global attention), pretrained weights where available ("auto"). Gemma 3 gets one row of its own shape
(`MODEL_ROWS`: batch 1, float32, prompt 2048, longer than its 512-token window), where issue 15 asks that decoding on
the hybrid cache be no slower than Hugging Face's generate: the bench prints that ratio. `--quick` leaves Gemma out
of its default models (loading it and prefilling 2048 tokens three ways does not fit its 3 minutes); name it with
--model to run it, bounded like every quick row. The targets of issue 11 are checked on every other row and printed
as met or missed. The exit code is 0 either way (a benchmark is a measurement), unless --strict.

A bench for every machine:
- half precision is measured only where the hardware has it: `kvlib.hardware.dtype_support` (the one check every
  command and the fast path use) reads the CPU's flags (/proc/cpuinfo: avx512_bf16 / amx_bf16 for bfloat16,
  avx512_fp16 / amx_fp16 for float16; oneDNN's own check where the flags can't be read). Where a dtype is
  emulated (on an AVX2-only CPU bfloat16 is several times slower than float32) its rows are skipped and the bench
  says so, or, with --emulated, one short batch-1 row is run and labelled `emulated`; the header prints which
  dtypes run natively.
- every row has a time bound (--row-limit-s; with --quick the bench's measuring budget divided by the rows): no
  further repeat is started that would cross it, and a repeat still running when it passes is stopped (SIGALRM,
  at the next Python-level op). A row that hit it says so (`time_bound_hit`, "TIME BOUND" in the table), with
  whatever repeats completed, or none.

Results follow the same contract as `run` (kvlib.measure.results): --csv is checked before anything is loaded (its
folder must exist, the file must be writable, and an existing file must hold bench rows with this header; anything else
is refused with one line and exit 2, never rewritten), then each row is appended as soon as it is measured.
Other processes' CPU use is measured over every row (kvlib.measure.machine_load) and printed with the torch thread
count; a row measured on a busy machine says so in the table and in its `other_cpu_cores` column.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvlib import checks
from kvlib.caches.base import make_cache
from kvlib.errors import KvlibError
from kvlib.hardware import DtypeSupport, dtype_support
from kvlib.measure.harness import Measurement, ModelPool, RunSpec, measure_grid
from kvlib.measure.machine_load import LoadMonitor, LoadReading
from kvlib.measure.results import append_rows, check_outputs
from kvlib.models import fastpath
from kvlib.models.decode import decode_step, generate, greedy, prefill, prepare_positions
from kvlib.models.decoders import Decoder
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.loading import DTYPES, dtype_name, resolve_device

ENGINES: tuple[tuple[str, str, str], ...] = (  # (label, harness engine, cache)
    ("kvlib", "kvlib", "static"),
    ("hf-dynamic", "hf", "dynamic"),
    ("hf-static", "hf", "static"),
)
QUICK = {"max_new_tokens": 16, "repeats": 3, "warmup": 0}  # TPOT is a median of steps: the first run's cold start
# barely moves it, and a warm-up of batch 8 on 2 cores costs as much as a repeat. Three repeats, not two: the median
# of two is their mean, so one repeat caught in a slow spell of the machine moved a row by tens of percent.
FULL = {"max_new_tokens": 64, "repeats": 3, "warmup": 1}
QUICK_BUDGET_S = 120.0  # --quick: seconds of measuring for all rows together (loading adds ~30 s): under 3 minutes,
# shared in proportion to each row's work (a batch-8 row prefills 8 prompts): 1 + batch / 2
QUICK_MIN_ROW_S = 5.0  # ... but no row gets less than this
FULL_ROW_LIMIT_S = 600.0
EMULATED_ROW = {"batch_size": 1, "max_new_tokens": 4, "repeats": 1, "warmup": 0}  # --emulated: one short row
DEFAULT_MODELS = ["smollm2-135m", "distilgpt2", "gemma3-270m"]
QUICK_MODELS = ["smollm2-135m", "distilgpt2"]  # --quick without --model: Gemma's row does not fit 3 minutes


@dataclass(frozen=True)
class RowShape:
    """A model's own bench rows, in place of --batch-sizes / --prompt-len left at their defaults, and the dtypes
    its rows are measured in."""

    batch_sizes: tuple[int, ...]
    prompt_len: int
    dtypes: tuple[str, ...]
    why: str


MODEL_ROWS = {
    "gemma3-270m": RowShape(
        (1,), 2048, ("float32",), "issue 15: hybrid cache vs HF generate at batch 1, float32, prompt 2048 (> window)"
    ),
}
DEFAULT_BATCH_SIZES = [1, 4, 8]
DEFAULT_PROMPT_LEN = 256
GEMMA_TARGET = 1.0  # issue 15: decode on the hybrid cache no slower than HF generate (best HF TPOT / kvlib TPOT)


def kvlib_cache(model: str) -> str:
    """kvlib's cache in the bench: static, or the hybrid layout on a model with sliding-window layers."""
    from kvlib.measure.run_cli import default_cache

    return default_cache("kvlib", model)


DEFAULT_CSV = "reports/bench.csv"
MAX_THREADS = 4 * (os.cpu_count() or 1)  # --threads beyond this oversubscribes the cores past any use

COLUMNS = (
    "model", "arch", "weights", "device", "dtype", "native_dtype", "batch_size", "prompt_len", "max_new_tokens",
    "repeats", "threads", "row_limit_s", "time_bound_hit", "row_s", "kvlib_compile", "kvlib_setup_s",
    "kvlib_weights_mib", "kvlib_packed_copy_mib",
    "kvlib_tpot_p50_ms", "hf_dynamic_tpot_p50_ms", "hf_static_tpot_p50_ms",
    "kvlib_tpot_range_ms", "hf_dynamic_tpot_range_ms", "hf_static_tpot_range_ms",
    "ratio_hf_dynamic", "ratio_hf_best", "kvlib_tokens_per_s", "hf_best_tokens_per_s",
    "kvlib_ttft_ms", "hf_dynamic_ttft_ms", "hf_static_ttft_ms", "ratio_ttft_hf_dynamic",
    "decode_step_bytes", "bandwidth_gb_per_s", "floor_step_ms", "mbu",
    "agreement_vs_fp32", "first_divergence_step",
    "target_b1_fp32_vs_hf_dynamic", "target_vs_hf_best", "target_b1_mbu",
    "other_cpu_cores", "busy_machine", "loadavg_before", "loadavg_after",
    "device_name", "torch_version", "transformers_version", "git_commit", "timestamp",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str  # the CSV column is target_<name>
    column: str  # the row's figure it checks
    minimum: float
    applies: Callable[[dict[str, Any]], bool]
    text: str


def _timed(r: dict[str, Any]) -> bool:
    """Rows whose timings mean something: not an emulated dtype (those rows are labelled, not judged)."""
    return bool(r.get("native_dtype", True))


def _llama_b1_fp32_cpu(r: dict[str, Any]) -> bool:
    return r.get("arch") == "llama" and r["batch_size"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu"


def _gemma(r: dict[str, Any]) -> bool:
    """Gemma 3 rows are judged by issue 15's rule (`gemma_report`), not by issue 11's targets."""
    return r.get("arch") == "gemma3"


TARGETS = (  # issue 11
    Target(
        "b1_fp32_vs_hf_dynamic",
        "ratio_hf_dynamic",
        2.0,
        lambda r: _timed(r) and _llama_b1_fp32_cpu(r),
        "Llama (smollm2-135m) batch 1, float32, CPU: HF dynamic TPOT / kvlib TPOT >= 2.0",
    ),
    Target(
        "vs_hf_best",
        "ratio_hf_best",
        1.3,
        lambda r: _timed(r) and not _llama_b1_fp32_cpu(r) and not _gemma(r),
        "every other row (Gemma 3: below): best HF TPOT / kvlib TPOT >= 1.3",
    ),
    Target(
        "b1_mbu",
        "mbu",
        0.6,
        lambda r: _timed(r) and _llama_b1_fp32_cpu(r),
        "Llama batch 1, float32: kvlib MBU >= 0.6",
    ),
)


class RowTimeBound(BaseException):
    """A row ran past its time bound. A BaseException, like KeyboardInterrupt: code that catches Exception to fall
    back (the compiled kernel's `except Exception`) must not swallow it and carry on unbounded."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise RowTimeBound in this thread once `seconds` have passed (SIGALRM: the main thread of a Unix process;
    elsewhere no hard stop, only the bench's check between repeats). The exception arrives when control next
    returns to Python, i.e. within one op."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or not math.isfinite(seconds):
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise RowTimeBound(f"past the time bound of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def csv_columns() -> list[str]:
    """The CSV's columns: COLUMNS with one `target_<name>` column per target of TARGETS, in place of the defaults."""
    cols = [c for c in COLUMNS if not c.startswith("target_")]
    at = cols.index("other_cpu_cores")
    return [*cols[:at], *(f"target_{t.name}" for t in TARGETS), *cols[at:]]


def check_targets(row: dict[str, Any]) -> dict[str, str]:
    """{"target_<name>": "pass" | "fail" | "n/a"} for one row; a figure that was not measured (NaN) is a fail."""
    out = {}
    for t in TARGETS:
        if not t.applies(row):
            out[f"target_{t.name}"] = "n/a"
            continue
        value = row[t.column]
        ok = value is not None and not math.isnan(value) and value >= t.minimum
        out[f"target_{t.name}"] = "pass" if ok else "fail"
    return out


def row_specs(
    model: str, weights: str, device: str, dtype: str, batch_size: int, prompt_len: int, max_new_tokens: int, seed: int
) -> list[RunSpec]:
    """The three engines' specs of one row; kvlib's cache is `kvlib_cache(model)` (hybrid on Gemma 3)."""
    mine = kvlib_cache(model)
    common = (model, weights, batch_size, prompt_len, max_new_tokens, device, dtype, seed)
    return [RunSpec(engine, mine if engine == "kvlib" else cache, *common) for _, engine, cache in ENGINES]


def unmeasured_row(spec: RunSpec) -> dict[str, Any]:
    """The row of a spec none of whose repeats completed within the time bound: its settings, every figure NaN."""
    from kvlib.measure.provenance import provenance

    figures = [c for c in COLUMNS if c.endswith(("_ms", "_s", "_per_s", "_bytes")) or c.startswith(("ratio_", "mbu"))]
    row: dict[str, Any] = dict.fromkeys(figures, math.nan)
    device = resolve_device(spec.device)
    row.update(
        model=spec.model, weights=spec.weights, device=device.type, dtype=dtype_name(DTYPES[spec.dtype]),
        batch_size=spec.batch_size, prompt_len=spec.prompt_len, max_new_tokens=spec.max_new_tokens, repeats=0,
        threads=torch.get_num_threads(), kvlib_compile=False, agreement_vs_fp32=math.nan, first_divergence_step=None,
    )  # fmt: skip
    info = provenance(device)
    row.update(
        {k: info.get(k) for k in ("device_name", "torch_version", "transformers_version", "git_commit", "timestamp")}
    )
    return row


def summarize(m: Measurement) -> dict[str, Any]:
    """One bench row (without targets) from the harness's runs of the three engines of a row."""
    runs = m.runs
    med: dict[str, dict[str, float]] = {}
    for label, engine, cache in ENGINES:
        same = runs["cache"] == cache if engine == "hf" else True  # kvlib: one cache per row (static or hybrid)
        r = runs[(runs["engine"] == engine) & same]
        if r.empty:
            raise KvlibError(f"the harness returned no runs for {label}")
        med[label] = {
            "tpot_ms": 1e3 * float(r["tpot_p50_s"].median()),
            "range_ms": 1e3 * float(r["tpot_p50_s"].max() - r["tpot_p50_s"].min()),
            "tokens_per_s": float(r["decode_tokens_per_s"].median()),
            "ttft_ms": 1e3 * float(r["ttft_s"].median()),
            "mbu": float(r["mbu"].median()),
        }
    first = runs.iloc[0]
    kv, dyn, sta = med["kvlib"], med["hf-dynamic"], med["hf-static"]
    best = dyn if dyn["tpot_ms"] <= sta["tpot_ms"] else sta
    bw = float(first["bandwidth_bytes_per_s"])
    kv_runs = runs[runs["engine"] == "kvlib"]
    step_bytes = int(kv_runs["decode_step_bytes"].iloc[0])
    return {
        "model": first["model"],
        "weights": first["weights"],
        "device": first["device"].split(":")[0],
        "dtype": first["dtype"],
        "batch_size": int(first["batch_size"]),
        "prompt_len": int(first["prompt_len"]),
        "max_new_tokens": int(first["max_new_tokens"]),
        "repeats": int(runs["repeat"].nunique()),
        "threads": int(first["threads"]),
        "kvlib_tpot_p50_ms": kv["tpot_ms"],
        "hf_dynamic_tpot_p50_ms": dyn["tpot_ms"],
        "hf_static_tpot_p50_ms": sta["tpot_ms"],
        "kvlib_tpot_range_ms": kv["range_ms"],
        "hf_dynamic_tpot_range_ms": dyn["range_ms"],
        "hf_static_tpot_range_ms": sta["range_ms"],
        "ratio_hf_dynamic": dyn["tpot_ms"] / kv["tpot_ms"],
        "ratio_hf_best": best["tpot_ms"] / kv["tpot_ms"],
        "kvlib_tokens_per_s": kv["tokens_per_s"],
        "hf_best_tokens_per_s": best["tokens_per_s"],
        "kvlib_ttft_ms": kv["ttft_ms"],
        "hf_dynamic_ttft_ms": dyn["ttft_ms"],
        "hf_static_ttft_ms": sta["ttft_ms"],
        "ratio_ttft_hf_dynamic": dyn["ttft_ms"] / kv["ttft_ms"],
        "decode_step_bytes": step_bytes,
        "bandwidth_gb_per_s": bw / 1e9,
        "floor_step_ms": 1e3 * step_bytes / bw if bw and not math.isnan(bw) else math.nan,
        "mbu": kv["mbu"],
        "kvlib_compile": False,
        "kvlib_setup_s": math.nan,
        "agreement_vs_fp32": math.nan,
        "first_divergence_step": None,
        "device_name": first["device_name"],
        "torch_version": first["torch_version"],
        "transformers_version": first["transformers_version"],
        "git_commit": first["git_commit"],
        "timestamp": first["timestamp"],
    }


@torch.inference_mode()
def agreement(model: Decoder, reference: Decoder, ids: torch.Tensor, max_new_tokens: int) -> tuple[float, int | None]:
    """How `model` (half precision) decodes against `reference` (float32) on the same prompts `ids`.

    Returns (agreement, first divergence): the share of steps at which `model`, fed the reference's tokens so far,
    picks the reference's next token; and the first step at which free-running `model` departs from the
    reference in any sequence (None when it never does).
    """
    ref = generate(reference, ids, max_new_tokens, cache="static").tokens  # (B, N)
    free = generate(model, ids, max_new_tokens, cache="static").tokens
    B, P = ids.shape
    positions, key_valid = prepare_positions(ids, None, max_new_tokens)
    kv = make_cache("static", model.cfg, B, P + max_new_tokens, ids.device, model.wte.weight.dtype)
    forced = torch.empty_like(ref)
    forced[:, 0] = greedy(prefill(model, ids, positions, kv, key_valid))
    for i in range(1, max_new_tokens):
        forced[:, i] = greedy(decode_step(model, ref[:, i - 1 : i], P + i - 1, positions, kv, key_valid))
    differs = (free != ref).any(dim=0).nonzero()
    first = int(differs[0, 0]) if differs.numel() else None
    return (forced == ref).float().mean().item(), first


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'model':<13} {'dtype':<8} {'batch':>5} {'kvlib ms':>9} {'HF dyn ms':>9} {'HF stat ms':>10} "
        f"{'dyn/kvlib':>9} {'best/kvlib':>10} {'kvlib tok/s':>11} {'MBU':>5} {'TTFT dyn/kvlib':>14} "
        f"{'agree':>6}  targets"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdicts = [r[f"target_{t.name}"] for t in TARGETS if r[f"target_{t.name}"] != "n/a"]
        verdict = "-" if not verdicts else "met" if all(v == "pass" for v in verdicts) else "MISSED"
        notes = [
            note
            for note, on in (
                (f"{r['dtype']} EMULATED, not judged", not r.get("native_dtype", True)),
                (
                    f"TIME BOUND {r.get('row_limit_s', math.nan):.0f} s hit after {r['repeats']} repeats",
                    r.get("time_bound_hit"),
                ),
                ("BUSY machine", r.get("busy_machine")),
            )
            if on
        ]
        lines.append(
            f"{str(r['model'])[:13]:<13} {r['dtype']:<8} {r['batch_size']:>5} {_fmt(r['kvlib_tpot_p50_ms'], '.2f'):>9} "
            f"{_fmt(r['hf_dynamic_tpot_p50_ms'], '.2f'):>9} {_fmt(r['hf_static_tpot_p50_ms'], '.2f'):>10} "
            f"{_fmt(r['ratio_hf_dynamic'], '.2f'):>8}x {_fmt(r['ratio_hf_best'], '.2f'):>9}x "
            f"{_fmt(r['kvlib_tokens_per_s'], '.1f'):>11} {_fmt(r['mbu'], '.2f'):>5} "
            f"{_fmt(r.get('ratio_ttft_hf_dynamic', math.nan), '.2f'):>13}x "
            f"{_fmt(r['agreement_vs_fp32'], '.0%'):>6}  {verdict}" + (f"  ({'; '.join(notes)})" if notes else "")
        )
    return "\n".join(lines)


# The HF TPOT(s) behind each ratio column (best: the faster of HF's two caches).
HF_TPOT_OF_RATIO = {
    "ratio_hf_dynamic": ("hf_dynamic_tpot_p50_ms",),
    "ratio_hf_best": ("hf_dynamic_tpot_p50_ms", "hf_static_tpot_p50_ms"),
}


def beyond_the_floor(t: Target, row: dict[str, Any]) -> str | None:
    """Why a speed-up target cannot be met on this machine, or None: the TPOT it asks of kvlib (HF's TPOT / the
    target ratio) is below the memory floor measured in the same run (`floor_step_ms`: the bytes a decode step must
    read / the read bandwidth, kvlib.measure.roofline), i.e. it would need kvlib's MBU above 1."""
    columns = HF_TPOT_OF_RATIO.get(t.column)
    if columns is None:
        return None
    hf = [x for x in (row.get(c) for c in columns) if x is not None and not math.isnan(x)]
    floor = row.get("floor_step_ms")
    if not hf or floor is None or math.isnan(floor):
        return None
    hf_ms = min(hf)
    asked = hf_ms / t.minimum
    if asked >= floor:
        return None
    return (
        f"{row.get('model', '')} {row['dtype']} b{row['batch_size']}: unreachable at the bandwidth measured in this "
        "run, it asks for "
        f"{asked:.1f} ms per step, below the memory floor of {floor:.1f} ms (kvlib MBU {floor / asked:.2f} > 1; "
        f"HF itself reaches MBU {floor / hf_ms:.2f})"
    ).strip()


def target_report(rows: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """One line per target (met / missed, with the figures that decided it) and whether all were met; under a
    missed ratio target, each row it could not be met on because of the memory floor (`beyond_the_floor`)."""
    lines, all_met = [], True
    for t in TARGETS:
        checked = [r for r in rows if r[f"target_{t.name}"] != "n/a"]
        if not checked:
            lines.append(f"  n/a    {t.text} (no such row)")
            continue
        failed = [r for r in checked if r[f"target_{t.name}"] == "fail"]
        all_met &= not failed
        figures = ", ".join(
            f"{r.get('model', '')} {r['dtype']} b{r['batch_size']}: {_fmt(r[t.column], '.2f')}".strip() for r in checked
        )
        lines.append(f"  {'MISSED' if failed else 'met':<6} {t.text} ({figures})")
        lines += [f"         {note}" for r in failed if (note := beyond_the_floor(t, r))]
    return "\n".join(lines), all_met


def gemma_report(rows: Sequence[dict[str, Any]]) -> str | None:
    """Issue 15's check on the Gemma 3 rows: decode on kvlib's hybrid cache no slower than HF generate (best HF
    TPOT / kvlib TPOT >= 1, and HF DynamicCache's ratio beside it); None without such a row."""
    lines = []
    for r in rows:
        if not _gemma(r):
            continue
        best, dyn = r["ratio_hf_best"], r["ratio_hf_dynamic"]
        measured = best is not None and not math.isnan(best)
        verdict = "n/a (not measured)" if not measured else "met" if best >= GEMMA_TARGET else "MISSED"
        if not r.get("native_dtype", True):
            verdict = "not judged (emulated dtype)"
        lines.append(
            f"  {verdict:<6} {r['model']} {r['dtype']} batch {r['batch_size']}, prompt {r['prompt_len']}: best HF / "
            f"kvlib hybrid = {_fmt(best, '.2f')}x, HF dynamic / kvlib hybrid = {_fmt(dyn, '.2f')}x "
            f"(kvlib {_fmt(r['kvlib_tpot_p50_ms'], '.2f')} ms per token; target >= {GEMMA_TARGET:g}x: no slower)"
        )
    return "\n".join(lines) if lines else None


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: a comma-separated list of `kind`."""

    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(s) for s in items]

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from kvlib.cli import flag, non_negative_int, positive_int

    p = sub.add_parser("bench", help="kvlib's cached decode vs Hugging Face generate, and vs the memory floor")
    p.add_argument(
        "--model",
        type=csv_list(str),
        default=None,
        help=f"comma-separated presets or local folders [{','.join(DEFAULT_MODELS)}; --quick: "
        f"{','.join(QUICK_MODELS)}]",
    )
    p.add_argument("--weights", default="auto", choices=("pretrained", "random", "auto"), help="[auto]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    p.add_argument(
        "--dtypes",
        type=csv_list(str),
        default=None,
        help="comma-separated [float32,bfloat16 on CPU (--quick: float32); float16,bfloat16 on CUDA]",
    )
    flag(
        p,
        "batch_sizes",
        type=csv_list(positive_int),
        default=DEFAULT_BATCH_SIZES,
        help="comma-separated [1,4,8; gemma3-270m: 1]",
    )
    flag(p, "prompt_len", type=positive_int, default=DEFAULT_PROMPT_LEN, help="[256; gemma3-270m: 2048]")
    flag(
        p,
        "max_new_tokens",
        type=positive_int,
        default=None,
        help=f"[{FULL['max_new_tokens']}; --quick {QUICK['max_new_tokens']}]",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=None, help=f"[{FULL['repeats']}; --quick {QUICK['repeats']}]"
    )
    p.add_argument("--warmup", type=non_negative_int, default=None, help=f"[{FULL['warmup']}]")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads for every engine [torch's default]"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of random weights and prompts [0]")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile kvlib's one-row kernel for batch-1 rows (kvlib.models.fastpath.COMPILE_ONE_ROW) [on]",
    )
    flag(
        p,
        "row_limit_s",
        type=float,
        default=None,
        help=f"time bound of each row in seconds [{FULL_ROW_LIMIT_S:.0f}; --quick {QUICK_BUDGET_S:.0f} s shared by "
        f"the rows in proportion to 1 + batch / 2, at least {QUICK_MIN_ROW_S:.0f}]",
    )
    p.add_argument(
        "--emulated",
        action="store_true",
        help="run one short, bounded batch-1 row of a dtype this hardware only emulates (default: skip its rows)",
    )
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats, bounded: under 3 minutes on 2 cores")
    p.add_argument("--csv", default=DEFAULT_CSV, help=f"append one row per bench row to this CSV [{DEFAULT_CSV}]")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class PlannedRow:
    specs: list[RunSpec]
    support: DtypeSupport
    repeats: int
    warmup: int


def plan_rows(args: argparse.Namespace, device: torch.device, dtypes: list[str]) -> tuple[list[PlannedRow], list[str]]:
    """The rows to measure (model x dtype x batch; an emulated dtype: none, or one short row with --emulated)
    and one line per dtype saying whether it runs natively."""
    mode = QUICK if args.quick else FULL
    max_new_tokens = args.max_new_tokens or mode["max_new_tokens"]
    repeats = args.repeats or mode["repeats"]
    warmup = mode["warmup"] if args.warmup is None else args.warmup
    rows, notes = [], []
    for dt in dtypes:
        support = dtype_support(dt, device)
        if support.native:
            notes.append(f"{dt}: native ({support.why})")
        else:
            notes.append(
                f"{dt}: {support.why}: "
                + (
                    "one short batch-1 row, labelled, not judged"
                    if args.emulated
                    else "rows skipped (--emulated: one short row)"
                )
            )
        for model in args.model:
            batch_sizes, prompt_len, shape = model_row_shape(args, model)
            if shape is not None and dt not in shape.dtypes:
                continue  # a model with its own row shape runs in its own dtypes only
            if support.native:
                for b in batch_sizes:
                    specs = row_specs(model, args.weights, args.device, dt, b, prompt_len, max_new_tokens, args.seed)
                    rows.append(PlannedRow(specs, support, repeats, warmup))
            elif args.emulated:
                e = EMULATED_ROW
                specs = row_specs(
                    model, args.weights, args.device, dt, e["batch_size"], prompt_len,
                    min(e["max_new_tokens"], max_new_tokens), args.seed,
                )  # fmt: skip
                rows.append(PlannedRow(specs, support, e["repeats"], e["warmup"]))
    return rows, notes


def model_row_shape(args: argparse.Namespace, model: str) -> tuple[list[int], int, RowShape | None]:
    """(batch sizes, prompt length, its RowShape or None) of `model`'s rows: MODEL_ROWS' shape where the model has
    one and --batch-sizes / --prompt-len were left at their defaults, else the command line's."""
    shape = MODEL_ROWS.get(model)
    if shape is None:
        return list(args.batch_sizes), args.prompt_len, None
    default_batch = list(args.batch_sizes) == DEFAULT_BATCH_SIZES
    default_prompt = args.prompt_len == DEFAULT_PROMPT_LEN
    return (
        list(shape.batch_sizes) if default_batch else list(args.batch_sizes),
        shape.prompt_len if default_prompt else args.prompt_len,
        shape,
    )


def row_limits_s(
    args: argparse.Namespace, batch_sizes: Sequence[int], costs: Sequence[float] | None = None
) -> list[float]:
    """The time bound of each planned row (given by its batch size): --row-limit-s, or with --quick the budget
    shared in proportion to (1 + batch / 2) x the row's model cost (`costs`, 1 each by default: see
    `model_cost`), or FULL_ROW_LIMIT_S."""
    if args.row_limit_s is not None:
        if not (math.isfinite(args.row_limit_s) and args.row_limit_s > 0):
            raise KvlibError(f"--row-limit-s must be a positive number of seconds, got {args.row_limit_s}")
        return [float(args.row_limit_s)] * len(batch_sizes)
    if args.quick:
        costs = [1.0] * len(batch_sizes) if costs is None else costs
        weights = [(1 + b / 2) * c for b, c in zip(batch_sizes, costs, strict=True)]
        return [max(QUICK_MIN_ROW_S, QUICK_BUDGET_S * w / sum(weights)) for w in weights]
    return [FULL_ROW_LIMIT_S] * len(batch_sizes)


def model_cost(model: str) -> float:
    """A row's share of the quick budget grows with its model's depth: a 30-layer SmolLM2 step and prefill take
    about three times a 6-layer distilgpt2's (measured here), so it gets three times the time."""
    from kvlib.models.config import PRESETS

    cfg = PRESETS.get(model)
    return 1.0 if cfg is None else max(1.0, cfg.n_layer / 10)


def run(args: argparse.Namespace) -> int:
    from kvlib.measure.provenance import device_name
    from kvlib.measure.roofline import measure_bandwidth_bytes_per_s, roofline_enabled

    device = resolve_device(args.device)
    if args.model is None:
        args.model = QUICK_MODELS if args.quick else DEFAULT_MODELS
    # --quick on CPU: float32 only (half-precision rows on request with --dtypes), so that the rows that carry the
    # targets get enough of the 2-3 minutes to measure
    cpu_default = ["float32"] if args.quick else ["float32", "bfloat16"]
    names = args.dtypes or (["float16", "bfloat16"] if device.type == "cuda" else cpu_default)
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise KvlibError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    dtypes = list(dict.fromkeys(dtype_name(DTYPES[d]) for d in names))  # canonical names, duplicates dropped
    if args.max_new_tokens == 1:
        raise KvlibError(
            "--max_new_tokens 1 leaves no decode step (the first token comes from the prefill), and the bench times "
            "decode steps; use 2 or more"
        )
    if args.threads:  # torch takes absurd counts and then crashes (100000 threads: a segmentation fault)
        checks.whole("--threads", args.threads, maximum=MAX_THREADS)
        torch.set_num_threads(args.threads)
    planned, dtype_notes = plan_rows(args, device, dtypes)
    limits_s = row_limits_s(
        args, [row.specs[0].batch_size for row in planned], [model_cost(row.specs[0].model) for row in planned]
    )
    for row in planned:  # every row checked before anything is loaded or measured
        for spec in row.specs:
            spec.validate()
    csv_path = Path(args.csv)
    columns = csv_columns()
    check_outputs({"--csv": (csv_path, columns)})  # before anything is loaded or measured

    bandwidth = measure_bandwidth_bytes_per_s(device) if roofline_enabled() else math.nan
    first = planned[0].specs[0] if planned else None
    shaped = [f"{m}: batch {','.join(map(str, s.batch_sizes))}, prompt {s.prompt_len}, {'/'.join(s.dtypes)} ({s.why})"
              for m, s in MODEL_ROWS.items() if m in args.model]  # fmt: skip
    print(
        f"bench: {', '.join(args.model)} ({args.weights} weights), prompt {args.prompt_len}"
        f"{' (' + '; '.join(shaped) + ')' if shaped else ''}, "
        f"{first.max_new_tokens if first else '-'} new tokens, {planned[0].repeats if planned else '-'} repeats after "
        f"{planned[0].warmup if planned else '-'} warm-up, interleaved; {device} ({device_name(device)}), "
        f"{torch.get_num_threads()} torch threads, measured read bandwidth "
        f"{'not measured' if math.isnan(bandwidth) else f'{bandwidth / 1e9:.1f} GB/s'}; kvlib: static "
        f"cache (hybrid on Gemma 3), fast path"
        f"{', torch.compile for batch 1' if args.compile and device.type == 'cpu' else ''}; "
        f"time bound per row {min(limits_s, default=0):.0f}-{max(limits_s, default=0):.0f} s",
        flush=True,
    )
    for note in dtype_notes:
        print(f"  {note}", flush=True)
    pool, rows, load = ModelPool(), [], LoadReading()
    compile_before = fastpath.COMPILE_ONE_ROW
    fastpath.COMPILE_ONE_ROW = args.compile
    try:
        for plan, limit_s in zip(planned, limits_s, strict=True):
            row, reading = measure_row(plan.specs, pool, plan.repeats, plan.warmup, limit_s, plan.support)
            rows.append(row)
            load = load.add(reading)
            append_rows(csv_path, [{c: row[c] for c in columns}], columns)
            s0 = plan.specs[0]
            print(
                f"  {s0.model} {row['dtype']} batch {s0.batch_size}: kvlib {_fmt(row['kvlib_tpot_p50_ms'], '.2f')} ms, "
                f"HF dynamic {_fmt(row['hf_dynamic_tpot_p50_ms'], '.2f')} ms, HF static "
                f"{_fmt(row['hf_static_tpot_p50_ms'], '.2f')} ms in {row['row_s']:.0f} s "
                f"(kvlib set-up {row['kvlib_setup_s']:.1f} s, not timed; matrix kernel {row['kvlib_kernel']}; "
                f"other processes "
                f"{reading.other_cores:.2f} cores{', BUSY' if reading.busy else ''}"
                f"{'; TIME BOUND hit' if row['time_bound_hit'] else ''}"
                f"{'; EMULATED ' + row['dtype'] if not plan.support.native else ''})",
                flush=True,
            )
    finally:
        fastpath.COMPILE_ONE_ROW = compile_before
    print()
    print(format_table(rows))
    report, all_met = target_report(rows)
    print(f"\ntargets ({'all met' if all_met else 'some MISSED'}):\n{report}")
    gemma = gemma_report(rows)
    if gemma:
        print(f"Gemma 3, hybrid cache vs HF generate (issue 15: no slower):\n{gemma}")
    print("dtypes: " + "; ".join(dtype_notes))
    print(f"\n{torch.get_num_threads()} torch threads; {load.text()}")
    print(f"appended {len(rows)} rows to {csv_path}")
    return 1 if args.strict and not all_met else 0


def measure_row(
    specs: list[RunSpec],
    pool: ModelPool,
    repeats: int,
    warmup: int,
    limit_s: float = math.inf,
    support: DtypeSupport | None = None,
) -> tuple[dict[str, Any], LoadReading]:
    """One row: kvlib's set-up (weight packing, compilation) timed on its own, then the three engines measured
    interleaved, one harness call per repeat (order reversed every other repeat), with other processes' CPU use
    over that time, then (half precision) the agreement with float32. All of it within `limit_s` seconds from
    the first measured run: no repeat is started that would cross the bound (by the last one's duration), and
    one still running at the bound is stopped. Returns the row and the load reading of its measurement."""
    from kvlib.models.prompts import synthetic_prompts

    spec = specs[0]
    lm = pool.get(spec.model_key(), need_kvlib=True, need_hf=True)
    need_ref = spec.dtype != "float32" and (support is None or support.native)
    ref = pool.get(replace(spec, dtype="float32").model_key(), need_kvlib=True, need_hf=False) if need_ref else None
    setup_s = prepare_for_inference(lm.model, spec.batch_size)
    measured: list[Any] = []
    hit = False
    t0 = time.perf_counter()
    share, first = math.nan, None
    with LoadMonitor() as monitor:
        try:
            with time_bound(limit_s):
                for r in range(repeats):
                    t_repeat = time.perf_counter()
                    ordered = specs if r % 2 == 0 else specs[::-1]
                    m = measure_grid(
                        ordered, repeats=1, warmup=warmup if r == 0 else 0, progress=sys.stderr.isatty(), pool=pool
                    )
                    measured.append(m.runs.assign(repeat=r))
                    took = (time.perf_counter() - t_repeat) / (1 + (warmup if r == 0 else 0))
                    if r + 1 < repeats and time.perf_counter() - t0 + took > limit_s:
                        hit = True  # another repeat would cross the bound
                        break
                if ref is not None:
                    ids = synthetic_prompts(lm.cfg.vocab_size, spec.batch_size, spec.prompt_len, spec.seed, lm.device)
                    share, first = agreement(lm.model, ref.model, ids, spec.max_new_tokens)
        except RowTimeBound:
            hit = True
    reading = monitor.reading
    if measured:
        import pandas as pd

        row = summarize(Measurement(pd.concat(measured, ignore_index=True), pd.DataFrame()))
    else:
        row = unmeasured_row(spec)
    row.update(
        arch=lm.cfg.arch,
        native_dtype=True if support is None else support.native,
        row_limit_s=limit_s,
        time_bound_hit=hit,
        row_s=time.perf_counter() - t0,
        other_cpu_cores=reading.other_cores,
        busy_machine=reading.busy,
        loadavg_before=reading.loadavg_before,
        loadavg_after=reading.loadavg_after,
        agreement_vs_fp32=share,
        first_divergence_step=first,
    )
    row["kvlib_compile"] = bool(fastpath.COMPILE_ONE_ROW and spec.batch_size == 1 and lm.device.type == "cpu")
    row["kvlib_setup_s"] = setup_s
    # Not a CSV column (a new column would refuse to append to an existing bench.csv): printed with the row.
    row["kvlib_kernel"] = fastpath.model_kernel(lm.model, spec.batch_size) if lm.device.type == "cpu" else "-"
    # What kvlib's model holds: its parameters (a tied embedding / LM head once) and, on top, the fast path's
    # packed copy of the Linear weights, oneDNN's or MKL's (README "Speed", memory).
    row["kvlib_weights_mib"] = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    row["kvlib_packed_copy_mib"] = fastpath.packed_bytes(lm.model) / 2**20
    row.update(check_targets(row))
    return row, reading
