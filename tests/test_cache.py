"""Cache layouts: explicit slots are checked, capacity is enforced, memory is what the tensors hold."""

from __future__ import annotations

import pytest
import torch

from kvlib.caches.base import CACHE_LAYOUTS, CacheOverflowError, make_cache
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.models.decode import generate
from kvlib.models.prompts import synthetic_prompts

CFG = get_preset("tiny")


def kv(batch, t, fill=1.0):
    shape = (batch, CFG.n_kv_head, t, CFG.head_dim)
    return torch.full(shape, fill), torch.full(shape, -fill)


@pytest.mark.parametrize("layout", ["dynamic", "static"])
def test_update_returns_every_entry_so_far_in_order(layout):
    cache = make_cache(layout, CFG, 2, 8, "cpu", torch.float32)
    cache.update(0, *kv(2, 3, 1.0), start=0)
    k, v = cache.update(0, *kv(2, 1, 2.0), start=3)
    assert k.shape == (2, CFG.n_kv_head, 4, CFG.head_dim)
    assert k[:, :, :3].eq(1.0).all() and k[:, :, 3].eq(2.0).all() and v[:, :, 3].eq(-2.0).all()


@pytest.mark.parametrize("layout", ["dynamic", "static"])
def test_write_at_wrong_slot_is_refused(layout):
    cache = make_cache(layout, CFG, 1, 8, "cpu", torch.float32)
    cache.update(0, *kv(1, 3), start=0)
    with pytest.raises(KvlibError, match="next free slot is 3"):
        cache.update(0, *kv(1, 1), start=2)


def test_regression_static_cache_overflow_raises_instead_of_wrapping():
    """A preallocated cache written one past its end must fail loudly (LLMs-from-scratch fixed such a bug)."""
    cache = make_cache("static", CFG, 1, 4, "cpu", torch.float32)
    cache.update(0, *kv(1, 4), start=0)
    with pytest.raises(CacheOverflowError, match="overflows its 4 slots"):
        cache.update(0, *kv(1, 1), start=4)


def test_static_cache_holds_its_capacity_and_dynamic_only_what_is_written(tiny):
    ids = synthetic_prompts(CFG.vocab_size, 3, 10, seed=1)
    per_token = CFG.kv_bytes_per_token(4) * 3  # fp32, batch 3
    static = generate(tiny.model, ids, 5, cache="static").cache
    dynamic = generate(tiny.model, ids, 5, cache="dynamic").cache
    assert static.nbytes() == per_token * (10 + 5)  # preallocated to the final length
    assert dynamic.nbytes() == per_token * (10 + 5 - 1)  # the last token is never fed back


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(KvlibError, match="unknown cache layout 'bogus'"):
        make_cache("bogus", CFG, 1, 4, "cpu", torch.float32)


def test_registry_has_the_basic_layouts():
    assert {"dynamic", "static"} <= set(CACHE_LAYOUTS)
