"""Eviction policies on a model trained with sliding windows (tiny-gemma): they compose with the model's own
windows. Every kept key's slot is known, so a sliding layer still hides keys outside its window; while the budget
covers the sequence every policy equals the static cache, also past the window and in both question settings."""

from __future__ import annotations

import pytest
import torch

import kvlib.caches  # noqa: F401  (registers the layouts)
from kvlib.caches.base import make_cache
from kvlib.caches.eviction import POLICIES
from kvlib.core.errors import KvlibError
from kvlib.decoding.questions import answer_greedily
from kvlib.models.decode import generate
from kvlib.models.loading import load
from kvlib.models.prompts import synthetic_prompts

SMALL = {"snapkv": {"observation": 3}, "h2o": {"recent": 2}, "streaming": {"sink": 2}}


@pytest.fixture(scope="module")
def gemma():
    model = load("tiny-gemma", weights="random", seed=0, with_hf=False).model
    assert model.cfg.is_hybrid and model.cfg.sliding_window < 14  # the prompts below outgrow the window
    return model


@pytest.mark.parametrize("policy", POLICIES)
def test_eviction_on_a_sliding_window_model_equals_static_while_the_budget_covers(gemma, policy):
    """Regression: the eviction layouts were refused on hybrid models, and Gemma's attention bypassed `attend`
    (so H2O, TOVA and SnapKV never saw attention weights). Past the window, a sliding layer must still mask."""
    ids = synthetic_prompts(gemma.cfg.vocab_size, 2, 14, seed=5)
    static = generate(gemma, ids, 6, cache="static", keep_logits=True)
    out = generate(gemma, ids, 6, cache=policy, cache_options={"budget": 20, **SMALL.get(policy, {})}, keep_logits=True)
    assert torch.equal(out.tokens, static.tokens)
    torch.testing.assert_close(out.step_logits, static.step_logits, atol=1e-5, rtol=0)
    assert out.cache.evicted_tokens == 0


@pytest.mark.parametrize("question_aware", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_both_question_settings_on_a_sliding_window_model(gemma, policy, question_aware):
    ids = synthetic_prompts(gemma.cfg.vocab_size, 1, 16, seed=6)
    static = generate(gemma, ids, 5, cache="static")
    kv = make_cache(policy, gemma.cfg, 1, 21, "cpu", torch.float32, budget=21, **SMALL.get(policy, {}))
    answer = answer_greedily(gemma, kv, ids[:, :11], ids[:, 11:], 5, question_aware=question_aware)
    assert torch.equal(answer, static.tokens)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_small_budget_on_a_sliding_window_model_holds_the_budget(gemma, policy):
    ids = synthetic_prompts(gemma.cfg.vocab_size, 1, 14, seed=7)
    out = generate(gemma, ids, 8, cache=policy, cache_options={"budget": 6, **SMALL.get(policy, {})})
    assert out.tokens.shape == (1, 8)
    for layer in range(gemma.cfg.n_layer):
        assert out.cache.layer_kv(layer)[0].shape[2] <= 6


@pytest.mark.parametrize("layout, options", [("window", {"sink": 2, "window": 4}), ("quantized", {})])
def test_other_lossy_layouts_still_refuse_a_sliding_window_model(gemma, layout, options):
    with pytest.raises(KvlibError, match="does not compose"):
        make_cache(layout, gemma.cfg, 1, 32, "cpu", torch.float32, **options)
