"""`python -m kvlib bench` (`make bench`): kvlib's cached decode against Hugging Face `generate` and the memory floor.

This module is the command (its arguments, `add_parser`, and `run`); kvlib.measure.bench holds its parts:
`plan` (which rows run), `cpu` (the dtypes this CPU computes natively, torch threads), `runner` (timing a row within
its time bound) and `table` (the results table, the CSV's columns and the targets' verdicts, the targets themselves
read from kvlib/data/bench_targets.yaml).

A row is one (device, dtype, batch size). In each row the harness (`kvlib.measure.harness.measure_grid`) runs three
engines on the same prompts, interleaved (A B C, then C B A, ...), each after a warm-up, with the same number
of new tokens and the same torch threads (one process):

    kvlib      kvlib.models.decode.generate with its static cache (on a model trained with sliding-window layers,
               Gemma 3: its hybrid cache, which keeps only the window on those layers) and the fast path
               (kvlib.models.fastpath), the path every other command takes: the same kernel choice, and the
               torch.compile'd one-row kernel as a batch-1 candidate only with --compile or KVLIB_COMPILE=1, as
               everywhere (compiled before any timing). Until 2026-12 the bench compiled by default and `run` did
               not, so the two commands timed different paths
    hf-dynamic Hugging Face generate with its DynamicCache
    hf-static  Hugging Face generate with cache_implementation="static"
    llamacpp   on a batch-1 CPU row of a model with GGUF weights, when llama.cpp is installed: llama.cpp
               (kvlib.models.llamacpp) on the GGUF as stored with its f16 cache, printed beside HF as a column
               with its own MBU (the GGUF's bytes and its cache's); not judged by any target

Per row: TPOT p50 of each engine (the median over repeats of each run's median decode step), the ratios
HF dynamic / kvlib and best HF / kvlib, kvlib's decode tokens/s, and kvlib's MBU: the bytes a decode step must
read (every weight once and the KV cache; kvlib.measure.roofline) / (kvlib's TPOT x the read bandwidth measured on this
machine). Half-precision rows also report how often kvlib chooses the same token as in float32 given the same
history (teacher-forced agreement) and the first step where free-running decoding departs from float32: half
precision is not expected to be identical, so it is measured, not claimed.

The bench covers `smollm2-135m` (the Llama architecture, the default), distilgpt2 (GPT-2) and `gemma3-270m` (Gemma 3,
hybrid sliding/global attention), pretrained weights where available ("auto"). Gemma 3 gets one row of its own shape
(`MODEL_ROWS`: batch 1, float32, prompt 4096, eight times its 512-token window), judged by one rule: decoding on the
hybrid cache no slower than Hugging Face's generate; the bench prints that ratio. `--quick` leaves Gemma out of its
default models (loading it and prefilling 4096 tokens three ways does not fit its 3 minutes); name it with --model
to run it, bounded like every quick row. Every other row is checked against the speed targets (TARGETS: HF / kvlib
TPOT ratios and kvlib's MBU, each with where it comes from) and printed as met or missed. The exit code is 0 either
way (a benchmark is a measurement), unless --strict.

A bench for every machine:
- half precision is measured only where the hardware has it: `kvlib.core.hardware.dtype_support` (the one check every
  command and the fast path use) reads the CPU's flags (/proc/cpuinfo: avx512_bf16 / amx_bf16 for bfloat16,
  avx512_fp16 / amx_fp16 for float16; oneDNN's own check where the flags can't be read). Where a dtype is
  emulated (on an AVX2-only CPU bfloat16 is several times slower than float32) its rows are skipped and the bench
  says so, or, with --emulated, one short batch-1 row is run and labelled `emulated`; the header prints which
  dtypes run natively.
- every row has a time bound (--row-limit-s; with --quick the bench's measuring budget divided by the rows): no
  further repeat is started that would cross it, and a repeat still running when it passes is stopped (SIGALRM,
  at the next Python-level op). A row that hit it says so (`time_bound_hit`, "TIME BOUND" in the table), with
  whatever repeats completed, or none.

Long-context rows (kvlib.measure.bench.long, on unless --no-long, when smollm2-135m and float32 are measured):
SmolLM2 at batch 4, context 4096, where the cache outweighs the weights; kvlib's static and int8 caches against HF's
two, all filled from one shared prefill and timed one decode step a round, interleaved, with the floor and MBU
counting the cache's bytes and the int8 cache's KL divergence against the exact one. They are judged by the
`long_context` targets and appended to --long-csv (its own columns). `--quick` measures SmolLM2 only, its short rows
within QUICK_BUDGET_S and the long row within LONG_LIMIT_S: 124-140 s on a 2-core Zen 3
(docs/2026-12-07-speed-floor.md), 131 s on a 2-core Zen 4 with its bfloat16 batch-1 row (docs/2026-12-08-matvec.md).

Results follow the same contract as `run` (kvlib.measure.results): --csv is checked before anything is loaded (its
folder must exist, the file must be writable, and an existing file must hold bench rows with this header; anything else
is refused with one line and exit 2, never rewritten), then each row is appended as soon as it is measured.
Other processes' CPU use is measured over every row (kvlib.measure.machine_load) and printed with the torch thread
count; a row measured on a busy machine says so in the table and in its `other_cpu_cores` column.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvlib.cli.common import flag, non_negative_int, positive_int
from kvlib.core.errors import KvlibError
from kvlib.measure.bench import long
from kvlib.measure.bench.cpu import dtype_support, set_threads
from kvlib.measure.bench.plan import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_MODELS,
    DEFAULT_PROMPT_LEN,
    FULL,
    FULL_ROW_LIMIT_S,
    LLAMACPP_COST,
    MODEL_ROWS,
    QUICK,
    QUICK_BUDGET_S,
    QUICK_MIN_ROW_S,
    QUICK_MODELS,
    model_cost,
    plan_rows,
    row_has_llamacpp,
    row_limits_s,
)
from kvlib.measure.bench.runner import RowTimeBound, measure_row, time_bound
from kvlib.measure.bench.table import (
    csv_columns,
    fmt,
    format_table,
    gemma_report,
    target_report,
)
from kvlib.measure.harness import ModelPool
from kvlib.measure.machine_load import LoadReading
from kvlib.measure.provenance import device_name
from kvlib.measure.results import append_rows, check_outputs
from kvlib.measure.roofline import bandwidth_source, machine_probe, roofline_enabled
from kvlib.models.fastpath import compile_default
from kvlib.models.loading import DTYPES, dtype_name, resolve_device

DEFAULT_CSV = "reports/bench.csv"
DEFAULT_LONG_CSV = "reports/bench_long.csv"
LONG_ROUNDS = {"quick": 8, "full": 24}  # counted decode rounds of a long-context row (one warm-up round more)
LONG_LIMIT_S = {"quick": 60.0, "full": 600.0}  # time bound of a long-context row: its prefill of 4096 tokens
# (about 17 s on 2 cores) and 4 engines x (rounds + 1) steps of about 0.25 s


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type: a comma-separated list of `kind`."""

    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [kind(s) for s in items]

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        help="comma-separated [float32,bfloat16 on CPU (--quick: float32, and bfloat16 at batch 1 where the CPU has "
        "it natively); float16,bfloat16 on CUDA]",
    )
    flag(
        p,
        "batch_sizes",
        type=csv_list(positive_int),
        default=DEFAULT_BATCH_SIZES,
        help="comma-separated [1,4,8; gemma3-270m: 1]",
    )
    flag(p, "prompt_len", type=positive_int, default=DEFAULT_PROMPT_LEN, help="[256; gemma3-270m: 4096]")
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
        default=None,
        help="torch.compile kvlib's one-row kernel for batch-1 rows, a candidate measured against the others "
        "(kvlib.models.fastpath.prepare_for_inference's compile_one_row) [as every other command: KVLIB_COMPILE, "
        "off when unset]",
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
    p.add_argument(
        "--long",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the long-context rows (kvlib.measure.bench.long: SmolLM2 batch 4 x 4096, float32; kvlib static and "
        "int8 caches against HF's, from one shared prefill) when smollm2-135m and float32 are measured [on]",
    )
    p.add_argument(
        "--long-rounds",
        type=positive_int,
        default=None,
        help=f"counted decode rounds of each long-context row [{LONG_ROUNDS['full']}; --quick {LONG_ROUNDS['quick']}]",
    )
    p.add_argument(
        "--long-csv", default=DEFAULT_LONG_CSV, help=f"append the long-context rows to this CSV [{DEFAULT_LONG_CSV}]"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=run)


def default_dtypes(device: torch.device, quick: bool) -> list[str]:
    """The dtypes measured where --dtypes is not given: float16 and bfloat16 on CUDA; on CPU float32 and bfloat16,
    with --quick float32 and bfloat16 only where this CPU computes it natively (its batch-1 row carries a target:
    `plan.QUICK_HALF_BATCH_SIZES`). Regression: --quick measured float32 only, so on a CPU with native bfloat16 the
    bfloat16 target printed "n/a (no such row)"."""
    if device.type == "cuda":
        return ["float16", "bfloat16"]
    if not quick:
        return ["float32", "bfloat16"]
    return ["float32"] + (["bfloat16"] if dtype_support("bfloat16", device).native else [])


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.compile is None:  # the path `run`, `generate`, `perplexity` and the notebooks take (one fast path)
        args.compile = compile_default()
    if args.model is None:
        args.model = QUICK_MODELS if args.quick else DEFAULT_MODELS
    names = args.dtypes or default_dtypes(device, args.quick)
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise KvlibError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    dtypes = list(dict.fromkeys(dtype_name(DTYPES[d]) for d in names))  # canonical names, duplicates dropped
    if args.max_new_tokens == 1:
        raise KvlibError(
            "--max_new_tokens 1 leaves no decode step (the first token comes from the prefill), and the bench times "
            "decode steps; use 2 or more"
        )
    set_threads(args.threads)
    planned, dtype_notes = plan_rows(args, device, dtypes)
    costs = [model_cost(row.specs[0].model) * (1 + LLAMACPP_COST * row_has_llamacpp(row.specs)) for row in planned]
    limits_s = row_limits_s(args, [row.specs[0].batch_size for row in planned], costs)
    for row in planned:  # every row checked before anything is loaded or measured
        for spec in row.specs:
            spec.validate()
    csv_path, long_path = Path(args.csv), Path(args.long_csv)
    columns = csv_columns()
    long_rows = [r for r in long.LONG_ROWS if args.long and r.model in args.model and r.dtype in dtypes]
    mode = "quick" if args.quick else "full"
    long_rounds = args.long_rounds or LONG_ROUNDS[mode]
    for lrow in long_rows:  # checked with the other rows, before anything is loaded or measured
        long.long_spec(lrow, long_rounds, args.weights, args.device, args.seed)
    outputs = {"--csv": (csv_path, columns)}
    if args.long:  # an output this command may write: checked like the other, whatever rows the models give
        if long_path.resolve() == csv_path.resolve():
            raise KvlibError("--long-csv and --csv name the same file; the two hold different columns")
        outputs["--long-csv"] = (long_path, long.COLUMNS)
    check_outputs(outputs)  # before anything is loaded or measured

    # the probe every row's MBU divides by (the report's with KVLIB_MACHINE_PROBE set, else this process's own)
    probe = machine_probe(device, dtypes[0]) if roofline_enabled() and dtypes else None
    against = (
        "read bandwidth not measured"
        if probe is None
        else f"MBU against {bandwidth_source([probe.bandwidth_bytes_per_s])}"
    )
    first = planned[0].specs[0] if planned else None
    shaped = [f"{m}: batch {','.join(map(str, s.batch_sizes))}, prompt {s.prompt_len}, {'/'.join(s.dtypes)} ({s.why})"
              for m, s in MODEL_ROWS.items() if m in args.model]  # fmt: skip
    print(
        f"bench: {', '.join(args.model)} ({args.weights} weights), prompt {args.prompt_len}"
        f"{' (' + '; '.join(shaped) + ')' if shaped else ''}, "
        f"{first.max_new_tokens if first else '-'} new tokens, {planned[0].repeats if planned else '-'} repeats after "
        f"{planned[0].warmup if planned else '-'} warm-up, interleaved; {device} ({device_name(device)}), "
        f"{torch.get_num_threads()} torch threads, "
        f"{against}; kvlib: static "
        f"cache (hybrid on Gemma 3), fast path"
        f"{', torch.compile for batch 1' if args.compile and device.type == 'cpu' else ''}; "
        f"time bound per row {min(limits_s, default=0):.0f}-{max(limits_s, default=0):.0f} s",
        flush=True,
    )
    for note in dtype_notes:
        print(f"  {note}", flush=True)
    pool, rows, load = ModelPool(), [], LoadReading()
    for plan, limit_s in zip(planned, limits_s, strict=True):
        row, reading = measure_row(
            plan.specs, pool, plan.repeats, plan.warmup, limit_s, plan.support, compile_one_row=args.compile
        )
        rows.append(row)
        load = load.add(reading)
        append_rows(csv_path, [{c: row[c] for c in columns}], columns)
        s0 = plan.specs[0]
        print(
            f"  {s0.model} {row['dtype']} batch {s0.batch_size}: kvlib {fmt(row['kvlib_tpot_p50_ms'], '.2f')} ms, "
            f"HF dynamic {fmt(row['hf_dynamic_tpot_p50_ms'], '.2f')} ms, HF static "
            f"{fmt(row['hf_static_tpot_p50_ms'], '.2f')} ms"
            + (
                f", llama.cpp {fmt(row['llamacpp_tpot_p50_ms'], '.2f')} ms (its GGUF as stored, f16 cache; MBU "
                f"{fmt(row['llamacpp_mbu'], '.2f')})"
                if row_has_llamacpp(plan.specs)
                else ""
            )
            + f" in {row['row_s']:.0f} s "
            f"(kvlib set-up {row['kvlib_setup_s']:.1f} s, not timed; matrix kernel {row['kvlib_kernel']}; "
            f"other processes "
            f"{reading.other_cores:.2f} cores{', BUSY' if reading.busy else ''}"
            f"{'; TIME BOUND hit' if row['time_bound_hit'] else ''}"
            f"{'; EMULATED ' + row['dtype'] if not plan.support.native else ''})",
            flush=True,
        )
    measured_long: list[dict[str, Any]] = []
    summaries = []
    for lrow in long_rows:
        limit = LONG_LIMIT_S[mode]
        t_row = time.perf_counter()
        try:
            with time_bound(limit):
                bandwidth = probe.bandwidth_bytes_per_s if probe else math.nan
                got = long.measure_long(
                    lrow, pool, long_rounds, bandwidth, args.seed, args.device, weights=args.weights
                ).rows
        except RowTimeBound:
            print(
                f"  {lrow.model} batch {lrow.batch_size} x {lrow.context}: TIME BOUND {limit:.0f} s hit, not measured"
            )
            continue
        measured_long += got
        summaries.append(long.summary(got))
        append_rows(long_path, got, long.COLUMNS)
        print(
            f"  {lrow.model} batch {lrow.batch_size} x context {lrow.context} (one shared prefill, {long_rounds} "
            f"rounds interleaved): {time.perf_counter() - t_row:.0f} s",
            flush=True,
        )
    print()
    print(format_table(rows))
    if measured_long:
        print(
            "\nlong context (the cache outweighs the weights; floor and MBU count both):\n"
            + long.format_rows(measured_long)
        )
    report, all_met = target_report(rows)
    long_text, long_met = long.target_report(summaries, planned=len(long_rows))
    all_met &= long_met
    print(f"\ntargets ({'all met' if all_met else 'some MISSED'}):\n{report}")
    if long_rows:
        print(long_text)
    gemma = gemma_report(rows)
    if gemma:
        print(f"Gemma 3, hybrid cache vs HF generate (rule: no slower than HF generate):\n{gemma}")
    print("dtypes: " + "; ".join(dtype_notes))
    print(f"\n{torch.get_num_threads()} torch threads; {load.text()}")
    print(
        f"appended {len(rows)} rows to {csv_path}" + (f", {len(measured_long)} to {long_path}" if measured_long else "")
    )
    return 1 if args.strict and not all_met else 0
