"""The heart of correctness: every decoding path computes the same tokens and logits as Hugging Face."""

from __future__ import annotations

import pytest
import torch

from kvlib.core.errors import KvlibError
from kvlib.models.decode import generate
from kvlib.models.hf import hf_generate
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts

# fp32 paths differ only in the order of floating-point sums; on the tiny model that is ~1e-7.
LOGIT_ATOL = 1e-4
KVLIB = ("none", "dynamic", "static")
HF = ("none", "dynamic", "static")


def all_paths(lm, ids, n, mask=None):
    out = {f"kvlib-{c}": generate(lm.model, ids, n, cache=c, attention_mask=mask, keep_logits=True) for c in KVLIB}
    for c in HF:
        out[f"hf-{c}"] = hf_generate(lm.hf, ids, n, cache=c, attention_mask=mask, keep_logits=True)
    return out


@pytest.mark.parametrize(
    ("seed", "batch_size", "prompt_len", "new_tokens"),
    [(0, 1, 1, 1), (1, 1, 17, 12), (2, 3, 8, 20), (3, 4, 40, 9), (4, 2, 100, 30)],
)
def test_every_path_gives_identical_tokens_and_close_logits(seed, batch_size, prompt_len, new_tokens):
    lm = load("tiny", weights="random", seed=seed)
    ids = synthetic_prompts(lm.cfg.vocab_size, batch_size, prompt_len, seed)
    paths = all_paths(lm, ids, new_tokens)
    ref = paths["hf-none"]
    assert ref.tokens.shape == (batch_size, new_tokens)
    for name, g in paths.items():
        assert torch.equal(g.tokens, ref.tokens), name
        assert g.step_logits.shape == (new_tokens, batch_size, lm.cfg.vocab_size)
        assert (g.step_logits - ref.step_logits).abs().max().item() <= LOGIT_ATOL, name
        assert len(g.decode_s) == new_tokens - 1


def test_left_padded_batch_matches_each_prompt_alone(tiny):
    lengths = [12, 5, 9]
    ids, mask = left_padded_prompts(tiny.cfg.vocab_size, lengths, seed=7)
    paths = all_paths(tiny, ids, 10, mask)
    ref = paths["hf-none"]
    for name, g in paths.items():
        assert torch.equal(g.tokens, ref.tokens), name
        assert (g.step_logits - ref.step_logits).abs().max().item() <= LOGIT_ATOL, name
    # Padding must be invisible: each row decodes as it would unpadded, alone.
    for row, n in enumerate(lengths):
        alone = generate(tiny.model, ids[row : row + 1, -n:], 10, cache="static", keep_logits=True)
        assert torch.equal(alone.tokens[0], paths["kvlib-static"].tokens[row])
        assert (alone.step_logits[:, 0] - paths["kvlib-static"].step_logits[:, row]).abs().max() <= LOGIT_ATOL


def test_cache_after_prefill_holds_hf_keys_and_values(tiny):
    ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 24, seed=3)
    mine = generate(tiny.model, ids, 1, cache="dynamic")  # one token: the cache holds the prompt only
    with torch.inference_mode():
        theirs = tiny.hf(ids, use_cache=True).past_key_values
    assert mine.cache.seq_len == 24
    for layer in range(tiny.cfg.n_layer):
        k, v = mine.cache.layer_kv(layer)
        assert k.shape == (2, tiny.cfg.n_kv_head, 24, tiny.cfg.head_dim)
        torch.testing.assert_close(k, theirs.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, theirs.layers[layer].values, atol=1e-5, rtol=1e-5)


def test_static_and_dynamic_caches_hold_the_same_entries(tiny):
    ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 10, seed=4)
    a = generate(tiny.model, ids, 6, cache="dynamic").cache
    b = generate(tiny.model, ids, 6, cache="static").cache
    assert a.seq_len == b.seq_len == 15  # prompt + new tokens - 1: the last token is never fed back
    for layer in range(tiny.cfg.n_layer):
        for x, y in zip(a.layer_kv(layer), b.layer_kv(layer), strict=True):
            assert torch.equal(x, y)


class _CorruptingCache:
    """Wraps a cache and overwrites one stored key after it is written: the outputs must notice."""

    def __init__(self, inner, layer, slot):
        self.inner, self.layer, self.slot = inner, layer, slot

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, layer, k, v, start):
        keys, values = self.inner.update(layer, k, v, start)
        if layer == self.layer and keys.shape[2] > self.slot:
            keys[:, :, self.slot] = 3.0
        return keys, values


def test_corrupting_one_cached_position_changes_the_output(tiny, monkeypatch):
    """The equivalence tests can fail: damage one cached key and the cached path no longer matches."""
    import kvlib.models.decode as decode

    ids = synthetic_prompts(tiny.cfg.vocab_size, 1, 16, seed=5)
    clean = generate(tiny.model, ids, 12, cache="static", keep_logits=True)
    real_make_cache = decode.make_cache
    monkeypatch.setattr(decode, "make_cache", lambda *a, **k: _CorruptingCache(real_make_cache(*a, **k), 0, 3))
    broken = generate(tiny.model, ids, 12, cache="static", keep_logits=True)
    assert (broken.step_logits - clean.step_logits).abs().max().item() > 1e-3


def test_exactly_max_new_tokens_even_when_eos_is_the_greedy_choice(tiny):
    ids = synthetic_prompts(tiny.cfg.vocab_size, 1, 8, seed=6)
    eos = generate(tiny.model, ids, 1).tokens[0, 0].item()  # make the first greedy token the end-of-sequence id
    gen_cfg = tiny.hf.generation_config
    gen_cfg.eos_token_id = eos
    try:
        with torch.inference_mode():  # plain generate stops at once: the trap an honest benchmark must avoid
            assert tiny.hf.generate(ids, max_new_tokens=9, do_sample=False).shape[1] == 8 + 1
        with pytest.raises(KvlibError, match="eos_token_id"):
            hf_generate(tiny.hf, ids, 9)
    finally:
        gen_cfg.eos_token_id = None
    tiny.hf.config.eos_token_id = eos  # the model config's id must not stop generate either
    try:
        for c in HF:
            assert hf_generate(tiny.hf, ids, 9, cache=c).tokens.shape == (1, 9)
    finally:
        tiny.hf.config.eos_token_id = tiny.cfg.vocab_size - 1
    for c in KVLIB:
        assert generate(tiny.model, ids, 9, cache=c).tokens.shape == (1, 9)


def test_regression_hf_static_cache_sized_by_this_call_not_the_longest_earlier_one(tiny):
    """HF generate reuses the largest static-cache length seen so far; hf_generate must size each call alone."""
    long_ids = synthetic_prompts(tiny.cfg.vocab_size, 1, 60, seed=1)
    short_ids = synthetic_prompts(tiny.cfg.vocab_size, 1, 6, seed=2)
    hf_generate(tiny.hf, long_ids, 30, cache="static")
    cache = hf_generate(tiny.hf, short_ids, 4, cache="static").cache
    assert max(layer.keys.shape[2] for layer in cache.layers) < 60
