"""Timing one bench row: kvlib's set-up, then the three engines interleaved, one repeat at a time, within the row's
time bound (SIGALRM stops a repeat still running when it passes), then, for half precision, the agreement of its
tokens with float32; and the row's figures from the harness's runs (medians over repeats, HF / kvlib ratios).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pandas as pd
import torch

from kvlib.caches.base import make_cache
from kvlib.core.errors import KvlibError
from kvlib.core.hardware import DtypeSupport
from kvlib.measure.bench.plan import ENGINES, LLAMACPP
from kvlib.measure.bench.table import COLUMNS, check_targets
from kvlib.measure.harness import Measurement, ModelPool, RunSpec, measure_grid
from kvlib.measure.machine_load import LoadMonitor, LoadReading
from kvlib.measure.provenance import provenance
from kvlib.models import fastpath
from kvlib.models.decode import decode_step, generate, greedy, prefill, prepare_positions
from kvlib.models.decoders import Decoder
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.loading import DTYPES, dtype_name, resolve_device
from kvlib.models.prompts import synthetic_prompts


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


def unmeasured_row(spec: RunSpec) -> dict[str, Any]:
    """The row of a spec none of whose repeats completed within the time bound: its settings, every figure NaN."""
    figures = [
        c for c in COLUMNS if c.endswith(("_ms", "_s", "_per_s", "_bytes", "_mbu")) or c.startswith(("ratio_", "mbu"))
    ]
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
    cpp = runs[runs["engine"] == LLAMACPP[1]]
    first = runs[runs["engine"] == "kvlib"].iloc[0]
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
        "llamacpp_tpot_p50_ms": 1e3 * float(cpp["tpot_p50_s"].median()) if len(cpp) else math.nan,
        "llamacpp_mbu": float(cpp["mbu"].median()) if len(cpp) else math.nan,
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


def measure_row(
    specs: list[RunSpec],
    pool: ModelPool,
    repeats: int,
    warmup: int,
    limit_s: float = math.inf,
    support: DtypeSupport | None = None,
    *,
    compile_one_row: bool | None = None,
) -> tuple[dict[str, Any], LoadReading]:
    """One row: kvlib's set-up (weight packing, compilation) timed on its own, then the three engines measured
    interleaved, one harness call per repeat (order reversed every other repeat), with other processes' CPU use
    over that time, then (half precision) the agreement with float32. All of it within `limit_s` seconds from
    the first measured run: no repeat is started that would cross the bound (by the last one's duration), and
    one still running at the bound is stopped. `compile_one_row`: whether kvlib's batch-1 decoding may use the
    torch.compile'd one-row kernel (`fastpath.prepare_for_inference`; None: the process default, KVLIB_COMPILE);
    the models keep the choice through the harness's and generate's own preparation. Returns the row and the
    load reading of its measurement."""
    if compile_one_row is None:
        compile_one_row = fastpath.compile_default()
    spec = specs[0]
    lm = pool.get(spec.model_key(), need_kvlib=True, need_hf=True)
    need_ref = spec.dtype != "float32" and (support is None or support.native)
    ref = pool.get(replace(spec, dtype="float32").model_key(), need_kvlib=True, need_hf=False) if need_ref else None
    setup_s = prepare_for_inference(lm.model, spec.batch_size, compile_one_row=compile_one_row)
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
                    # the float32 reference decodes with the same kernels' choice (its generate keeps it)
                    prepare_for_inference(ref.model, spec.batch_size, compile_one_row=compile_one_row)
                    ids = synthetic_prompts(lm.cfg.vocab_size, spec.batch_size, spec.prompt_len, spec.seed, lm.device)
                    share, first = agreement(lm.model, ref.model, ids, spec.max_new_tokens)
        except RowTimeBound:
            hit = True
    reading = monitor.reading
    if measured:
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
    row["kvlib_compile"] = bool(compile_one_row and spec.batch_size == 1 and lm.device.type == "cpu")
    row["kvlib_setup_s"] = setup_s
    # Not a CSV column (a new column would refuse to append to an existing bench.csv): printed with the row.
    row["kvlib_kernel"] = fastpath.model_kernel(lm.model, spec.batch_size) if lm.device.type == "cpu" else "-"
    # What kvlib's model holds: its parameters (a tied embedding / LM head once) and, on top, the fast path's
    # packed copy of the Linear weights, oneDNN's or MKL's (README "Speed", memory).
    row["kvlib_weights_mib"] = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    row["kvlib_packed_copy_mib"] = fastpath.packed_bytes(lm.model) / 2**20
    row.update(check_targets(row))
    return row, reading
