"""The bench's results: the CSV's columns, the table printed at the end, and the verdicts on the speed targets.

The targets are data (kvlib/data/bench_targets.yaml, each with where it comes from): a figure of the row (a ratio
HF TPOT / kvlib TPOT, or kvlib's MBU) at least a minimum, on the rows the target names. Gemma 3's rows are judged by
their own rule instead (`gemma_report`): kvlib's hybrid cache no slower than HF generate. A ratio target can ask for
a step faster than the memory floor measured in the same run; the report then says so (`beyond_the_floor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

COLUMNS = (
    "model", "arch", "weights", "device", "dtype", "native_dtype", "batch_size", "prompt_len", "max_new_tokens",
    "repeats", "threads", "row_limit_s", "time_bound_hit", "row_s", "kvlib_compile", "kvlib_setup_s",
    "kvlib_weights_mib", "kvlib_packed_copy_mib",
    "kvlib_tpot_p50_ms", "hf_dynamic_tpot_p50_ms", "hf_static_tpot_p50_ms",
    "kvlib_tpot_range_ms", "hf_dynamic_tpot_range_ms", "hf_static_tpot_range_ms",
    "ratio_hf_dynamic", "ratio_hf_best", "kvlib_tokens_per_s", "hf_best_tokens_per_s",
    "kvlib_ttft_ms", "hf_dynamic_ttft_ms", "hf_static_ttft_ms", "ratio_ttft_hf_dynamic", "llamacpp_tpot_p50_ms",
    "llamacpp_mbu",
    "decode_step_bytes", "bandwidth_gb_per_s", "floor_step_ms", "mbu",
    "agreement_vs_fp32", "first_divergence_step",
    "target_b1_fp32_vs_hf_best", "target_vs_hf_best", "target_b1_mbu", "target_b1_bf16_mbu",
    "other_cpu_cores", "busy_machine", "loadavg_before", "loadavg_after",
    "device_name", "torch_version", "transformers_version", "git_commit", "timestamp",
)  # fmt: skip
TARGETS_FILE = "bench_targets.yaml"  # in kvlib/data


@dataclass(frozen=True)
class Target:
    name: str  # the CSV column is target_<name>
    column: str  # the row's figure it checks
    minimum: float
    applies: Callable[[dict[str, Any]], bool]
    text: str
    source: str = ""  # where the target comes from, in words


def _timed(r: dict[str, Any]) -> bool:
    """Rows whose timings mean something: not an emulated dtype (those rows are labelled, not judged)."""
    return bool(r.get("native_dtype", True))


def _llama_b1_fp32_cpu(r: dict[str, Any]) -> bool:
    return r.get("arch") == "llama" and r["batch_size"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu"


def _llama_b1_bf16_native(r: dict[str, Any]) -> bool:
    return r.get("arch") == "llama" and r["batch_size"] == 1 and r["dtype"] == "bfloat16" and r["device"] == "cpu"


def _gemma(r: dict[str, Any]) -> bool:
    """Gemma 3 rows are judged by the hybrid cache's rule (`gemma_report`), not by the speed targets."""
    return r.get("arch") == "gemma3"


# The rows a target may judge, by the name its entry in TARGETS_FILE gives under `rows`.
ROW_SELECTORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "llama_batch1_float32_cpu": lambda r: _timed(r) and _llama_b1_fp32_cpu(r),
    "llama_batch1_bfloat16_native": lambda r: _timed(r) and _llama_b1_bf16_native(r),
    "every_other_row": lambda r: _timed(r) and not _llama_b1_fp32_cpu(r) and not _gemma(r),
    "gemma3": _gemma,  # an emulated dtype's row is reported "not judged" (gemma_report)
}


def load_targets(text: str | None = None) -> tuple[tuple[Target, ...], Target]:
    """(the speed targets, the hybrid cache's rule), read from `text` (YAML) or else kvlib/data/bench_targets.yaml.
    Raises ValueError on an entry it cannot read."""
    if text is None:
        text = resources.files("kvlib").joinpath("data", TARGETS_FILE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return tuple(target_entry(entry) for entry in data["targets"]), target_entry(data["hybrid_cache"])


def target_entry(
    entry: dict[str, Any],
    columns: Sequence[str] = COLUMNS,
    selectors: Mapping[str, Callable[[dict[str, Any]], bool]] | None = None,
) -> Target:
    """One entry of TARGETS_FILE as a Target; its text gets " >= <minimum>" appended. `columns`: the figures it may
    check (the bench CSV's by default); `selectors`: the rows it may judge (ROW_SELECTORS by default)."""
    selectors = ROW_SELECTORS if selectors is None else selectors
    missing = {"name", "column", "minimum", "rows", "text", "source"} - set(entry)
    if missing:
        raise ValueError(f"{TARGETS_FILE}: target {entry.get('name')!r} lacks {', '.join(sorted(missing))}")
    if entry["rows"] not in selectors:
        raise ValueError(
            f"{TARGETS_FILE}: target {entry['name']!r} judges rows {entry['rows']!r}; "
            f"choose one of {', '.join(selectors)}"
        )
    if entry["column"] not in columns:
        raise ValueError(
            f"{TARGETS_FILE}: target {entry['name']!r} checks {entry['column']!r}; choose one of {', '.join(columns)}"
        )
    minimum = float(entry["minimum"])
    applies = selectors[entry["rows"]]
    text = f"{entry['text']} >= {minimum}"
    return Target(entry["name"], entry["column"], minimum, applies, text, " ".join(entry["source"].split()))


TARGETS, GEMMA_RULE = load_targets()
GEMMA_TARGET = GEMMA_RULE.minimum  # Gemma 3: best HF TPOT / kvlib TPOT at least this ("no slower": 1)


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


def fmt(value: float, spec: str) -> str:
    """`value` formatted by `spec`, or "-" when it was not measured (None, NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'model':<13} {'dtype':<8} {'batch':>5} {'kvlib ms':>9} {'HF dyn ms':>9} {'HF stat ms':>10} {'llama.cpp':>9} "
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
            f"{str(r['model'])[:13]:<13} {r['dtype']:<8} {r['batch_size']:>5} {fmt(r['kvlib_tpot_p50_ms'], '.2f'):>9} "
            f"{fmt(r['hf_dynamic_tpot_p50_ms'], '.2f'):>9} {fmt(r['hf_static_tpot_p50_ms'], '.2f'):>10} "
            f"{fmt(r.get('llamacpp_tpot_p50_ms', math.nan), '.2f'):>9} "
            f"{fmt(r['ratio_hf_dynamic'], '.2f'):>8}x {fmt(r['ratio_hf_best'], '.2f'):>9}x "
            f"{fmt(r['kvlib_tokens_per_s'], '.1f'):>11} {fmt(r['mbu'], '.2f'):>5} "
            f"{fmt(r.get('ratio_ttft_hf_dynamic', math.nan), '.2f'):>13}x "
            f"{fmt(r['agreement_vs_fp32'], '.0%'):>6}  {verdict}" + (f"  ({'; '.join(notes)})" if notes else "")
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
            f"{r.get('model', '')} {r['dtype']} b{r['batch_size']}: {fmt(r[t.column], '.2f')}".strip() for r in checked
        )
        lines.append(f"  {'MISSED' if failed else 'met':<6} {t.text} ({figures})")
        lines += [f"         {note}" for r in failed if (note := beyond_the_floor(t, r))]
    return "\n".join(lines), all_met


def gemma_report(rows: Sequence[dict[str, Any]]) -> str | None:
    """The hybrid cache's rule on the Gemma 3 rows: decode on kvlib's hybrid cache no slower than HF generate (best
    HF TPOT / kvlib TPOT >= GEMMA_TARGET, and HF DynamicCache's ratio beside it); None without such a row."""
    lines = []
    for r in rows:
        if not GEMMA_RULE.applies(r):
            continue
        best, dyn = r[GEMMA_RULE.column], r["ratio_hf_dynamic"]
        measured = best is not None and not math.isnan(best)
        verdict = "n/a (not measured)" if not measured else "met" if best >= GEMMA_TARGET else "MISSED"
        if not r.get("native_dtype", True):
            verdict = "not judged (emulated dtype)"
        lines.append(
            f"  {verdict:<6} {r['model']} {r['dtype']} batch {r['batch_size']}, prompt {r['prompt_len']}: best HF / "
            f"kvlib hybrid = {fmt(best, '.2f')}x, HF dynamic / kvlib hybrid = {fmt(dyn, '.2f')}x "
            f"(kvlib {fmt(r['kvlib_tpot_p50_ms'], '.2f')} ms per token; target >= {GEMMA_TARGET:g}x: no slower)"
        )
    return "\n".join(lines) if lines else None
