"""The int8 cache's decode step over its codes (kvlib.caches.quantized.attention_over_codes, through
QuantizedCache.decode_attention): the same attention as the dequantized copy, within float rounding, on random
caches and through whole models; and where it does not apply, nothing is written twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvlib.caches.quantized as quantized
from kvlib.caches.base import make_cache
from kvlib.caches.quantized import attention_over_codes, dequantize, quantize
from kvlib.models.loading import load
from kvlib.models.prompts import synthetic_prompts
from kvlib.study.strategies import teacher_forced_logits


@pytest.mark.parametrize(("n", "r", "block"), [(40, 0, 1024), (40, 3, 16), (0, 5, 16), (37, 0, 8)])
def test_attention_over_codes_equals_attention_over_the_dequantized_cache(n, r, block, monkeypatch):
    """Random keys and values quantized per token (one scale per token and head), GQA 6 heads over 2: the
    scores-after-products formula against SDPA over the dequantized keys and values, with a tail and codes read in
    blocks (block smaller than n: several blocks, one partly filled)."""
    monkeypatch.setattr(quantized, "CODE_BLOCK", block)
    g = torch.Generator().manual_seed(0)
    B, nh, nkv, hd = 2, 6, 2, 16
    q = torch.randn(B, nh, 1, hd, generator=g)
    k, v = torch.randn(B, nkv, n, hd, generator=g) * 3, torch.randn(B, nkv, n, hd, generator=g)
    kc, ks, kz = quantize(k, 8, -1, torch.float32)
    vc, vs, vz = quantize(v, 8, -1, torch.float32)
    tk = torch.randn(B, nkv, r, hd, generator=g) if r else None
    tv = torch.randn(B, nkv, r, hd, generator=g) if r else None
    keys = torch.cat([dequantize(kc, ks, kz, torch.float32), *([tk] if r else [])], dim=2)
    values = torch.cat([dequantize(vc, vs, vz, torch.float32), *([tv] if r else [])], dim=2)
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    got = attention_over_codes(q, kc, ks, kz, vc, vs, vz, tk, tv)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("options", [{"bits": 8}, {"bits": 8, "residual_len": 4}])
def test_int8_decode_over_codes_matches_the_dequantized_path_through_the_model(options, monkeypatch):
    """SmolLM2-shaped tiny Llama, teacher-forced: every step's logits with attention over the codes against the
    dequantized copy (ATTEND_CODES off): equal within float rounding, so the tokens are the same."""
    lm = load("tiny-llama", weights="random", seed=0, with_hf=False)
    ids = synthetic_prompts(lm.cfg.vocab_size, 2, 12, seed=3)
    follow = synthetic_prompts(lm.cfg.vocab_size, 2, 10, seed=4)
    with torch.inference_mode():
        fused = teacher_forced_logits(lm.model, ids, follow, "quantized", options)
        monkeypatch.setattr(quantized, "ATTEND_CODES", False)
        copied = teacher_forced_logits(lm.model, ids, follow, "quantized", options)
    assert (fused - copied).abs().max() < 1e-4
    assert torch.equal(fused.argmax(-1), copied.argmax(-1))


def test_decode_attention_applies_only_to_int8_per_token_decode_steps():
    """int4, per-channel keys, channel groups, the prompt and multi-token writes answer None and write nothing;
    the int8 per-token cache writes once and advances by one token."""
    lm = load("tiny-llama", weights="random", seed=0, with_hf=False)
    cfg = lm.cfg
    q = torch.randn(1, cfg.n_head, 1, cfg.head_dim)
    one = torch.randn(1, cfg.n_kv_head, 1, cfg.head_dim)
    for options in ({"bits": 4}, {"bits": 8, "key_axis": "channel", "residual_len": 4}, {"bits": 8, "group": 8}):
        kv = make_cache("quantized", cfg, 1, 8, "cpu", torch.float32, **options)
        kv.update(0, one, one, 0)
        assert kv.decode_attention(0, q, one, one, 1) is None and kv.lengths[0] == 1, options
    kv = make_cache("quantized", cfg, 1, 8, "cpu", torch.float32, bits=8)
    assert kv.decode_attention(0, q, one, one, 0) is None and kv.lengths[0] == 0  # the prompt: update's
    kv.update(0, one, one, 0)
    two = torch.randn(1, cfg.n_kv_head, 2, cfg.head_dim)
    assert kv.decode_attention(0, q, two, two, 1) is None and kv.lengths[0] == 1  # a chunk: update's
    y = kv.decode_attention(0, q, one, one, 1)
    assert y.shape == q.shape and kv.lengths[0] == 2 and kv.n_quant[0] == 2
