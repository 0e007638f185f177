"""The roofline of this machine, measured, and how close each decode step comes to it.

A decode step of batch B must read every weight once and the whole KV cache once; it does little arithmetic per
byte, so its floor is memory bandwidth: floor_s = bytes read / bandwidth. Model bandwidth utilisation
MBU = bytes read per step / (step time x bandwidth): 1.0 would be a step as fast as the memory allows.

Both machine figures are measured, not taken from a datasheet, once per process (cached), in well under 2 s:
- read bandwidth: `sum` over a 256 MiB float32 buffer (larger than any cache), best of 5;
- matmul throughput: a square matmul in the run's dtype, grown until one takes ~20 ms, best of 3.
Best, not median: the best repeat is the one least disturbed by other work, i.e. closest to what the hardware
can do, which is what a floor should use. Set KVLIB_NO_ROOFLINE=1 to skip both (figures become NaN).
"""

from __future__ import annotations

import functools
import math
import os
import time

import torch

from kvlib.core.config import ModelConfig
from kvlib.measure.memory import MIB, bytes_per_element
from kvlib.models.loading import DTYPES

BANDWIDTH_BUFFER_BYTES = 256 * MIB
_bandwidth_cache: dict[str, float] = {}
_flops_cache: dict[tuple[str, str], float] = {}


def roofline_enabled() -> bool:
    return os.environ.get("KVLIB_NO_ROOFLINE", "0").lower() not in ("1", "true", "yes", "on")


def _timed(fn, device: torch.device, iters: int) -> float:
    """Seconds for one call of fn, averaged over `iters` back-to-back calls (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure_bandwidth_bytes_per_s(
    device: torch.device | str = "cpu", size_bytes: int = BANDWIDTH_BUFFER_BYTES, repeats: int = 5
) -> float:
    """Memory read bandwidth in bytes/s: a float32 `sum` over `size_bytes`, best of `repeats`; cached per device."""
    dev = torch.device(device)
    key = f"{dev}:{size_bytes}"
    if key in _bandwidth_cache:
        return _bandwidth_cache[key]
    buf = torch.ones(size_bytes // 4, dtype=torch.float32, device=dev)
    iters = 10 if dev.type == "cuda" else 1  # a GPU reads 256 MiB in ~0.1 ms: time several back to back
    buf.sum()  # warm-up: first touch, kernel selection
    best_s = min(_timed(buf.sum, dev, iters) for _ in range(repeats))
    del buf
    _bandwidth_cache[key] = buf_bytes = (size_bytes // 4) * 4 / best_s
    return buf_bytes


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32") -> float:
    """Dense matmul throughput in FLOP/s (2 n^3 per n x n product), best of 3; cached per (device, dtype)."""
    dev = torch.device(device)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    key = (str(dev), str(dt))
    if key in _flops_cache:
        return _flops_cache[key]
    n, max_n = 256, (16384 if dev.type == "cuda" else 4096)
    iters = 10 if dev.type == "cuda" else 1
    while True:
        fn = functools.partial(torch.matmul, torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt))
        fn()
        t = _timed(fn, dev, iters)
        if t >= 0.02 or n >= max_n:
            break
        n *= 2
    best_s = min(t, *(_timed(fn, dev, iters) for _ in range(2)))
    _flops_cache[key] = flops = 2 * n**3 / best_s
    return flops


def decode_weight_bytes(cfg: ModelConfig, batch_size: int, dtype: torch.dtype | str) -> int:
    """Weight bytes one decode step reads: every matrix, bias and norm once; the LM head (V x C) whole, a tied
    embedding once, as the LM head; the input embedding (and GPT-2's position embedding) only their B gathered
    rows."""
    d, V = cfg.n_embd, cfg.vocab_size
    params = cfg.n_params() + batch_size * d  # n_params counts a tied wte once (as the head); + the rows gathered
    if cfg.arch == "gpt2":
        params += batch_size * d - cfg.n_positions * d  # wpe: B rows, not the whole table
    elif not cfg.tie_word_embeddings:
        params -= V * d  # an untied input embedding: only its B rows (counted above)
    return params * bytes_per_element(dtype)


def decode_step_bytes(cfg: ModelConfig, batch_size: int, kv_tokens: int, dtype: torch.dtype | str) -> int:
    """Bytes a decode step must read: the weights (`decode_weight_bytes`) plus the keys and values of `kv_tokens`
    tokens per sequence (those already cached and the new one)."""
    kv = cfg.kv_bytes_per_token(bytes_per_element(dtype)) * batch_size * kv_tokens
    return decode_weight_bytes(cfg, batch_size, dtype) + kv


def floor_s(step_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """The fastest a step reading `step_bytes` can be at this bandwidth (NaN when it was not measured)."""
    if not bandwidth_bytes_per_s or math.isnan(bandwidth_bytes_per_s):
        return math.nan
    return step_bytes / bandwidth_bytes_per_s


def mbu(step_bytes: float, step_s: float, bandwidth_bytes_per_s: float) -> float:
    """Model bandwidth utilisation: bytes the step must read / (its time x bandwidth); NaN when unknown."""
    if not step_s or math.isnan(step_s) or not bandwidth_bytes_per_s or math.isnan(bandwidth_bytes_per_s):
        return math.nan
    return step_bytes / (step_s * bandwidth_bytes_per_s)


def machine_roofline(device: torch.device | str, dtype: torch.dtype | str, enabled: bool = True) -> dict[str, float]:
    """{"bandwidth_bytes_per_s", "matmul_flops_per_s"} of this machine (NaN when disabled)."""
    if not (enabled and roofline_enabled()):
        return {"bandwidth_bytes_per_s": math.nan, "matmul_flops_per_s": math.nan}
    return {
        "bandwidth_bytes_per_s": measure_bandwidth_bytes_per_s(device),
        "matmul_flops_per_s": measure_matmul_flops(device, dtype),
    }
