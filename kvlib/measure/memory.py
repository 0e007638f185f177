"""Memory accounting: the KV cache from its formula and from the tensors actually held, and peak process memory.

Units: bytes everywhere inside; MiB (2^20 bytes) and MB (10^6 bytes) only at the edges, named as such.

KV-cache formula, a sum over layers (`kv_cache_bytes_formula`):

    bytes = sum over layers l of 2 (K and V) x batch x n_kv_head x head_dim x bytes per element x slots_l

    slots_l = min(tokens, window_l)  on a sliding-window layer, when the layout keeps only the window there
                                     (kvlib's `hybrid`: a ring buffer of window_l slots; HF's StaticCache);
              min(tokens, window_l - 1)  HF's DynamicCache on a sliding layer (it keeps window - 1 past tokens
                                     and attends over those plus the new one);
              tokens                 on every other layer, and on every layer of every other layout.

For a model without sliding layers (GPT-2, Llama, SmolLM2) this is the familiar
2 x layers x batch x tokens x n_kv_head x head_dim x bytes per element. `tokens` is what the cache holds or
reserves at the end of a generation, which depends on the layout (`cache_tokens`):

- a growing ("dynamic") cache holds prompt + new - 1 tokens: the last new token is never fed back;
- kvlib's static cache is preallocated for prompt + new slots (the last one is never written), and so are the
  full-attention layers of kvlib's hybrid cache (its sliding layers: min(prompt + new, window) slots);
- Hugging Face's static cache is sized by `generate` to max_length - 1 = prompt + new - 1 slots.

Peak memory of one run:
- CUDA: `torch.cuda.reset_peak_memory_stats` before, `max_memory_allocated` / `max_memory_reserved` after.
- CPU: the process's peak resident set size during the run. Linux keeps a high-water mark (VmHWM) that can be
  reset by writing 5 to /proc/self/clear_refs, so the peak of one run is read exactly, at no cost while it runs.
  Where that is not allowed, a background thread samples RSS every millisecond (which can miss a short spike).
  RSS counts everything the process holds: every loaded model, Python, libraries, the allocator's free lists.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from kvlib.caches.base import CACHE_LAYOUTS, KVCache
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.models.fastpath import packed_bytes
from kvlib.models.hf import HF_DYNAMIC, HF_STATIC
from kvlib.models.loading import DTYPES

MIB = 2**20
MB = 10**6


def mib(n_bytes: float) -> float:
    """Bytes to MiB (2^20 bytes)."""
    return n_bytes / MIB


def mb(n_bytes: float) -> float:
    """Bytes to MB (10^6 bytes), the unit of the assignment's `peak_mem_mb`."""
    return n_bytes / MB


def bytes_per_element(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        try:
            dtype = DTYPES[dtype]
        except KeyError:
            raise KvlibError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None
    if not isinstance(dtype, torch.dtype):
        raise checks.fail("dtype", dtype, "a torch.dtype or a dtype name (float32, bfloat16, float16, ...)")
    return torch.empty((), dtype=dtype).element_size()


# Hugging Face's caches that keep only the window on a sliding layer, and how many slots fewer than the window they
# keep between steps (its DynamicSlidingWindowLayer keeps window - 1). kvlib's layouts say it themselves
# (KVCache.layer_slots); every other cache holds every token on every layer, as far as this formula goes.
HF_WINDOWED = {HF_STATIC: 0, HF_DYNAMIC: 1}


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's sliding window (keys a query sees, itself included), None on a full-attention layer."""
    checks.config("cfg", cfg, where="layer_windows:")
    return [cfg.window_of(layer) for layer in range(cfg.n_layer)]


def layer_slots(cfg: ModelConfig, tokens: int, layout: str = "full", engine: str = "kvlib") -> list[int]:
    """Token slots each layer's cache holds (or reserves) after `tokens` positions, one entry per layer.

    `layout` is a cache layout name ("hybrid", "static", "dynamic", ...; "full" for any layout that keeps every
    token) and `engine` "kvlib" or "hf" (Hugging Face's caches use their own rules on sliding layers: the module
    docstring). Without sliding layers every entry is `tokens`.
    """
    where = "layer_slots:"
    checks.whole("tokens", tokens, minimum=0, where=where)
    checks.one_of("engine", engine, ("kvlib", "hf"), where=where)
    if not isinstance(layout, str) or not layout:
        raise checks.fail("layout", layout, 'a cache layout name ("full", "hybrid", "static", ...)', where)
    windows = layer_windows(cfg)
    if engine == "kvlib" and layout in CACHE_LAYOUTS:
        return CACHE_LAYOUTS[layout].layer_slots(cfg, tokens)
    if engine == "kvlib" or layout not in HF_WINDOWED:
        return [tokens] * len(windows)
    keep = HF_WINDOWED[layout]
    return [tokens if w is None else min(tokens, w - keep) for w in windows]


def kv_cache_bytes_formula(
    cfg: ModelConfig,
    batch_size: int,
    tokens: int,
    dtype: torch.dtype | str,
    layout: str = "full",
    engine: str = "kvlib",
) -> int:
    """KV-cache bytes after `tokens` positions, summed over layers (the module docstring's formula):

        sum over layers l of 2 x batch x n_kv_head x head_dim x bytes per element x slots_l

    with slots_l from `layer_slots` (min(tokens, window_l) on a sliding layer of a windowed layout such as
    kvlib's "hybrid", `tokens` otherwise). The default layout "full" is 2 x layers x batch x tokens x n_kv_head x
    head_dim x bytes, for any model. Raises KvlibError on a bad argument.
    """
    where = "kv_cache_bytes_formula:"
    checks.config("cfg", cfg, where=where)
    checks.whole("batch_size", batch_size, where=where)
    checks.whole("tokens", tokens, minimum=0, where=where)
    per_slot = 2 * batch_size * cfg.n_kv_head * cfg.head_dim * bytes_per_element(dtype)  # K and V, one layer
    return per_slot * sum(layer_slots(cfg, tokens, layout, engine))


def cache_tokens(engine: str, cache: str, prompt_len: int, max_new_tokens: int) -> int:
    """Token slots the cache holds (or reserves) at the end of a generation of `max_new_tokens` tokens.

    Derived from the layout's rules, not read from the cache, so that formula == held is a real check. For any
    other layout (paged, quantized, windowed, ...) this is the logical length, prompt + new - 1: the formula is
    then the dense cache those tokens would need, and the bytes held may differ (block rounding, compression).
    """
    checks.one_of("engine", engine, ("kvlib", "hf", "llamacpp"), where="cache_tokens:")
    if not isinstance(cache, str):
        raise checks.fail("cache", cache, 'a cache mode: "none" or a layout name', "cache_tokens:")
    checks.whole("prompt_len", prompt_len, where="cache_tokens:")
    checks.whole("max_new_tokens", max_new_tokens, where="cache_tokens:")
    if cache == "none":
        return 0
    if engine == "llamacpp":
        return prompt_len + max_new_tokens  # the context llama.cpp was created with (ModelPool.llamacpp)
    if engine == "kvlib" and cache in CACHE_LAYOUTS and CACHE_LAYOUTS[cache].reserves_run_length:
        return prompt_len + max_new_tokens  # decode.generate preallocates P + N slots (hybrid: on full layers)
    # Growing caches, and HF's static cache (sized max_length - 1 by generate), end with the last token unfed.
    return prompt_len + max_new_tokens - 1


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def held_cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a cache holds: a kvlib KVCache, a Hugging Face Cache, legacy tuples, or None (0)."""
    if cache is None:
        return 0

    if isinstance(cache, KVCache):
        return int(cache.nbytes())
    if hasattr(cache, "layers"):  # transformers' DynamicCache / StaticCache: one layer object per layer
        total = 0
        for layer in cache.layers:
            total += _tensor_bytes(getattr(layer, "keys", None)) + _tensor_bytes(getattr(layer, "values", None))
        return total
    if isinstance(cache, (tuple, list)):  # the legacy ((k, v), ...) format
        return sum(_tensor_bytes(c) if isinstance(c, torch.Tensor) else held_cache_bytes(c) for c in cache)
    raise KvlibError(f"cannot count the bytes of a cache of type {type(cache).__name__}")


def held_storage_bytes(cache: Any) -> int:
    """Bytes of the memory blocks (storages) behind the tensors a cache holds, each block counted once.

    `held_cache_bytes` counts the elements the cache's tensors show; this counts what they keep alive. The two
    differ where a cache keeps a view into a larger tensor: Hugging Face's DynamicCache on a sliding layer keeps
    the last window - 1 keys as a slice of the tensor it concatenated, so right after the prefill the slice keeps
    the whole prompt's keys alive, and after a decode step window keys (tests/test_hybrid_memory.py)."""
    if cache is None:
        return 0

    if isinstance(cache, KVCache):
        tensors = cache.tensors()
    elif hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    else:
        raise KvlibError(f"cannot count the storage of a cache of type {type(cache).__name__}")
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_weight_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters (a tied parameter, GPT-2's embedding / LM head, counted once), plus the
    copies kvlib's CPU fast path packs for its kernels (kvlib.models.fastpath): weights the process holds."""
    if module is None:
        return 0

    return sum(p.numel() * p.element_size() for p in module.parameters()) + packed_bytes(module)


# ---- peak memory of one run ----------------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB (KiB)
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm_bytes() is not None


@dataclass
class PeakMemory:
    kind: str  # "cuda_allocated" (torch's allocator) or "rss" (the process's resident set)
    before_bytes: int  # allocated / resident just before the run
    peak_bytes: int  # the most allocated / resident at any moment of the run
    reserved_peak_bytes: int | None = None  # CUDA only: the most the caching allocator reserved

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = current_rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        proc = psutil.Process()
        while not self._stop_event.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_bytes())


class PeakTracker:
    """`with PeakTracker(device) as t: ...` then `t.result`, a PeakMemory of what happened inside the block."""

    def __init__(self, device: torch.device | str, sample_interval_s: float = 0.001) -> None:
        self.device = checks.torch_device("device", device, where="PeakTracker:")
        self.sample_interval_s = checks.positive_number("sample_interval_s", sample_interval_s, where="PeakTracker:")
        self.result: PeakMemory | None = None
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> PeakTracker:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._before = current_rss_bytes()
            if not _reset_hwm():
                self._sampler = _RssSampler(self.sample_interval_s)
                self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = PeakMemory(
                "cuda_allocated",
                self._before,
                torch.cuda.max_memory_allocated(self.device),
                torch.cuda.max_memory_reserved(self.device),
            )
            return
        peak = self._sampler.stop() if self._sampler is not None else (_vm_hwm_bytes() or current_rss_bytes())
        self.result = PeakMemory("rss", self._before, max(peak, self._before))
