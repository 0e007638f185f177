"""The cache layouts beyond static/dynamic: exact where they claim to be, lossy ones bounded, memory accounted."""

from __future__ import annotations

import math

import pytest
import torch

import kvlib.caches  # noqa: F401  (registers the layouts even where kvlib/__init__.py is not run)
from kvlib.caches.base import CACHE_LAYOUTS, CacheOverflowError, make_cache
from kvlib.caches.paged import BlockPool, PagedCache
from kvlib.caches.quantized import dequantize, pack_int4, quantize, unpack_int4
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.decoding.prefix import generate_with_shared_prefix
from kvlib.models.decode import generate
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts
from kvlib.study.strategies import teacher_forced_logits

CFG = get_preset("tiny")
BPT = CFG.kv_bytes_per_token(4)  # fp32 bytes of one token of one sequence


@pytest.fixture(scope="module")
def model():
    return load("tiny", weights="random", seed=0, with_hf=False).model


def test_layouts_are_registered_with_honest_exact_flags():
    assert {"paged", "quantized", "window"} <= set(CACHE_LAYOUTS)
    assert CACHE_LAYOUTS["paged"].exact
    assert not CACHE_LAYOUTS["quantized"].exact
    assert not CACHE_LAYOUTS["window"].exact


# ---- paged -------------------------------------------------------------------------------------------------------


EXACT_VARIANTS = [("paged", {"block_size": 16}), ("paged", {"block_size": 3}), ("dynamic", {})]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_exact_layouts_give_the_naive_tokens(model, seed, batch_size):
    ids = synthetic_prompts(CFG.vocab_size, batch_size, 13, seed=seed)
    naive = generate(model, ids, 12, cache="none", keep_logits=True)
    for layout, options in EXACT_VARIANTS:
        out = generate(model, ids, 12, cache=layout, cache_options=options, keep_logits=True)
        assert torch.equal(out.tokens, naive.tokens), (layout, options)
        # Tokens alone are a lax check on a small random model; the logits must agree too.
        torch.testing.assert_close(out.step_logits, naive.step_logits, atol=1e-4, rtol=0)


def test_paged_with_padding_mapped_out_gives_the_naive_tokens_and_stores_only_real_tokens(model):
    lengths = [3, 11, 7]
    ids, mask = left_padded_prompts(CFG.vocab_size, lengths, seed=4)
    naive = generate(model, ids, 9, cache="none", attention_mask=mask, keep_logits=True)
    stored = [n + 9 - 1 for n in lengths]  # the last new token is never fed back
    for block_size in (1, 4, 16):
        options = {"attention_mask": mask, "block_size": block_size}
        out = generate(model, ids, 9, cache="paged", attention_mask=mask, cache_options=options, keep_logits=True)
        assert torch.equal(out.tokens, naive.tokens)
        torch.testing.assert_close(out.step_logits, naive.step_logits, atol=1e-4, rtol=0)
        kv = out.cache
        assert kv.real_tokens() == stored
        assert kv.allocated_bytes() == sum(math.ceil(n / block_size) for n in stored) * kv.pool.block_bytes
        assert kv.used_bytes() == sum(stored) * BPT


def test_paged_refuses_a_mask_that_is_not_left_padding():
    with pytest.raises(KvlibError, match="left padding"):
        PagedCache(CFG, 1, 8, "cpu", torch.float32, attention_mask=torch.tensor([[1, 0, 1]]))


def test_layouts_work_with_grouped_query_attention():
    gqa = load("tiny", weights="random", n_kv_head=2, with_hf=False).model
    ids = synthetic_prompts(CFG.vocab_size, 2, 9, seed=3)
    static = generate(gqa, ids, 8, cache="static", keep_logits=True)
    for layout, options in [("paged", {"block_size": 4}), ("window", {"sink": 2, "window": 30}), ("quantized", {})]:
        out = generate(gqa, ids, 8, cache=layout, cache_options=options, keep_logits=True)
        assert out.cache.layer_kv(0)[0].shape[1] == 2  # stored with n_kv_head = 2 heads
        atol = 1e-2 if layout == "quantized" else 1e-5
        torch.testing.assert_close(out.step_logits, static.step_logits, atol=atol, rtol=0)


def test_paged_waste_on_a_hand_checked_example():
    """Block size 4; rows of 3 and 6 real tokens (the first left-padded by 3): 1 + 2 blocks = 12 slots for 9
    tokens, so 25% of the allocated bytes hold nothing."""
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kv = PagedCache(CFG, 2, 8, "cpu", torch.float32, block_size=4, attention_mask=mask)
    k = torch.randn(2, CFG.n_kv_head, 6, CFG.head_dim)
    for layer in range(CFG.n_layer):
        kv.update(layer, k, k, 0)
    assert kv.pool.block_bytes == 4 * BPT
    assert [len(t) for t in kv.tables] == [1, 2]
    assert kv.allocated_bytes() == 12 * BPT and kv.used_bytes() == 9 * BPT
    assert 1 - kv.used_bytes() / kv.allocated_bytes() == pytest.approx(0.25)


def test_paged_gather_returns_what_was_written_in_slot_order():
    kv = PagedCache(CFG, 2, 10, "cpu", torch.float32, block_size=3)
    written = []
    for start, t in ((0, 4), (4, 1), (5, 1), (6, 3)):
        k = torch.randn(2, CFG.n_kv_head, t, CFG.head_dim)
        written.append(k)
        for layer in range(CFG.n_layer):
            keys, values = kv.update(layer, k, -k, start)
    expected = torch.cat(written, dim=2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert torch.equal(kv.layer_kv(0)[0], expected)


def test_paged_blocks_all_return_to_the_pool_after_release(model):
    ids = synthetic_prompts(CFG.vocab_size, 3, 10, seed=0)
    kv = generate(model, ids, 7, cache="paged", cache_options={"block_size": 4}).cache
    assert kv.pool.num_used == 3 * math.ceil((10 + 7 - 1) / 4)
    kv.release(1)
    assert kv.pool.num_used == 2 * math.ceil(16 / 4) and kv.real_tokens() == [16, 0, 16]
    kv.release_all()
    assert kv.pool.num_used == 0 and kv.allocated_bytes() == 0
    assert sorted(kv.pool.free_blocks) == list(range(1, kv.pool.num_blocks + 1))
    assert not any(kv.pool.refcount)


def test_paged_refuses_a_double_free_and_an_exhausted_pool():
    pool = BlockPool(CFG, 2, 4, "cpu", torch.float32)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(KvlibError, match="double free"):
        pool.release(block)
    kv = PagedCache(CFG, 1, 16, "cpu", torch.float32, block_size=4, num_blocks=2)
    with pytest.raises(CacheOverflowError, match="all 2 blocks"):
        kv.update(0, *(torch.zeros(1, CFG.n_kv_head, 9, CFG.head_dim),) * 2, 0)


def test_paged_released_row_writes_go_to_scratch_and_leave_other_rows_intact():
    kv = PagedCache(CFG, 2, 8, "cpu", torch.float32, block_size=2)
    k = torch.randn(2, CFG.n_kv_head, 3, CFG.head_dim)
    kv.update(0, k, k, 0)
    kv.release(0)
    k2 = torch.randn(2, CFG.n_kv_head, 1, CFG.head_dim)
    keys, _ = kv.update(0, k2, k2, 3)
    assert torch.equal(keys[1], torch.cat([k, k2], dim=2)[1])
    assert kv.pool.num_used == 2  # row 1's 4 slots; row 0 got nothing new


# ---- prefix sharing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prefix_len,suffix_len,batch_size,block_size", [(20, 5, 3, 16), (16, 1, 2, 16), (7, 4, 4, 4)])
def test_shared_prefix_gives_the_full_prompts_tokens(model, seed, prefix_len, suffix_len, batch_size, block_size):
    prefix = synthetic_prompts(CFG.vocab_size, 1, prefix_len, seed=seed)
    suffix = synthetic_prompts(CFG.vocab_size, batch_size, suffix_len, seed=seed + 10)
    full = torch.cat([prefix.expand(batch_size, -1), suffix], dim=1)
    naive = generate(model, full, 10, cache="none", keep_logits=True)
    shared = generate_with_shared_prefix(model, prefix, suffix, 10, block_size=block_size, keep_logits=True)
    assert torch.equal(shared.tokens, naive.tokens)
    torch.testing.assert_close(shared.step_logits, naive.step_logits, atol=1e-4, rtol=0)
    kv = shared.cache
    prefix_blocks = prefix_len // block_size  # full blocks stay shared; a partly filled one is copied on write
    private = math.ceil((prefix_len + suffix_len + 10 - 1) / block_size) - prefix_blocks
    assert kv.pool.num_used == prefix_blocks + batch_size * private
    kv.release_all()
    assert kv.pool.num_used == 0 and not any(kv.pool.refcount)


def test_regression_fork_with_one_sequence_keeps_the_partly_filled_prefix_block(model):
    """A fork used to copy the prefix cache's slot map, which ends at the prefix length: with one sequence (no
    copy-on-write), its writes into the rest of the prefix's last block went to the scratch block."""
    prefix = synthetic_prompts(CFG.vocab_size, 1, 20, seed=3)
    suffix = synthetic_prompts(CFG.vocab_size, 1, 3, seed=4)
    static = generate(model, torch.cat([prefix, suffix], dim=1), 12, cache="static", keep_logits=True)
    shared = generate_with_shared_prefix(model, prefix, suffix, 12, block_size=16, keep_logits=True)
    assert torch.equal(shared.tokens, static.tokens)
    # Tokens alone are a weak check on a small random model (they survived the bug); logits and keys are not.
    torch.testing.assert_close(shared.step_logits, static.step_logits, atol=1e-4, rtol=0)
    for layer in range(CFG.n_layer):
        torch.testing.assert_close(shared.cache.layer_kv(layer), static.cache.layer_kv(layer), atol=1e-5, rtol=0)


def test_shared_prefix_rejects_bad_shapes(model):
    with pytest.raises(KvlibError, match="suffix_ids"):
        generate_with_shared_prefix(model, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(KvlibError, match=">= 1 token"):
        generate_with_shared_prefix(model, torch.zeros(4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), 2)


# ---- quantized ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_is_within_half_a_step(bits):
    x = torch.randn(3, 4, 5, 16) * 3
    codes, scale, zero = quantize(x, bits, dim=-1, dtype=torch.float32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    err = (dequantize(codes, scale, zero, torch.float32) - x).abs()
    assert bool((err <= scale / 2 + 1e-5).all())
    assert torch.equal(unpack_int4(pack_int4(codes % 16)), codes % 16)


def test_quantize_constant_slice_is_exact():
    x = torch.full((2, 8), 1.5)
    codes, scale, zero = quantize(x, 8, dim=-1, dtype=torch.float32)
    assert torch.equal(dequantize(codes, scale, zero, torch.float32), x)


@pytest.mark.parametrize(
    "options,rel_tol",
    [({"bits": 8}, 2e-3), ({"bits": 4}, 5e-2), ({"bits": 4, "key_axis": "channel", "residual_len": 8}, 5e-2)],
)
def test_quantized_logits_stay_close_to_full_precision(model, options, rel_tol):
    """Lossy: logits within a stated tolerance of the exact path (teacher forced); tokens mostly agree."""
    ids = synthetic_prompts(CFG.vocab_size, 2, 24, seed=7)
    exact = generate(model, ids, 16, cache="static", keep_logits=True)
    forced = teacher_forced_logits(model, ids, exact.tokens, "quantized", options)
    rel = (forced - exact.step_logits).abs().max() / exact.step_logits.abs().max()
    assert 0 < rel < rel_tol  # never identical (it is lossy), always close
    agreement = (exact.tokens == forced.argmax(-1).T).float().mean()
    assert agreement >= 0.9, f"teacher-forced token agreement {agreement:.2%}"


def test_quantized_with_everything_in_the_full_precision_tail_is_exact(model):
    ids = synthetic_prompts(CFG.vocab_size, 2, 10, seed=1)
    exact = generate(model, ids, 8, cache="static", keep_logits=True)
    out = generate(model, ids, 8, cache="quantized", cache_options={"residual_len": 100}, keep_logits=True)
    assert torch.equal(out.tokens, exact.tokens)
    torch.testing.assert_close(out.step_logits, exact.step_logits, atol=1e-5, rtol=0)
    assert out.cache.n_quant == [0] * CFG.n_layer


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bytes_count_codes_and_scales(bits):
    B, S, L, nkv, hd = 2, 10, CFG.n_layer, CFG.n_kv_head, CFG.head_dim
    kv = make_cache("quantized", CFG, B, S, "cpu", torch.float32, bits=bits)
    codes = 2 * L * B * nkv * S * hd * bits // 8
    scales = 4 * L * B * nkv * S * 4  # K and V, scale and zero, fp32, per token and head
    assert kv.nbytes() == codes + scales
    k = torch.randn(B, nkv, 6, hd)
    for layer in range(L):
        kv.update(layer, k, k, 0)
    assert kv.used_bytes() == (codes + scales) * 6 // S


def test_quantized_tail_is_never_reserved_twice():
    """Per-token mode keeps the last residual_len tokens at full precision, so it needs codes for only
    max_len - residual_len slots; at the end, the tail's bytes are those of residual_len fp32 tokens."""
    B, S, R = 1, 12, 4
    kv = make_cache("quantized", CFG, B, S, "cpu", torch.float32, bits=8, residual_len=R)
    per_token_codes = 2 * CFG.n_layer * CFG.n_kv_head * (CFG.head_dim + 2 * 4)  # K and V: codes, scale, zero
    assert kv.nbytes() == (S - R) * per_token_codes
    k = torch.randn(B, CFG.n_kv_head, S, CFG.head_dim)
    for layer in range(CFG.n_layer):
        kv.update(layer, k, k, 0)
    assert kv.n_quant == [S - R] * CFG.n_layer
    assert kv.nbytes() == kv.used_bytes() == (S - R) * per_token_codes + R * BPT


def test_kivi_keys_are_quantized_in_whole_groups_and_the_rest_stays_full_precision():
    kv = make_cache("quantized", CFG, 1, 32, "cpu", torch.float32, bits=4, key_axis="channel", residual_len=8)
    k = torch.randn(1, CFG.n_kv_head, 20, CFG.head_dim)
    keys, _ = kv.update(0, k, k, 0)
    assert torch.equal(keys, k)  # the prompt attends to itself at full precision
    assert kv.n_quant[0] == 16 and kv.res_k[0].shape[2] == 4
    stored, _ = kv.layer_kv(0)
    assert torch.equal(stored[:, :, 16:], k[:, :, 16:])
    assert not torch.equal(stored[:, :, :16], k[:, :, :16])
    torch.testing.assert_close(stored, k, atol=0.5, rtol=0)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"bits": 3}, "bits must be 8, 4 or 2"),
        ({"key_axis": "head"}, "key_axis"),
        ({"key_axis": "channel"}, "residual_len must be >= 2"),
        ({"residual_len": -1}, "residual_len"),
    ],
)
def test_quantized_bad_options_are_clear_errors(options, match):
    with pytest.raises(KvlibError, match=match):
        make_cache("quantized", CFG, 1, 8, "cpu", torch.float32, **options)


# ---- window with sinks -------------------------------------------------------------------------------------------


def test_window_is_exact_while_the_sequence_fits(model):
    ids = synthetic_prompts(CFG.vocab_size, 2, 10, seed=2)
    exact = generate(model, ids, 11, cache="static", keep_logits=True)
    out = generate(model, ids, 11, cache="window", cache_options={"sink": 4, "window": 16}, keep_logits=True)
    assert torch.equal(out.tokens, exact.tokens)
    torch.testing.assert_close(out.step_logits, exact.step_logits, atol=1e-6, rtol=0)


def test_window_memory_is_flat_once_full_and_lossy_after(model):
    ids = synthetic_prompts(CFG.vocab_size, 1, 8, seed=2)
    sizes = []
    for n in (20, 40, 80):
        kv = generate(model, ids, n, cache="window", cache_options={"sink": 2, "window": 12}).cache
        sizes.append(kv.nbytes())
    assert sizes == [14 * BPT] * 3
    exact = generate(model, ids, 40, cache="static", keep_logits=True)
    forced = teacher_forced_logits(model, ids, exact.tokens, "window", {"sink": 2, "window": 12})
    assert (forced - exact.step_logits).abs().max() > 0  # the window slid: not exact, and not claimed to be


def test_window_keeps_the_sinks_and_the_last_window_positions():
    kv = make_cache("window", CFG, 1, 40, "cpu", torch.float32, sink=3, window=5)

    def tagged(start, t):  # every entry carries its absolute position
        pos = torch.arange(start, start + t, dtype=torch.float32)
        return pos.view(1, 1, t, 1).expand(1, CFG.n_kv_head, t, CFG.head_dim)

    kv.update(0, tagged(0, 12), tagged(0, 12), 0)
    assert sorted(kv.layer_kv(0)[0][0, 0, :, 0].tolist()) == [0, 1, 2, 7, 8, 9, 10, 11]
    for pos in range(12, 19):
        keys, _ = kv.update(0, tagged(pos, 1), tagged(pos, 1), pos)
    assert sorted(keys[0, 0, :, 0].tolist()) == [0, 1, 2, 14, 15, 16, 17, 18]


def test_regression_window_prompt_shorter_than_the_sinks(model):
    """A prompt of fewer tokens than `sink` made the prefill build an empty range the wrong way round."""
    ids = synthetic_prompts(CFG.vocab_size, 2, 3, seed=5)
    exact = generate(model, ids, 6, cache="static")
    assert torch.equal(
        generate(model, ids, 6, cache="window", cache_options={"sink": 4, "window": 8}).tokens, exact.tokens
    )


def test_window_refuses_padding_once_it_slides_and_chunked_writes(model):
    ids, mask = left_padded_prompts(CFG.vocab_size, [4, 9], seed=0)
    with pytest.raises(KvlibError, match="left padding"):
        generate(model, ids, 12, cache="window", attention_mask=mask, cache_options={"sink": 2, "window": 6})
    kv = make_cache("window", CFG, 1, 20, "cpu", torch.float32)
    kv.update(0, *(torch.zeros(1, CFG.n_kv_head, 3, CFG.head_dim),) * 2, 0)
    with pytest.raises(KvlibError, match="chunked prefill"):
        kv.update(0, *(torch.zeros(1, CFG.n_kv_head, 2, CFG.head_dim),) * 2, 3)


# ---- grouped-query attention -------------------------------------------------------------------------------------


def test_gqa_cache_bytes_shrink_by_exactly_n_head_over_n_kv_head():
    held = {}
    for n_kv in (4, 2, 1):
        m = load("tiny", weights="random", n_kv_head=n_kv, with_hf=False)
        ids = synthetic_prompts(CFG.vocab_size, 2, 9, seed=0)
        kv = generate(m.model, ids, 5, cache="static").cache
        held[n_kv] = kv.nbytes()
        assert held[n_kv] == m.cfg.kv_bytes_per_token(4) * 2 * (9 + 5)
    assert held[4] == 2 * held[2] == 4 * held[1]
