"""The hybrid cache (kvlib.caches.hybrid): a ring of sliding_window slots on sliding layers, static on full ones.

On tiny-gemma (window 8, shorter than every prompt here): the ring across several wraps computes what the naive
path (no cache, the model masks the window itself) computes, token for token, also with left padding and with a
prompt written in chunks; its bytes equal the per-layer formula; lossy layouts refuse a hybrid model in one line.
"""

from __future__ import annotations

import pytest
import torch

from kvlib.caches.base import CACHE_LAYOUTS, make_cache
from kvlib.caches.hybrid import HybridCache, hybrid_bytes, ring_slots
from kvlib.cli import main
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import kv_cache_bytes_formula
from kvlib.models.decode import generate
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts

CFG = get_preset("tiny-gemma")
W = CFG.sliding_window


@pytest.fixture(scope="module")
def gemma():
    """tiny-gemma with decisive logits (weights x 3, norms N(0, 0.3)), so that greedy tokens are not near-ties."""
    lm = load("tiny-gemma", weights="random", seed=0, with_hf=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in lm.model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 if name.endswith("norm.weight") else p * 3)
    return lm


def close(a, b):
    return (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_ring_slots_follow_absolute_positions():
    assert ring_slots(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert ring_slots(8, 8).tolist() == list(range(8))
    assert ring_slots(20, 8).tolist() == [16, 17, 18, 19, 12, 13, 14, 15]  # slot i holds the latest p = i mod 8
    assert ring_slots(3, 8, "cpu").dtype == torch.long


@pytest.mark.parametrize(("prompt_len", "new_tokens"), [(3, 40), (20, 30), (8, 20)])
def test_ring_across_several_wraps_equals_the_naive_path(gemma, prompt_len, new_tokens):
    assert prompt_len + new_tokens > 3 * W  # several wraps
    ids = synthetic_prompts(CFG.vocab_size, 2, prompt_len, seed=prompt_len)
    naive = generate(gemma.model, ids, new_tokens, cache="none", keep_logits=True)
    ring = generate(gemma.model, ids, new_tokens, cache="hybrid", keep_logits=True)
    assert torch.equal(ring.tokens, naive.tokens)
    assert close(ring.step_logits, naive.step_logits)
    assert len(set(ring.tokens[0].tolist())) > 3  # not a degenerate repetition that any mask would reproduce


def test_the_window_matters(gemma):
    """Without the sliding mask (every layer full) the same weights compute something else: the test above can
    fail."""
    from dataclasses import replace

    from kvlib.models.gemma3 import Gemma3

    full = Gemma3(replace(CFG, layer_types=(), sliding_window=0)).eval()
    full.load_state_dict(gemma.model.state_dict())
    ids = synthetic_prompts(CFG.vocab_size, 1, 3 * W, seed=5)
    pos = torch.arange(3 * W)[None]
    with torch.no_grad():
        assert not close(full(ids, pos, last_only=False), gemma.model(ids, pos, last_only=False))


def test_left_padding_inside_the_ring_equals_the_naive_path_and_each_row_alone(gemma):
    ids, mask = left_padded_prompts(CFG.vocab_size, [21, 13, 4], seed=3, pad_id=0)
    naive = generate(gemma.model, ids, 25, cache="none", attention_mask=mask, keep_logits=True)
    ring = generate(gemma.model, ids, 25, cache="hybrid", attention_mask=mask, keep_logits=True)
    assert torch.equal(ring.tokens, naive.tokens) and close(ring.step_logits, naive.step_logits)
    alone = generate(gemma.model, ids[1:2, 21 - 13 :], 25, cache="hybrid", keep_logits=True)
    assert torch.equal(alone.tokens[0], ring.tokens[1])
    assert close(alone.step_logits[:, 0], ring.step_logits[:, 1])


def test_a_prompt_written_in_chunks_equals_one_write(gemma):
    """Multi-token writes after the first (chunked prefill) attend over the ring's keys and the new ones."""
    ids = synthetic_prompts(CFG.vocab_size, 2, 30, seed=7)
    pos = torch.arange(30).expand(2, 30)
    with torch.no_grad():
        one = make_cache("hybrid", CFG, 2, 30, "cpu", torch.float32)
        whole = gemma.model(ids, pos, one, 0, last_only=False)
        chunks = make_cache("hybrid", CFG, 2, 30, "cpu", torch.float32)
        parts = [
            gemma.model(ids[:, a:b], pos[:, a:b], chunks, a, last_only=False) for a, b in ((0, 5), (5, 19), (19, 30))
        ]
    assert close(torch.cat(parts, dim=1), whole)
    for layer in range(CFG.n_layer):
        assert close(chunks.layer_kv(layer)[0], one.layer_kv(layer)[0])


@pytest.mark.parametrize(("batch_size", "max_len"), [(1, 5), (3, 50)])
def test_bytes_held_equal_the_per_layer_formula(batch_size, max_len):
    cache = make_cache("hybrid", CFG, batch_size, max_len, "cpu", torch.float32)
    held = cache.nbytes()
    assert held == hybrid_bytes(CFG, batch_size, max_len, 4)
    assert held == kv_cache_bytes_formula(CFG, batch_size, max_len, torch.float32, layout="hybrid", engine="kvlib")
    n_full = sum(CFG.window_of(i) is None for i in range(CFG.n_layer))
    per_slot = 2 * batch_size * CFG.n_kv_head * CFG.head_dim * 4
    assert held == per_slot * (n_full * max_len + (CFG.n_layer - n_full) * min(W, max_len))
    if max_len > W:
        assert held < kv_cache_bytes_formula(CFG, batch_size, max_len, torch.float32)  # less than a full cache


def test_layer_kv_unrolls_the_ring_in_slot_order(gemma):
    ids = synthetic_prompts(CFG.vocab_size, 1, 19, seed=2)
    g = generate(gemma.model, ids, 6, cache="hybrid")
    static = generate(gemma.model, ids, 6, cache="static")
    for layer in range(CFG.n_layer):
        k, _ = g.cache.layer_kv(layer)
        k_full, _ = static.cache.layer_kv(layer)
        assert g.cache.held_tokens(layer) == k.shape[2] == (24 if CFG.window_of(layer) is None else W)
        assert close(k, k_full[:, :, -k.shape[2] :])


def test_on_a_model_without_sliding_layers_it_is_the_static_cache(tiny):
    ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 9, seed=0)
    h = generate(tiny.model, ids, 5, cache="hybrid", keep_logits=True)
    s = generate(tiny.model, ids, 5, cache="static", keep_logits=True)
    assert torch.equal(h.tokens, s.tokens) and torch.equal(h.step_logits, s.step_logits)
    assert isinstance(h.cache, HybridCache) and h.cache.nbytes() == s.cache.nbytes()


@pytest.mark.parametrize(
    "layout", [n for n, cls in CACHE_LAYOUTS.items() if not cls.exact and not cls.keeps_positions]
)  # eviction policies (keeps_positions) compose: tests/test_gemma_eviction.py
def test_lossy_layouts_refuse_a_hybrid_model_in_one_line(layout):
    with pytest.raises(KvlibError, match="sliding window of 8 keys on 3 of 4 layers") as e:
        make_cache(layout, CFG, 1, 40, "cpu", torch.float32)
    assert "\n" not in str(e.value) and "use hybrid" in str(e.value)


def test_a_window_layout_larger_than_the_model_window_is_one_line_exit_2(capsys, tmp_path):
    """The window layout (its default window, 64, is larger than tiny-gemma's 8) on top of the model's own."""
    args = ["generate", "--model", "tiny-gemma", "--weights", "random", "--cache", "window", "--max_new_tokens", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "window cache" in err and "68 kept keys (sink + window) are more than the model's own window" in err
