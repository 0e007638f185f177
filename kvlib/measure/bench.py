"""`python -m kvlib bench` (`make bench`): kvlib's cached decode against Hugging Face `generate` and the memory floor.

A row is one (device, dtype, batch size). In each row the harness (`kvlib.measure.harness.measure_grid`) runs three
engines on the same prompts, interleaved (A B C, then C B A, ...), each after a warm-up, with the same number
of new tokens and the same torch threads (one process):

    kvlib      kvlib.models.decode.generate with its static cache and the fast path (kvlib.models.fastpath); with
               --compile (the default) batch-1 rows use the torch.compile'd one-row kernel, compiled before any timing
    hf-dynamic Hugging Face generate with its DynamicCache
    hf-static  Hugging Face generate with cache_implementation="static"

Per row: TPOT p50 of each engine (the median over repeats of each run's median decode step), the ratios
HF dynamic / kvlib and best HF / kvlib, kvlib's decode tokens/s, and kvlib's MBU: the bytes a decode step must
read (every weight once and the KV cache; kvlib.measure.roofline) / (kvlib's TPOT x the read bandwidth measured on this
machine). Half-precision rows also report how often kvlib chooses the same token as in float32 given the same
history (teacher-forced agreement) and the first step where free-running decoding departs from float32: half
precision is not expected to be identical, so it is measured, not claimed.

The targets of issue 6 are checked on every row and printed as met or missed. The exit code is 0 either way (a
benchmark is a measurement), unless --strict.

Results follow the same contract as `run` (kvlib.measure.results): --csv is checked before anything is loaded (its
folder must exist, the file must be writable, and an existing file must hold bench rows with this header; anything else
is refused with one line and exit 2, never rewritten), then each row is appended as soon as it is measured.
Other processes' CPU use is measured over every row (kvlib.measure.machine_load) and printed with the torch thread
count; a row measured on a busy machine says so in the table and in its `other_cpu_cores` column.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvlib import checks
from kvlib.caches.base import make_cache
from kvlib.errors import KvlibError
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
QUICK = {"max_new_tokens": 16, "repeats": 2, "warmup": 1}
FULL = {"max_new_tokens": 64, "repeats": 3, "warmup": 1}
DEFAULT_CSV = "reports/bench.csv"
MAX_THREADS = 4 * (os.cpu_count() or 1)  # --threads beyond this oversubscribes the cores past any use

COLUMNS = (
    "model", "weights", "device", "dtype", "batch_size", "prompt_len", "max_new_tokens", "repeats", "threads",
    "kvlib_compile", "kvlib_setup_s",
    "kvlib_tpot_p50_ms", "hf_dynamic_tpot_p50_ms", "hf_static_tpot_p50_ms",
    "kvlib_tpot_range_ms", "hf_dynamic_tpot_range_ms", "hf_static_tpot_range_ms",
    "ratio_hf_dynamic", "ratio_hf_best", "kvlib_tokens_per_s", "hf_best_tokens_per_s",
    "kvlib_ttft_ms", "hf_dynamic_ttft_ms", "decode_step_bytes", "bandwidth_gb_per_s", "floor_step_ms", "mbu",
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


TARGETS = (
    Target(
        "b1_fp32_vs_hf_dynamic",
        "ratio_hf_dynamic",
        1.3,
        lambda r: r["batch_size"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu",
        "batch 1, float32, CPU: HF dynamic TPOT / kvlib TPOT >= 1.3",
    ),
    Target("vs_hf_best", "ratio_hf_best", 1.0, lambda r: True, "every row: best HF TPOT / kvlib TPOT >= 1.0"),
    Target("b1_mbu", "mbu", 0.5, lambda r: r["batch_size"] == 1, "batch 1: kvlib MBU >= 0.5"),
)


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
    return [
        RunSpec(engine, cache, model, weights, batch_size, prompt_len, max_new_tokens, device, dtype, seed)
        for _, engine, cache in ENGINES
    ]


def summarize(m: Measurement) -> dict[str, Any]:
    """One bench row (without targets) from the harness's runs of the three engines of a row."""
    runs = m.runs
    med: dict[str, dict[str, float]] = {}
    for label, engine, cache in ENGINES:
        r = runs[(runs["engine"] == engine) & (runs["cache"] == cache)]
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
        f"{'device':<6} {'dtype':<8} {'batch':>5} {'kvlib ms':>9} {'HF dyn ms':>9} {'HF stat ms':>10} "
        f"{'dyn/kvlib':>9} {'best/kvlib':>10} {'kvlib tok/s':>11} {'MBU':>5} {'agree':>6}  targets"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdicts = [r[f"target_{t.name}"] for t in TARGETS if r[f"target_{t.name}"] != "n/a"]
        lines.append(
            f"{r['device']:<6} {r['dtype']:<8} {r['batch_size']:>5} {_fmt(r['kvlib_tpot_p50_ms'], '.2f'):>9} "
            f"{_fmt(r['hf_dynamic_tpot_p50_ms'], '.2f'):>9} {_fmt(r['hf_static_tpot_p50_ms'], '.2f'):>10} "
            f"{_fmt(r['ratio_hf_dynamic'], '.2f'):>8}x {_fmt(r['ratio_hf_best'], '.2f'):>9}x "
            f"{_fmt(r['kvlib_tokens_per_s'], '.1f'):>11} {_fmt(r['mbu'], '.2f'):>5} "
            f"{_fmt(r['agreement_vs_fp32'], '.0%'):>6}  {'met' if all(v == 'pass' for v in verdicts) else 'MISSED'}"
            + ("  (BUSY machine)" if r["busy_machine"] else "")
        )
    return "\n".join(lines)


def target_report(rows: Sequence[dict[str, Any]]) -> tuple[str, bool]:
    """One line per target (met / missed, with the figures that decided it) and whether all were met."""
    lines, all_met = [], True
    for t in TARGETS:
        checked = [r for r in rows if r[f"target_{t.name}"] != "n/a"]
        if not checked:
            lines.append(f"  n/a    {t.text} (no such row)")
            continue
        failed = [r for r in checked if r[f"target_{t.name}"] == "fail"]
        all_met &= not failed
        figures = ", ".join(f"{r['dtype']} b{r['batch_size']}: {_fmt(r[t.column], '.2f')}" for r in checked)
        lines.append(f"  {'MISSED' if failed else 'met':<6} {t.text} ({figures})")
    return "\n".join(lines), all_met


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
    p.add_argument("--model", default="distilgpt2", help="preset or local folder [distilgpt2]")
    p.add_argument("--weights", default="random", choices=("pretrained", "random", "auto"), help="[random]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto [cpu]")
    p.add_argument(
        "--dtypes",
        type=csv_list(str),
        default=None,
        help="comma-separated [float32,bfloat16 on CPU; float16,bfloat16 on CUDA]",
    )
    flag(p, "batch_sizes", type=csv_list(positive_int), default=[1, 4, 8], help="comma-separated [1,4,8]")
    flag(p, "prompt_len", type=positive_int, default=256, help="[256]")
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
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats: about a minute on 2 CPU cores")
    p.add_argument("--csv", default=DEFAULT_CSV, help=f"append one row per bench row to this CSV [{DEFAULT_CSV}]")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlib.measure.provenance import device_name
    from kvlib.measure.roofline import measure_bandwidth_bytes_per_s, roofline_enabled

    mode = QUICK if args.quick else FULL
    max_new_tokens = args.max_new_tokens or mode["max_new_tokens"]
    repeats = args.repeats or mode["repeats"]
    warmup = mode["warmup"] if args.warmup is None else args.warmup
    device = resolve_device(args.device)
    names = args.dtypes or (["float16", "bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise KvlibError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    dtypes = list(dict.fromkeys(dtype_name(DTYPES[d]) for d in names))  # canonical names, duplicates dropped
    if args.threads:  # torch takes absurd counts and then crashes (100000 threads: a segmentation fault)
        checks.whole("--threads", args.threads, maximum=MAX_THREADS)
        torch.set_num_threads(args.threads)
    grid = {
        (dt, b): row_specs(args.model, args.weights, args.device, dt, b, args.prompt_len, max_new_tokens, args.seed)
        for dt in dtypes
        for b in args.batch_sizes
    }
    for specs in grid.values():  # every row checked before anything is loaded or measured
        for spec in specs:
            spec.validate()
    csv_path = Path(args.csv)
    columns = csv_columns()
    check_outputs({"--csv": (csv_path, columns)})  # before anything is loaded or measured

    bandwidth = measure_bandwidth_bytes_per_s(device) if roofline_enabled() else math.nan
    print(
        f"bench: {args.model} ({args.weights} weights), prompt {args.prompt_len}, {max_new_tokens} new tokens, "
        f"{repeats} repeats after {warmup} warm-up, interleaved; {device} ({device_name(device)}), "
        f"{torch.get_num_threads()} torch threads, measured read bandwidth {bandwidth / 1e9:.1f} GB/s; kvlib: static "
        f"cache, fast path{', torch.compile for batch 1' if args.compile and device.type == 'cpu' else ''}",
        flush=True,
    )
    pool, rows, load = ModelPool(), [], LoadReading()
    compile_before = fastpath.COMPILE_ONE_ROW
    fastpath.COMPILE_ONE_ROW = args.compile
    try:
        for (dt, batch), specs in grid.items():
            row, reading = measure_row(specs, pool, repeats, warmup)
            rows.append(row)
            load = load.add(reading)
            append_rows(csv_path, [{c: row[c] for c in columns}], columns)
            print(
                f"  {dt} batch {batch}: kvlib {row['kvlib_tpot_p50_ms']:.2f} ms, HF dynamic "
                f"{row['hf_dynamic_tpot_p50_ms']:.2f} ms, HF static {row['hf_static_tpot_p50_ms']:.2f} ms "
                f"(kvlib set-up {row['kvlib_setup_s']:.1f} s, not timed; other processes "
                f"{reading.other_cores:.2f} cores{', BUSY' if reading.busy else ''})",
                flush=True,
            )
    finally:
        fastpath.COMPILE_ONE_ROW = compile_before
    print()
    print(format_table(rows))
    report, all_met = target_report(rows)
    print(f"\ntargets ({'all met' if all_met else 'some MISSED'}):\n{report}")
    print(f"\n{torch.get_num_threads()} torch threads; {load.text()}")
    print(f"appended {len(rows)} rows to {csv_path}")
    return 1 if args.strict and not all_met else 0


def measure_row(specs: list[RunSpec], pool: ModelPool, repeats: int, warmup: int) -> tuple[dict[str, Any], LoadReading]:
    """One row: kvlib's set-up (weight packing, compilation) timed on its own, then the three engines measured
    interleaved by the harness (with other processes' CPU use over that time), then (half precision) the
    agreement with float32. Returns the row and the load reading of its measurement."""
    from kvlib.models.prompts import synthetic_prompts

    spec = specs[0]
    lm = pool.get(spec.model_key(), need_kvlib=True, need_hf=True)
    setup_s = prepare_for_inference(lm.model, spec.batch_size)
    with LoadMonitor() as monitor:
        m = measure_grid(specs, repeats=repeats, warmup=warmup, progress=sys.stderr.isatty(), pool=pool)
    reading = monitor.reading
    row = summarize(m)
    row.update(
        other_cpu_cores=reading.other_cores,
        busy_machine=reading.busy,
        loadavg_before=reading.loadavg_before,
        loadavg_after=reading.loadavg_after,
    )
    row["kvlib_compile"] = bool(fastpath.COMPILE_ONE_ROW and spec.batch_size == 1 and lm.device.type == "cpu")
    row["kvlib_setup_s"] = setup_s
    if spec.dtype != "float32":
        ref = pool.get(replace(spec, dtype="float32").model_key(), need_kvlib=True, need_hf=False)
        ids = synthetic_prompts(lm.cfg.vocab_size, spec.batch_size, spec.prompt_len, spec.seed, lm.device)
        share, first = agreement(lm.model, ref.model, ids, spec.max_new_tokens)
        row["agreement_vs_fp32"] = share
        row["first_divergence_step"] = first
    row.update(check_targets(row))
    return row, reading
