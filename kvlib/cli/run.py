"""`python -m kvlib run` and `python -m kvlib experiments`: the harness from the command line.

`run` is compatible with the original assignment's run_model.py (--use_cache, --batch_size, --prompt_len,
--max_new_tokens, --csv; hyphenated spellings too) and measures one configuration `--repeats` times; `experiments`
runs the assignment's three experiments. Both append ONE ROW PER MEASURED REPEAT (not a summary row) to --csv as
soon as that repeat is complete, so an interruption keeps every finished row. Every argument is checked, and the
CSV is checked to be appendable, before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd

from kvlib.cli.common import add_model_args, flag, non_negative_int, one_line_warnings, positive_int
from kvlib.core.stats import Spread, caveat
from kvlib.measure.harness import (
    ENGINES,
    RUN_COLUMNS,
    STEP_COLUMNS,
    Measurement,
    ModelPool,
    RunSpec,
    default_cache,
    measure_grid,
    resolve_cache,
)
from kvlib.measure.machine_load import LoadMonitor, LoadReading
from kvlib.measure.results import append_rows, check_outputs

CSV_COLUMNS = (*RUN_COLUMNS, "experiment")  # `experiment` is "run" for rows of the run command
STEPS_CSV_COLUMNS = (*STEP_COLUMNS, "experiment")
# The assignment's experiments: (name, what it asks, [(use_cache, batch_size, prompt_len), ...]); 128 new tokens.
EXPERIMENTS: list[tuple[str, str, list[tuple[int, int, int]]]] = [
    ("exp1_cache", "KV cache on vs off (prompt 256, batch 1)", [(0, 1, 256), (1, 1, 256)]),
    ("exp2_batch", "batch size 1, 2, 4 (prompt 128, cache on)", [(1, 1, 128), (1, 2, 128), (1, 4, 128)]),
    ("exp3_prompt", "prompt length 32, 128, 256 (batch 1, cache on)", [(1, 1, 32), (1, 1, 128), (1, 1, 256)]),
]
EXPERIMENT_NEW_TOKENS = 128


def zero_or_one(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or 1")
    return int(text)


def _common_args(p: argparse.ArgumentParser, engine_help: str) -> None:
    add_model_args(p)
    p.add_argument("--engine", choices=ENGINES, default="hf", help=engine_help)
    p.add_argument("--repeats", type=positive_int, default=3, help="measured repeats of each configuration [3]")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="unrecorded warm-up runs of each [1]")
    p.add_argument("--csv", default=None, help="append one row per measured repeat to this CSV [none]")
    flag(p, "steps_csv", default=None, help="also append one row per decode step to this CSV [none]")
    flag(p, "no_roofline", action="store_true", help="skip the bandwidth / matmul measurement (mbu left empty)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="measure one configuration (the assignment's run_model.py)")
    _common_args(
        p,
        "hf: transformers generate; kvlib: this project's decoder; llamacpp: llama.cpp on the model's GGUF as stored "
        "(batch 1, --cache its cache type) [hf]",
    )
    flag(p, "use_cache", type=zero_or_one, default=None, help="1: with a KV cache, 0: without [1]")
    p.add_argument(
        "--cache",
        default=None,
        help="none, dynamic or static (kvlib: any layout; llamacpp: f16, q8_0, q4_0, ... for keys and values) "
        "[by --use_cache: hf dynamic; kvlib static, hybrid on Gemma; llamacpp f16]",
    )
    flag(p, "batch_size", type=positive_int, default=1, help="[1]")
    flag(p, "prompt_len", type=positive_int, default=256, help="[256]")
    flag(p, "max_new_tokens", type=positive_int, default=128, help="[128]")
    flag(p, "n_kv_head", type=positive_int, default=None, help="key/value heads (kvlib, random weights only)")
    p.set_defaults(func=run)

    e = sub.add_parser("experiments", help="the assignment's three experiments, one row per repeat")
    _common_args(e, "[hf, as the assignment]")
    e.set_defaults(func=experiments)


def _check_outputs(args: argparse.Namespace) -> None:
    check_outputs({"--csv": (args.csv, CSV_COLUMNS), "--steps-csv": (args.steps_csv, STEPS_CSV_COLUMNS)})


def _writer(args: argparse.Namespace, experiment: str):
    def on_run(row: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        if args.csv is not None:
            append_rows(args.csv, [{**row, "experiment": experiment}], CSV_COLUMNS)
        if args.steps_csv is not None:
            append_rows(args.steps_csv, [{**s, "experiment": experiment} for s in steps], STEPS_CSV_COLUMNS)

    return on_run


def _ms(seconds: float) -> str:
    return "n/a" if pd.isna(seconds) else f"{seconds * 1e3:.2f} ms"


NO_DECODE_STEP = "n/a (one token: no decode step)"  # what a decode figure reads when one new token leaves none


def summary_line(m: Measurement, spec_id: int = 0) -> str:
    """One line: the medians over repeats of one configuration's key figures (a figure that does not exist reads
    "n/a", saying why where the reason is known; never "nan")."""
    r = m.runs[m.runs.spec_id == spec_id]
    med = r.median(numeric_only=True)
    f = r.iloc[0].to_dict()  # (item access: a Series' .dtype attribute is not the dtype column)
    mbu = "n/a" if pd.isna(med["mbu"]) else f"{med['mbu']:.1%}"
    random = " RANDOM WEIGHTS" if f["weights"] == "random" else ""
    if int(f["max_new_tokens"]) == 1:  # the first token comes from the prefill: no decode step was timed
        per_token, decode_rate = NO_DECODE_STEP, f"decode {NO_DECODE_STEP}"
    else:
        per_token = f"{_ms(med['tpot_p50_s'])} (p90 {_ms(med['tpot_p90_s'])})"
        decode_rate = f"{_f(med['decode_tokens_per_s'])} tok/s decode"
    return (
        f"{f['model']} ({f['weights']}){random}, {f['engine']} cache={f['cache']}, {f['device']} {f['dtype']}, "
        f"batch {f['batch_size']}, prompt {f['prompt_len']}, {f['max_new_tokens']} new: "
        f"TTFT {_ms(med['ttft_s'])}, per-token p50 {per_token}, "
        f"{_f(med['tokens_per_s'])} tok/s end-to-end, {decode_rate}, "
        f"KV cache {_f(med['kv_cache_bytes'] / 2**20, '.2f')} MiB, peak {_f(med['peak_mem_mib'])} MiB "
        f"({f['peak_mem_kind']}), MBU {mbu} [median of {len(r)} repeats]"
    )


def run(args: argparse.Namespace) -> int:
    cache = resolve_cache(args.engine, args.use_cache, args.cache, args.model)
    spec = RunSpec(
        engine=args.engine,
        cache=cache,
        model=args.model,
        weights=args.weights,
        batch_size=args.batch_size,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        n_kv_head=args.n_kv_head,
    )
    spec.validate()
    _check_outputs(args)
    with one_line_warnings(), LoadMonitor() as load:
        m = measure_grid(
            [spec], args.repeats, args.warmup, progress=True, roofline=not args.no_roofline, on_run=_writer(args, "run")
        )
    where = f"; {len(m.runs)} rows appended to {args.csv}" if args.csv else ""
    print(summary_line(m) + where)
    _warn_if_busy(load.reading)
    return 0


def _warn_if_busy(reading: LoadReading) -> None:
    """A warning line when other processes took CPU time while we measured (kvlib.measure.machine_load)."""
    if reading.busy:
        print(f"warning: {reading.text()}", file=sys.stderr)


def experiment_specs(args: argparse.Namespace) -> list[tuple[str, str, list[RunSpec]]]:
    out = []
    for name, title, configs in EXPERIMENTS:
        specs = [
            RunSpec(
                engine=args.engine,
                cache=default_cache(args.engine, args.model) if use_cache else "none",
                model=args.model,
                weights=args.weights,
                batch_size=batch_size,
                prompt_len=prompt_len,
                max_new_tokens=EXPERIMENT_NEW_TOKENS,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
            )
            for use_cache, batch_size, prompt_len in configs
        ]
        out.append((name, title, specs))
    return out


def _ratio(a: float, b: float, better: str, worse: str) -> str:
    """'3.10x faster' when a/b >= 1, else '1.25x slower' (b/a), for figures where larger a is better."""
    if pd.isna(a) or pd.isna(b) or a <= 0 or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x {better}" if a >= b else f"{b / a:.2f}x {worse}"


def _judged(rows: pd.DataFrame, column: str, better: str, worse: str, higher_is_better: bool) -> str:
    """The cached runs' median `column` against the uncached ones' ('3.10x faster'), worded as a difference only
    when kvlib.core.stats' rule says the two sets of repeats are apart; else the ratio with why it may be noise."""
    with_cache = Spread.of(rows.loc[rows["use_cache"] == 1, column])
    without = Spread.of(rows.loc[rows["use_cache"] == 0, column])
    a, b = (with_cache.median, without.median) if higher_is_better else (without.median, with_cache.median)
    apart = with_cache.separated(without)
    if apart:
        return _ratio(a, b, better, worse)
    return f"{_times(a, b)} ({caveat(apart)})"


def _times(a: float, b: float) -> str:
    """'1.41x' for a / b; 'n/a' when either is missing or not positive (never 'nanx')."""
    if pd.isna(a) or pd.isna(b) or a <= 0 or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def _f(value: float, spec: str = ".1f") -> str:
    """A measured number, or 'n/a' when it is missing (never 'nan')."""
    return "n/a" if pd.isna(value) else format(value, spec)


def answers(results: dict[str, pd.DataFrame]) -> list[str]:
    """Plain-text answers to the assignment's three questions, from the medians over repeats of measured rows.

    Each answer first checks that its rows can carry it: a comparison needs both sides measured, a trend at least
    two distinct batch sizes or prompt lengths; otherwise it says what is missing instead of comparing a value with
    itself. Every ratio names its denominator."""
    lines = []
    keys = ["use_cache", "batch_size", "prompt_len"]
    med = {name: df.groupby(keys).median(numeric_only=True) for name, df in results.items() if len(df)}
    if "exp1_cache" in med:
        d = med["exp1_cache"]
        modes = set(d.index.get_level_values("use_cache"))
        if modes != {0, 1}:
            which = "with" if 1 in modes else "without"
            lines.append(
                f"1. Cache on vs off: only runs {which} the cache were measured, so there is nothing to compare."
            )
        else:
            on, off = d.xs(1, level="use_cache").iloc[0], d.xs(0, level="use_cache").iloc[0]
            raw = results["exp1_cache"]
            lines.append(
                f"1. Cache on vs off (prompt {int(d.index[0][2])}): per-token decode p50 {_ms(on.tpot_p50_s)} with vs "
                f"{_ms(off.tpot_p50_s)} without, {_judged(raw, 'tpot_p50_s', 'faster', 'slower', False)} per "
                f"token with the cache; end to end {_f(on.tokens_per_s)} vs {_f(off.tokens_per_s)} tok/s "
                f"({_judged(raw, 'tokens_per_s', 'more', 'less', True)} with the cache); TTFT "
                f"{_ms(on.ttft_s)} vs {_ms(off.ttft_s)}; peak memory {_f(on.peak_mem_mib)} vs "
                f"{_f(off.peak_mem_mib)} MiB, of which the KV cache holds {_f(on.kv_cache_bytes / 2**20, '.2f')} MiB."
            )
    if "exp2_batch" in med:
        d = med["exp2_batch"].reset_index().sort_values("batch_size")
        base = d.iloc[0]
        mem = ", ".join(_f(r.peak_mem_mib) for r in d.itertuples())
        kv = ", ".join(_f(r.kv_cache_bytes / 2**20, ".2f") for r in d.itertuples())
        if d["batch_size"].nunique() < 2:
            lines.append(
                f"2. Batch size (prompt {int(base.prompt_len)}): only batch {int(base.batch_size)} was measured "
                f"({_f(base.tokens_per_s)} tok/s end to end, per-token decode p50 {_ms(base.tpot_p50_s)}), so "
                "there is no trend with the batch size to report."
            )
        else:
            tput = ", ".join(
                f"batch {int(r.batch_size)}: {_f(r.tokens_per_s)} tok/s ({_times(r.tokens_per_s, base.tokens_per_s)})"
                for r in d.itertuples()
            )
            lat = ", ".join(f"{_ms(r.tpot_p50_s)}" for r in d.itertuples())
            lines.append(
                f"2. Batch size (prompt {int(base.prompt_len)}): end-to-end throughput (x: relative to batch "
                f"{int(base.batch_size)}) {tput}; per-token decode p50 {lat}; peak memory {mem} MiB; KV cache {kv} MiB."
            )
    if "exp3_prompt" in med:
        d = med["exp3_prompt"].reset_index().sort_values("prompt_len")
        lens = "/".join(str(int(p)) for p in d.prompt_len)
        lat = ", ".join(_ms(r.tpot_p50_s) for r in d.itertuples())
        ttft = ", ".join(_ms(r.ttft_s) for r in d.itertuples())
        tput = ", ".join(_f(r.tokens_per_s) for r in d.itertuples())
        kv = ", ".join(_f(r.kv_cache_bytes / 2**20, ".2f") for r in d.itertuples())
        mem = ", ".join(_f(r.peak_mem_mib) for r in d.itertuples())
        one = d["prompt_len"].nunique() < 2
        lines.append(
            f"3. Prompt length {lens} (batch 1): per-token decode p50 {lat}; TTFT {ttft}; end to end {tput} "
            f"tok/s; KV cache {kv} MiB; peak memory {mem} MiB"
            + (": one prompt length only, so there is no trend with the length to report." if one else ".")
        )
    return lines


def experiments(args: argparse.Namespace) -> int:
    plan = experiment_specs(args)
    for _, _, specs in plan:  # everything is checked before the first model is loaded
        for spec in specs:
            spec.validate()
    _check_outputs(args)
    pool = ModelPool()
    results: dict[str, pd.DataFrame] = {}
    with one_line_warnings(), LoadMonitor() as load:
        for n, (name, title, specs) in enumerate(plan, start=1):
            print(f"Experiment {n}/{len(plan)}: {title}, {EXPERIMENT_NEW_TOKENS} new tokens", flush=True)
            m = measure_grid(
                specs,
                args.repeats,
                args.warmup,
                progress=True,
                roofline=not args.no_roofline,
                on_run=_writer(args, name),
                pool=pool,
            )
            for spec_id in range(len(specs)):
                print("  " + summary_line(m, spec_id), flush=True)
            results[name] = m.runs
    print(f"Answers (medians of {args.repeats} repeats; {args.engine} engine):")
    for line in answers(results):
        print(line)
    if args.csv:
        print(f"{sum(len(df) for df in results.values())} rows appended to {args.csv}")
    _warn_if_busy(load.reading)
    return 0
