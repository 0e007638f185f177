"""Memory and roofline accounting: the KV-cache formula equals the bytes actually held (kvlib and HF, dynamic and
static, across batch sizes, lengths, dtypes and grouped-query heads), peak memory sees what happens in a run,
units are what they say, and the roofline arithmetic is right."""

from __future__ import annotations

import contextlib
import ctypes
import math
import time

import pytest
import torch

from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import (
    PeakTracker,
    bytes_per_element,
    cache_tokens,
    held_cache_bytes,
    kv_cache_bytes_formula,
    mb,
    mib,
    module_weight_bytes,
)
from kvlib.measure.roofline import (
    decode_step_bytes,
    decode_weight_bytes,
    floor_s,
    mbu,
    measure_bandwidth_bytes_per_s,
    measure_matmul_flops,
)
from kvlib.models.decode import generate
from kvlib.models.hf import hf_generate
from kvlib.models.loading import load
from kvlib.models.prompts import synthetic_prompts

TINY = get_preset("tiny")
SIZES = [(1, 5, 4), (3, 17, 9)]  # (batch, prompt, new tokens)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny_dtype(request):
    return load("tiny", weights="random", dtype=request.param)


@pytest.fixture(scope="module")
def tiny_gqa():
    return load("tiny", weights="random", n_kv_head=2)


def test_units_are_what_they_say():
    assert mib(2**20) == 1.0 and mb(10**6) == 1.0
    assert mb(2**20) == pytest.approx(1.048576)
    assert bytes_per_element("float32") == 4 and bytes_per_element(torch.bfloat16) == 2


def test_formula_by_hand():
    # tiny: 2 layers, 4 kv heads of 16 dims; 2 (K, V) x 2 x batch 3 x 10 tokens x 4 x 16 x 4 bytes
    assert kv_cache_bytes_formula(TINY, 3, 10, torch.float32) == 2 * 2 * 3 * 10 * 4 * 16 * 4
    assert kv_cache_bytes_formula(TINY, 3, 10, "bfloat16") == 2 * 2 * 3 * 10 * 4 * 16 * 2
    assert kv_cache_bytes_formula(TINY.with_kv_heads(1), 3, 10, "float32") == 2 * 2 * 3 * 10 * 1 * 16 * 4


def test_cache_tokens_per_layout():
    assert cache_tokens("kvlib", "none", 10, 5) == cache_tokens("hf", "none", 10, 5) == 0
    assert cache_tokens("kvlib", "dynamic", 10, 5) == cache_tokens("hf", "dynamic", 10, 5) == 14
    assert cache_tokens("kvlib", "static", 10, 5) == 15  # preallocated P + N, the last slot never written
    assert cache_tokens("hf", "static", 10, 5) == 14  # generate sizes it max_length - 1


@pytest.mark.parametrize(("batch", "prompt", "new"), SIZES)
@pytest.mark.parametrize("layout", ["dynamic", "static"])
def test_formula_equals_held_kvlib(tiny_dtype, layout, batch, prompt, new):
    ids = synthetic_prompts(TINY.vocab_size, batch, prompt, seed=1)
    g = generate(tiny_dtype.model, ids, new, cache=layout)
    tokens = cache_tokens("kvlib", layout, prompt, new)
    assert held_cache_bytes(g.cache) == kv_cache_bytes_formula(TINY, batch, tokens, tiny_dtype.dtype) > 0
    assert all(t.dtype == tiny_dtype.dtype for t in g.cache.tensors())


@pytest.mark.parametrize(("batch", "prompt", "new"), SIZES)
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_formula_equals_held_hf(tiny_dtype, mode, batch, prompt, new):
    ids = synthetic_prompts(TINY.vocab_size, batch, prompt, seed=1)
    tiny_dtype.hf.__dict__.pop("_previous_max_cache_length", None)  # see the regression test below
    g = hf_generate(tiny_dtype.hf, ids, new, cache=mode)
    tokens = cache_tokens("hf", mode, prompt, new)
    assert held_cache_bytes(g.cache) == kv_cache_bytes_formula(TINY, batch, tokens, tiny_dtype.dtype) > 0


def test_hf_without_cache_holds_nothing(tiny):
    g = hf_generate(tiny.hf, synthetic_prompts(TINY.vocab_size, 1, 4), 3, cache="none")
    assert held_cache_bytes(g.cache) == 0


@pytest.mark.parametrize("layout", ["dynamic", "static"])
def test_formula_equals_held_grouped_query(tiny_gqa, tiny, layout):
    assert tiny_gqa.hf is None and tiny_gqa.cfg.n_kv_head == 2 < tiny_gqa.cfg.n_head
    ids = synthetic_prompts(TINY.vocab_size, 2, 9, seed=3)
    g = generate(tiny_gqa.model, ids, 5, cache=layout)
    tokens = cache_tokens("kvlib", layout, 9, 5)
    held = held_cache_bytes(g.cache)
    assert held == kv_cache_bytes_formula(tiny_gqa.cfg, 2, tokens, torch.float32)
    full = held_cache_bytes(generate(tiny.model, ids, 5, cache=layout).cache)
    assert held * 2 == full  # half the key/value heads, half the cache


def test_regression_hf_static_cache_sized_by_longest_previous_call():
    """HF's generate sizes a static cache by the longest previous call; measured rows must not inherit that
    (kvlib.models.hf.hf_generate resets it; tests/test_equivalence.py checks the call itself)."""
    from kvlib.measure.harness import RunSpec, measure_grid

    specs = [RunSpec("hf", "static", prompt_len=40, max_new_tokens=10), RunSpec("hf", "static", prompt_len=6)]
    runs = measure_grid(specs, repeats=2, warmup=1, roofline=False).runs
    assert (runs.kv_cache_bytes == runs.kv_cache_bytes_formula).all()


def test_held_bytes_of_odd_inputs():
    assert held_cache_bytes(None) == 0
    k = torch.zeros(1, 2, 3, 4)
    assert held_cache_bytes(((k, k), (k, k))) == 4 * k.numel() * 4  # legacy tuples
    with pytest.raises(KvlibError, match="cannot count"):
        held_cache_bytes(object())


def test_weight_bytes_count_the_tied_embedding_once(tiny):
    from kvlib.models.fastpath import packed_bytes

    assert tiny.model.weight_bytes() == TINY.n_params() * 4
    # What the process holds: the parameters plus any copy the CPU fast path packed for its kernels.
    assert module_weight_bytes(tiny.model) == TINY.n_params() * 4 + packed_bytes(tiny.model)
    assert module_weight_bytes(tiny.hf) == tiny.model.weight_bytes()
    assert module_weight_bytes(None) == 0


def _trim_heap() -> None:
    """Earlier tests (a real model loaded and freed) can leave large free chunks in the C heap whose pages stay
    resident; an allocation served from them does not raise RSS. Hand them back to the kernel first (glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _allocate_and_free(n_bytes: int) -> None:
    x = torch.ones(n_bytes // 4)  # ones touches every page, so it is resident
    time.sleep(0.05)  # long enough for the sampling fallback to see it
    del x


def test_peak_rss_sees_a_transient_allocation():
    _trim_heap()
    with PeakTracker("cpu") as t:
        _allocate_and_free(64 * 2**20)
    assert t.result.kind == "rss" and t.result.reserved_peak_bytes is None
    assert t.result.delta_bytes >= 60 * 2**20


def test_peak_rss_sampling_fallback(monkeypatch):
    import kvlib.measure.memory as memory

    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    _trim_heap()
    with PeakTracker("cpu") as t:
        _allocate_and_free(64 * 2**20)
    assert t.result.delta_bytes >= 60 * 2**20


def test_decode_step_bytes_reads_weights_once_and_the_cache(tiny):
    params = sum(p.numel() for p in tiny.model.parameters())  # tied embedding once
    d = TINY.n_embd
    # every weight but the position table, plus one gathered row of each embedding per sequence
    assert decode_weight_bytes(TINY, 2, "float32") == (params - TINY.n_positions * d + 2 * 2 * d) * 4
    kv = decode_step_bytes(TINY, 2, 30, "float32") - decode_weight_bytes(TINY, 2, "float32")
    assert kv == kv_cache_bytes_formula(TINY, 2, 30, "float32")


def test_mbu_and_floor_arithmetic():
    assert floor_s(1e9, 1e10) == pytest.approx(0.1)
    assert mbu(1e9, 0.2, 1e10) == pytest.approx(0.5)
    assert math.isnan(mbu(1e9, math.nan, 1e10)) and math.isnan(mbu(1e9, 0.1, math.nan))
    assert math.isnan(floor_s(1e9, math.nan))


def test_machine_measurements_are_positive_and_cached():
    bw = measure_bandwidth_bytes_per_s("cpu", size_bytes=8 * 2**20, repeats=2)
    assert 1e8 < bw < 1e13
    assert measure_bandwidth_bytes_per_s("cpu", size_bytes=8 * 2**20, repeats=2) == bw  # once per process
    flops = measure_matmul_flops("cpu", "float32")
    assert 1e7 < flops < 1e15
