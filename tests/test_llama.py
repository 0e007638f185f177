"""The Llama-family decoder (kvlib.models.llama): the same function as Hugging Face's LlamaForCausalLM on every path.

Random weights on the tiny-llama preset (4 query heads sharing 2 KV heads, untied LM head) and variants of it;
one test on the real SmolLM2-135M weights, skipped when their package is not installed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvlib.models.attention as kvattention
import kvlib.models.fastpath as fastpath
from kvlib.core.config import PRESETS, config_from_hf, get_preset, hf_config_from
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import kv_cache_bytes_formula
from kvlib.measure.roofline import decode_weight_bytes
from kvlib.models.decode import generate
from kvlib.models.decoders import build_model
from kvlib.models.hf import hf_generate
from kvlib.models.llama import Llama
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts

REL_TOL = 1e-4  # of the reference's largest |logit| (at least 1), as kvlib.measure.verify
KVLIB = ("none", "dynamic", "static", "paged")
HF = ("none", "dynamic", "static")


@pytest.fixture(scope="module")
def tiny_llama():
    return load("tiny-llama", weights="random", seed=0)


def all_paths(lm, ids, n, mask=None):
    out = {}
    for c in KVLIB:
        options = {"attention_mask": mask} if c == "paged" and mask is not None else None
        out[f"kvlib-{c}"] = generate(
            lm.model, ids, n, cache=c, attention_mask=mask, keep_logits=True, cache_options=options
        )
    for c in HF:
        out[f"hf-{c}"] = hf_generate(lm.hf, ids, n, cache=c, attention_mask=mask, keep_logits=True)
    return out


def assert_all_equal(paths):
    ref = paths["hf-none"]
    tol = REL_TOL * max(1.0, ref.step_logits.abs().max().item())
    for name, g in paths.items():
        assert torch.equal(g.tokens, ref.tokens), name
        assert (g.step_logits - ref.step_logits).abs().max().item() <= tol, name


@pytest.mark.parametrize(("seed", "batch_size", "prompt_len", "new_tokens"), [(0, 1, 1, 3), (1, 3, 17, 12)])
def test_tiny_llama_every_path_matches_hf(seed, batch_size, prompt_len, new_tokens):
    lm = load("tiny-llama", weights="random", seed=seed)
    assert isinstance(lm.model, Llama) and type(lm.hf).__name__ == "LlamaForCausalLM"
    ids = synthetic_prompts(lm.cfg.vocab_size, batch_size, prompt_len, seed)
    assert_all_equal(all_paths(lm, ids, new_tokens))


def test_tiny_llama_left_padding_matches_hf_and_each_prompt_alone(tiny_llama):
    lengths = [12, 5, 9]
    ids, mask = left_padded_prompts(tiny_llama.cfg.vocab_size, lengths, seed=7)
    paths = all_paths(tiny_llama, ids, 8, mask)
    assert_all_equal(paths)
    for row, n in enumerate(lengths):  # RoPE positions count real tokens only: padding is invisible
        alone = generate(tiny_llama.model, ids[row : row + 1, -n:], 8, cache="static")
        assert torch.equal(alone.tokens[0], paths["kvlib-static"].tokens[row])


@pytest.mark.parametrize(("n_kv_head", "tied"), [(1, False), (4, True)])
def test_multi_query_multi_head_and_tied_variants_match_hf(n_kv_head, tied, monkeypatch):
    """Hugging Face's Llama has grouped-query attention, so every kv-head count has a reference to match."""
    cfg = replace(PRESETS["tiny-llama"], name="tiny-llama-variant", tie_word_embeddings=tied)
    monkeypatch.setitem(PRESETS, "tiny-llama-variant", cfg)
    lm = load("tiny-llama-variant", weights="random", seed=2, n_kv_head=n_kv_head)
    assert lm.cfg.n_kv_head == n_kv_head and lm.hf is not None
    assert (lm.model.lm_head.weight is lm.model.wte.weight) == tied
    assert lm.cfg.n_params() == sum(p.numel() for p in lm.hf.parameters()) == lm.model.weight_bytes() // 4
    ids = synthetic_prompts(lm.cfg.vocab_size, 2, 9, seed=2)
    assert_all_equal(all_paths(lm, ids, 6))


def test_cache_holds_keys_already_rotated_like_hf(tiny_llama):
    """Keys are rotated before caching: the kvlib cache after the prompt holds exactly HF's cached keys, with
    n_kv_head heads (not n_head)."""
    ids = synthetic_prompts(tiny_llama.cfg.vocab_size, 2, 15, seed=3)
    mine = generate(tiny_llama.model, ids, 1, cache="dynamic")
    with torch.inference_mode():
        theirs = tiny_llama.hf(ids, use_cache=True).past_key_values
    for layer in range(tiny_llama.cfg.n_layer):
        k, v = mine.cache.layer_kv(layer)
        assert k.shape == (2, 2, 15, 16)
        torch.testing.assert_close(k, theirs.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, theirs.layers[layer].values, atol=1e-5, rtol=1e-5)


def test_fast_path_fp32_tokens_equal_naive_without_packing(tiny_llama, monkeypatch):
    ids = synthetic_prompts(tiny_llama.cfg.vocab_size, 3, 20, seed=4)
    fast = generate(tiny_llama.model, ids, 10, cache="static", keep_logits=True)  # the kernel measured for 3 rows
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    naive = generate(tiny_llama.model, ids, 10, cache="none", keep_logits=True)  # plain F.linear
    assert torch.equal(fast.tokens, naive.tokens)
    assert (fast.step_logits - naive.step_logits).abs().max().item() <= REL_TOL


def test_bfloat16_decodes_through_one_query_attention_and_keeps_rope_in_float32(monkeypatch):
    calls = []
    real = kvattention.one_query_attention
    monkeypatch.setattr(kvattention, "one_query_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    lm = load("tiny-llama", weights="random", seed=0, dtype="bfloat16")
    assert lm.model.inv_freq.dtype == torch.float32 and lm.hf.model.rotary_emb.inv_freq.dtype == torch.float32
    ids, mask = left_padded_prompts(lm.cfg.vocab_size, [10, 4], seed=3)
    g = generate(lm.model, ids, 6, cache="static", attention_mask=mask)
    assert g.tokens.shape == (2, 6)
    assert calls == [(2, 4, 1, 16)] * (5 * lm.cfg.n_layer)  # every decode step of every layer, 4 query heads


def test_window_layout_with_rope_keeps_each_key_at_its_original_position(tiny_llama):
    """While the sequence fits, the window equals the static cache; once it slides, the keys it keeps are the
    static cache's keys at the same absolute positions (rotated there once, never re-rotated)."""
    model = tiny_llama.model
    ids = synthetic_prompts(tiny_llama.cfg.vocab_size, 2, 10, seed=2)
    exact = generate(model, ids, 11, cache="static", keep_logits=True)
    fits = generate(model, ids, 11, cache="window", cache_options={"sink": 4, "window": 16}, keep_logits=True)
    assert torch.equal(fits.tokens, exact.tokens)
    torch.testing.assert_close(fits.step_logits, exact.step_logits, atol=1e-6, rtol=0)

    slid = generate(model, ids, 30, cache="window", cache_options={"sink": 2, "window": 8}, keep_logits=True)
    assert torch.isfinite(slid.step_logits).all() and slid.cache.seq_len == 39
    # The same tokens through a static cache give every position's key, rotated at that position. Layer 0's keys
    # depend only on the token and its position, so the window's kept keys must be those (a key re-rotated to a
    # position inside the window would differ); deeper layers also saw the evictions, so only their sinks match.
    static = generate(model, torch.cat([ids, slid.tokens[:, :-1]], dim=1), 1, cache="static").cache
    positions = [0, 1, *range(31, 39)]  # the sinks and the last 8 positions
    slots = [p if p < 2 else 2 + (p - 2) % 8 for p in positions]  # where the ring buffer keeps them
    kept, _ = slid.cache.layer_kv(0)  # (B, nkv, 10, hd)
    torch.testing.assert_close(kept[:, :, slots], static.layer_kv(0)[0][:, :, positions], atol=1e-5, rtol=1e-5)
    for layer in range(1, tiny_llama.cfg.n_layer):
        sinks = slid.cache.layer_kv(layer)[0][:, :, :2]
        torch.testing.assert_close(sinks, static.layer_kv(layer)[0][:, :, :2], atol=1e-5, rtol=1e-5)


def test_kv_bytes_and_weight_bytes_follow_the_formulas(tiny_llama):
    cfg = tiny_llama.cfg
    ids = synthetic_prompts(cfg.vocab_size, 3, 7, seed=1)
    static = generate(tiny_llama.model, ids, 5, cache="static").cache
    dynamic = generate(tiny_llama.model, ids, 5, cache="dynamic").cache
    assert static.nbytes() == kv_cache_bytes_formula(cfg, 3, 12, torch.float32) == 2 * 2 * 3 * 12 * 2 * 16 * 4
    assert dynamic.nbytes() == kv_cache_bytes_formula(cfg, 3, 11, torch.float32)
    # Untied: the LM head is read whole, the input embedding only its B rows.
    V, d = cfg.vocab_size, cfg.n_embd
    assert decode_weight_bytes(cfg, 3, "float32") == (cfg.n_params() - V * d + 3 * d) * 4
    smol = get_preset("smollm2-135m")
    assert smol.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4
    assert 134e6 < smol.n_params() < 135e6  # "135M"


def test_config_round_trips_through_hf_and_refuses_what_kvlib_lacks():
    cfg = get_preset("smollm2-135m")
    back = config_from_hf(hf_config_from(cfg), cfg.name)
    assert back == replace(cfg, gguf_requirement=None, gguf_file=None)
    odd = hf_config_from(cfg)
    odd.mlp_bias = True
    with pytest.raises(KvlibError, match="biases"):
        config_from_hf(odd, "odd")
    with pytest.raises(KvlibError, match="even head_dim"):
        replace(cfg, n_embd=9 * 63)
    assert isinstance(build_model(get_preset("tiny-llama")), Llama)


def test_real_smollm2_weights_continue_and_match_hf():
    """The one test on the real weights: SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF) knows Berlin,
    and kvlib's static cache, paged cache and HF agree token for token. The first run converts the GGUF (~30 s),
    later ones load the cached float32 weights."""
    from kvlib.models.gguf_cache import find_gguf

    cfg = get_preset("smollm2-135m")
    try:
        path = find_gguf(cfg)
    except KvlibError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    from gguf import GGUFReader

    meta = {k: f.contents() for k, f in GGUFReader(path).fields.items() if k.startswith("llama.")}
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (
        cfg.n_layer, cfg.n_embd, cfg.intermediate_size,
    )  # fmt: skip
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (cfg.n_head, cfg.n_kv_head)
    assert (meta["llama.context_length"], meta["llama.rope.freq_base"]) == (cfg.n_positions, cfg.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)

    lm = load("smollm2-135m", weights="pretrained")
    assert lm.weights == "pretrained" and "dequantized from the Q4_1 GGUF" in lm.source
    ids = lm.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    ref = hf_generate(lm.hf, ids, 3, cache="dynamic", keep_logits=True)
    assert lm.tokenizer.decode(ref.tokens[0]).startswith(" Berlin")
    for cache in ("static", "paged"):
        g = generate(lm.model, ids, 3, cache=cache, keep_logits=True)
        assert torch.equal(g.tokens, ref.tokens), cache
        assert (g.step_logits - ref.step_logits).abs().max().item() <= REL_TOL * ref.step_logits.abs().max().item()


def test_harness_measures_tiny_llama_with_the_kv_formula_of_its_kv_heads():
    from kvlib.measure.harness import RunSpec, measure_grid

    specs = [
        RunSpec(engine="kvlib", cache="static", model="tiny-llama", batch_size=2, prompt_len=8, max_new_tokens=4),
        RunSpec(engine="hf", cache="dynamic", model="tiny-llama", batch_size=2, prompt_len=8, max_new_tokens=4),
        RunSpec(engine="hf", cache="dynamic", model="tiny-llama", batch_size=1, prompt_len=8, max_new_tokens=4,
                n_kv_head=1),  # HF's Llama has multi-query attention too
    ]  # fmt: skip
    runs = measure_grid(specs, repeats=1, warmup=0, roofline=False).runs
    assert (runs["kv_cache_bytes"] == runs["kv_cache_bytes_formula"]).all()
    assert runs["n_kv_head"].tolist() == [2, 2, 1] and (runs["tokens_generated"] == [8, 8, 4]).all()
