"""The fast decode path (kvlib.models.fastpath, the static cache, greedy) computes what the naive path computes."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

import kvlib.models.attention as kvattention
import kvlib.models.fastpath as fastpath
from kvlib.caches.base import make_cache
from kvlib.core.config import get_preset
from kvlib.measure.bench import agreement
from kvlib.models.decode import generate, greedy
from kvlib.models.fastpath import Linear, one_query_attention, prepare_for_inference
from kvlib.models.gpt2 import GPT
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts

LOGIT_ATOL = 1e-4  # fp32 kernels differ only in the order of their sums


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
@pytest.mark.parametrize(
    ("seed", "batch_size", "prompt_len", "new_tokens"), [(0, 1, 9, 12), (1, 2, 30, 10), (2, 5, 4, 16)]
)
def test_fast_path_tokens_equal_naive_tokens_fp32(model, seed, batch_size, prompt_len, new_tokens):
    lm = load(model, weights="random", seed=seed, with_hf=False)
    ids = synthetic_prompts(lm.cfg.vocab_size, batch_size, prompt_len, seed)
    fast = generate(lm.model, ids, new_tokens, cache="static", keep_logits=True)
    naive = generate(lm.model, ids, new_tokens, cache="none", keep_logits=True)
    assert torch.equal(fast.tokens, naive.tokens)
    assert (fast.step_logits - naive.step_logits).abs().max().item() <= LOGIT_ATOL


def test_fast_path_tokens_equal_naive_tokens_with_left_padding(tiny):
    ids, mask = left_padded_prompts(tiny.cfg.vocab_size, [14, 3, 9, 1], seed=5)
    fast = generate(tiny.model, ids, 12, cache="static", attention_mask=mask)
    naive = generate(tiny.model, ids, 12, cache="none", attention_mask=mask)
    assert torch.equal(fast.tokens, naive.tokens)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_linears_match_plain_f_linear(tiny, monkeypatch, batch_size):
    """The packed path measured fastest for these rows (oneDNN or MKL) against plain F.linear on the same weights:
    same tokens, logits within fp32 noise."""
    ids = synthetic_prompts(tiny.cfg.vocab_size, batch_size, 20, seed=11)
    packed = generate(tiny.model, ids, 10, cache="static", keep_logits=True)
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    plain = generate(tiny.model, ids, 10, cache="static", keep_logits=True)
    assert torch.equal(packed.tokens, plain.tokens)
    assert (packed.step_logits - plain.step_logits).abs().max().item() <= LOGIT_ATOL


def test_linear_keeps_nn_linear_parameters_and_the_tie():
    layer = Linear(6, 10)
    assert layer.weight.shape == (10, 6) and layer.weight.is_contiguous()  # exactly nn.Linear's parameters
    assert list(layer.state_dict()) == ["weight", "bias"]  # the packed copy is not state
    model = GPT(load("tiny", weights="random", with_hf=False).cfg)
    assert model.wte.weight is model.lm_head.weight  # still tied


@torch.no_grad()
def test_linear_packed_path_matches_f_linear_and_steps_aside_for_autograd():
    torch.manual_seed(0)
    layer = Linear(32, 48)
    rows = torch.randn(5, 32)
    ref = torch.nn.functional.linear(rows, layer.weight, layer.bias)
    assert layer.packed_weight() is not None
    assert torch.allclose(layer(rows), ref, atol=1e-5)
    assert torch.allclose(layer(rows[:1]), ref[:1], atol=1e-5)
    with torch.enable_grad():
        assert layer(rows).requires_grad  # autograd: plain F.linear (the packed kernel has no backward)


def test_linear_trains_through_autograd():
    layer = Linear(4, 3)
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (3, 4)


@pytest.mark.parametrize("kernel", ["packed", "mkl"])
def test_regression_packed_weight_follows_in_place_change(tiny, monkeypatch, kernel):
    """A packed copy made before the weights change must not survive the change (a stale copy would silently
    decode with the old weights): init_random writes in place, so its result must equal a freshly built model.
    For both packings of several rows (oneDNN's, MKL's)."""
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", kernel)
    model = copy.deepcopy(tiny.model)
    ids = synthetic_prompts(tiny.cfg.vocab_size, 3, 12, seed=2)
    before = generate(model, ids, 6, cache="static", keep_logits=True)  # packs every Linear
    model.init_random(seed=99)  # in place
    fresh = GPT(tiny.cfg).init_random(seed=99).eval()
    after = generate(model, ids, 6, cache="static", keep_logits=True)
    expected = generate(fresh, ids, 6, cache="static", keep_logits=True)
    assert torch.equal(after.tokens, expected.tokens)
    assert (after.step_logits - expected.step_logits).abs().max().item() <= LOGIT_ATOL
    assert (after.step_logits - before.step_logits).abs().max().item() > LOGIT_ATOL


@pytest.mark.parametrize("kernel", ["packed", "mkl"])
def test_regression_packed_weight_follows_dtype_round_trip(tiny, monkeypatch, kernel):
    """float32 -> bfloat16 -> float32 gives new tensors (possibly at the old addresses) with rounded values."""
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", kernel)
    model = copy.deepcopy(tiny.model)
    ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 10, seed=4)
    generate(model, ids, 4, cache="static")  # packs the float32 weights
    model = model.to(torch.bfloat16).to(torch.float32)
    rounded = copy.deepcopy(model)
    got = generate(model, ids, 6, cache="static", keep_logits=True)
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    want = generate(rounded, ids, 6, cache="static", keep_logits=True)
    assert torch.equal(got.tokens, want.tokens)
    assert (got.step_logits - want.step_logits).abs().max().item() <= LOGIT_ATOL


def test_regression_packed_model_can_be_copied_and_saved(tiny):
    """oneDNN's packed tensors can be neither deep-copied nor pickled: the cache of them must not travel."""
    ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 8, seed=1)
    generate(tiny.model, ids, 3, cache="static")  # make sure packed copies exist
    clone = copy.deepcopy(tiny.model)
    torch.save(tiny.model.state_dict(), io.BytesIO())
    torch.save(tiny.model, io.BytesIO())
    assert torch.equal(generate(clone, ids, 5).tokens, generate(tiny.model, ids, 5).tokens)


def test_model_built_under_inference_mode_falls_back_to_plain_linear(tiny):
    with torch.inference_mode():
        model = GPT(tiny.cfg)
        model.load_state_dict(tiny.model.state_dict())
        ids = synthetic_prompts(tiny.cfg.vocab_size, 2, 8, seed=3)
        assert model.h[0].attn.c_attn.packed_weight() is None  # no version counter: changes would go unseen
    assert torch.equal(generate(model.eval(), ids, 5).tokens, generate(tiny.model, ids, 5).tokens)


def test_static_cache_writes_in_place_and_returns_views():
    cfg = load("tiny", weights="random", with_hf=False).cfg
    cache = make_cache("static", cfg, 2, 10, "cpu", torch.float32)
    k = torch.randn(2, cfg.n_kv_head, 3, cfg.head_dim)
    v = torch.randn_like(k)
    k_all, _ = cache.update(1, k, v, 0)
    assert k_all.data_ptr() == cache.k[1].data_ptr() and k_all.shape[2] == 3  # a view, not a copy
    k1 = torch.randn(2, cfg.n_kv_head, 1, cfg.head_dim)
    k_all, _ = cache.update(1, k1, k1, 3)
    assert torch.equal(cache.k[1, :, :, :3], k) and torch.equal(cache.v[1, :, :, :3], v)
    assert torch.equal(k_all[:, :, 3:], k1) and k_all.shape[2] == 4
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_greedy_in_float32_is_argmax_for_half_precision():
    logits = torch.randn(4, 1000).to(torch.bfloat16)
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie: the lowest id wins either way
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(logits)[1] == 10


def test_bf16_agreement_with_fp32_is_reported():
    """bfloat16 is not expected to match float32 token for token: the agreement is measured, and is 1.0 only
    when it should be (a model against itself)."""
    fp32 = load("tiny", weights="random", seed=0, with_hf=False)
    bf16 = load("tiny", weights="random", seed=0, dtype="bfloat16", with_hf=False)
    ids = synthetic_prompts(fp32.cfg.vocab_size, 3, 16, seed=0)
    assert agreement(fp32.model, fp32.model, ids, 8) == (1.0, None)
    share, first = agreement(bf16.model, fp32.model, ids, 8)
    print(f"tiny bf16 vs fp32: teacher-forced agreement {share:.0%}, first free-running divergence at step {first}")
    assert 0.0 <= share <= 1.0
    assert first is None or 0 <= first < 8


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_equals_sdpa(n_kv_head, masked):
    """The written-out attention used for one query in half precision on CPU, checked in float32 against SDPA,
    with grouped-query heads and a padding mask."""
    gen = torch.Generator().manual_seed(n_kv_head)
    q = torch.randn(3, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 3, n_kv_head, 9, 16, generator=gen)
    mask = None
    if masked:
        mask = torch.rand(3, 1, 1, 9, generator=gen) > 0.4
        mask[..., -1] = True  # a token always sees itself
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv_head != 4)
    assert (one_query_attention(q, k, v, mask) - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_half_precision_decode_uses_one_query_attention_with_padding(monkeypatch, n_kv_head):
    """bfloat16 decode steps go through one_query_attention (checked against SDPA above), masks and groups
    included; their tokens are compared with the naive path and the agreement printed, not asserted."""
    calls = []

    def counted(q, k, v, mask=None):
        calls.append((tuple(q.shape), None if mask is None else tuple(mask.shape)))
        return one_query_attention(q, k, v, mask)

    monkeypatch.setattr(kvattention, "one_query_attention", counted)
    lm = load("tiny", weights="random", dtype="bfloat16", n_kv_head=n_kv_head, with_hf=False)
    ids, mask = left_padded_prompts(lm.cfg.vocab_size, [10, 4, 7], seed=3)
    fast = generate(lm.model, ids, 8, cache="static", attention_mask=mask)
    assert len(calls) == lm.cfg.n_layer * 7  # every layer of every decode step (the prefill uses SDPA)
    assert calls[-1] == ((3, lm.cfg.n_head, 1, lm.cfg.head_dim), (3, 1, 1, 10 + 7))
    naive = generate(lm.model, ids, 8, cache="none", attention_mask=mask)
    agree = (fast.tokens == naive.tokens).float().mean().item()
    print(f"tiny bf16 (n_kv_head={n_kv_head}) fast vs naive, padded: {agree:.0%} of tokens equal")


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_compiled_one_row_kernel_tokens_equal_naive_fp32(monkeypatch, model):
    """Batch-1 decoding with the torch.compile'd matrix-vector kernel (optional, KVLIB_COMPILE=1), forced here
    (by default it is used only where it measured fastest: test_compiled_kernel_is_used_only_where_it_wins)."""
    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "compiled")
    lm = load(model, weights="random", seed=3, with_hf=False)
    ids = synthetic_prompts(lm.cfg.vocab_size, 1, 12, seed=3)
    # compiles (once per process) outside any timing; the model keeps the choice (generate's own preparation too)
    setup_s = prepare_for_inference(lm.model, batch_size=1, compile_one_row=True)
    assert prepare_for_inference(lm.model, batch_size=1) < min(0.5, setup_s + 0.5)  # then there is nothing to do
    calls = []
    real = fastpath.one_row_matvec
    monkeypatch.setattr(fastpath, "one_row_matvec", lambda *a: calls.append(1) or real(*a))
    fast = generate(lm.model, ids, 10, cache="static", keep_logits=True)
    # every matrix of every decode step (GPT-2: c_attn, c_proj, c_fc, mlp c_proj; Llama: qkv, o, gate_up, down),
    # and the prefill's LM head
    assert len(calls) == 9 * (4 * lm.cfg.n_layer + 1) + 1
    prepare_for_inference(lm.model, batch_size=1, compile_one_row=False)
    naive = generate(lm.model, ids, 10, cache="none", keep_logits=True)
    assert torch.equal(fast.tokens, naive.tokens)
    assert (fast.step_logits - naive.step_logits).abs().max().item() <= LOGIT_ATOL


def test_compiled_kernel_is_used_only_where_it_wins(monkeypatch):
    """Regression (the bench's batch-1 speed targets): with --compile (the bench's default) every batch-1 matrix
    went through the compiled kernel, which on a 2-core Intel Xeon with AVX-512 made SmolLM2's step 64 ms against
    42 ms with F.linear.
    The compiled kernel is now one measured candidate: it serves one row only when it was the fastest."""
    monkeypatch.setattr(fastpath, "_COMPILED_CHOICE", {})
    lm = load("tiny", weights="random", seed=3, with_hf=False)
    calls = []
    real = fastpath.one_row_matvec
    monkeypatch.setattr(fastpath, "one_row_matvec", lambda *a: calls.append(1) or real(*a))
    prepare_for_inference(lm.model, batch_size=1, compile_one_row=True)
    winner = fastpath._COMPILED_CHOICE[torch.float32]
    assert winner in ("packed", "plain", "compiled")
    calls.clear()
    ids = synthetic_prompts(lm.cfg.vocab_size, 1, 6, seed=3)
    fast = generate(lm.model, ids, 4, cache="static")
    assert (len(calls) > 0) == (winner == "compiled")
    for forced in ("plain", "packed"):  # a losing compiled kernel is not used
        monkeypatch.setattr(fastpath, "_COMPILED_CHOICE", {torch.float32: forced})
        calls.clear()
        assert torch.equal(generate(lm.model, ids, 4, cache="static").tokens, fast.tokens) and not calls


def test_one_row_matvec_matches_f_linear():
    gen = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(37, 19, generator=gen), torch.randn(19, generator=gen), torch.randn(37, generator=gen)
    with torch.inference_mode():
        got = fastpath.one_row_matvec(x, w, b)
        assert got is not None and torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5)
        assert torch.allclose(fastpath.one_row_matvec(x, w, None), x @ w.T, atol=1e-5)  # the LM head has no bias


def test_regression_compile_failure_falls_back_to_packed_kernel(monkeypatch):
    """Where torch.compile cannot work (no C++ compiler, ...), batch-1 decoding must still run, on oneDNN,
    after one warning, instead of failing."""

    def broken(*args):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "compiled")  # whatever an earlier test measured fastest
    monkeypatch.setattr(fastpath, "_compiled_matvec", broken)
    monkeypatch.setattr(fastpath, "_compile_failed", False)
    lm = load("tiny", weights="random", seed=1, with_hf=False)
    ids = synthetic_prompts(lm.cfg.vocab_size, 1, 6, seed=1)
    with pytest.warns(UserWarning, match="no working C\\+\\+ compiler"):
        prepare_for_inference(lm.model, batch_size=1, compile_one_row=True)  # compiling is tried here
        got = generate(lm.model, ids, 5)
    assert fastpath._compile_failed
    prepare_for_inference(lm.model, batch_size=1, compile_one_row=False)
    assert torch.equal(got.tokens, generate(lm.model, ids, 5, cache="none").tokens)


def test_regression_compiled_kernel_is_not_recompiled_per_matrix_shape(monkeypatch):
    """Given nn.Parameters, torch.compile specialises on their shapes: one compilation per matrix shape, and past
    its limit of 8 (distilgpt2 in float32 and bfloat16 has 10) a silent fall-back to eager, 10x slower. The
    kernel gets detached weights, so a model with new shapes must not compile anything new."""
    from torch._dynamo.utils import counters

    from kvlib.core.config import GPTConfig

    monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "compiled")  # compile whatever was measured fastest before
    prepare_for_inference(load("tiny", weights="random", with_hf=False).model, batch_size=1, compile_one_row=True)
    graphs = counters["stats"]["unique_graphs"]
    other = GPT(GPTConfig(name="other", vocab_size=300, n_positions=64, n_embd=48, n_layer=1, n_head=3)).eval()
    prepare_for_inference(other, batch_size=1, compile_one_row=True)
    assert counters["stats"]["unique_graphs"] == graphs


def test_packed_bytes_counts_the_memory_the_fast_path_adds(monkeypatch):
    assert fastpath.packed_bytes(GPT(get_preset("tiny")).eval()) == 0  # nothing packed before inference
    lm = load("tiny", weights="random", with_hf=False)  # load prepares for batch 1: memory steady before measuring
    linears = [m for m in lm.model.modules() if isinstance(m, Linear)]
    full = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    # batch-1 decoding packs only where the packed kernel is the faster one for one row on this CPU
    assert fastpath.packed_bytes(lm.model) == (
        full if fastpath.one_row_kernel(lm.model, torch.float32) == "packed" else 0
    )
    prepare_for_inference(lm.model, batch_size=4)
    # several rows: the copy of the kernel measured fastest for 4 rows is held (README "Speed"), one per weight
    assert fastpath.packed_bytes(lm.model) == (
        0 if fastpath.batch_kernel(lm.model, torch.float32, 4) == "plain" else full
    )
    with torch.inference_mode():  # and released again for batch 1 when it is not used there
        monkeypatch.setattr(fastpath, "ONE_ROW_KERNEL", "plain")
        prepare_for_inference(lm.model, batch_size=1)
    assert fastpath.packed_bytes(lm.model) == 0
    fresh = GPT(lm.cfg).eval()
    monkeypatch.setattr(fastpath, "PACK_CPU_WEIGHTS", False)
    generate(fresh, synthetic_prompts(lm.cfg.vocab_size, 2, 5), 3)
    assert fastpath.packed_bytes(fresh) == 0  # switched off: no copies


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("kernel", ["packed", "mkl", "plain"])
def test_every_batch_kernel_tokens_equal_naive_tokens_fp32(monkeypatch, model, kernel):
    """Whichever kernel serves several rows (oneDNN packed, MKL packed for exactly B rows, F.linear), cached
    decoding gives the naive path's tokens; the prompt's rows (B x P, not B) take F.linear under MKL's packing."""
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", kernel)
    lm = load(model, weights="random", seed=7, with_hf=False)
    ids, mask = left_padded_prompts(lm.cfg.vocab_size, [11, 4, 9], seed=7)
    fast = generate(lm.model, ids, 10, cache="static", attention_mask=mask, keep_logits=True)
    held = {m._packed.packed_as for m in lm.model.modules() if isinstance(m, Linear)}
    if fastpath._mkl_packable(torch.float32) or kernel != "mkl":
        assert held == {{"packed": ("onednn", 0), "mkl": ("mkl", 3), "plain": None}[kernel]}
    naive = generate(lm.model, ids, 10, cache="none", attention_mask=mask, keep_logits=True)
    assert torch.equal(fast.tokens, naive.tokens)
    assert (fast.step_logits - naive.step_logits).abs().max().item() <= LOGIT_ATOL


def test_mkl_packing_follows_the_batch_size(monkeypatch):
    """MKL's packing is made for one row count: preparing for another batch re-packs (never two copies), and a
    row count it was not packed for gets F.linear's result."""
    if not fastpath._mkl_packable(torch.float32):
        pytest.skip("this PyTorch build has no MKL")
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "mkl")
    layer = Linear(24, 40).eval()
    x = torch.randn(8, 24)
    with torch.inference_mode():
        for rows in (4, 8, 2):
            prepare_for_inference(layer, batch_size=rows)
            assert layer._packed.packed_as == ("mkl", rows) and fastpath.packed_bytes(layer) == 40 * 24 * 4
            for n in (rows, 3):  # the packed row count, and another one
                torch.testing.assert_close(layer(x[:n]), torch.nn.functional.linear(x[:n], layer.weight, layer.bias))


def test_mkl_kernel_serves_the_decode_steps_and_f_linear_the_prompt(monkeypatch):
    """The kernel really called, from the profiler: MKL's packed product for each decode step's B rows, F.linear
    (aten::linear) for the prompt's B x P rows; none of oneDNN's."""
    if not fastpath._mkl_packable(torch.float32):
        pytest.skip("this PyTorch build has no MKL")
    from torch.profiler import profile

    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "mkl")
    lm = load("tiny-llama", weights="random", with_hf=False)
    ids = synthetic_prompts(lm.cfg.vocab_size, 3, 7)
    prepare_for_inference(lm.model, batch_size=3)
    n_linear = sum(isinstance(m, Linear) for m in lm.model.modules())
    with profile() as prof:
        generate(lm.model, ids, 5)
    calls = {e.key: e.count for e in prof.key_averages()}
    # the 4 decode steps after the prefill, and the prompt's LM head, which runs on its last position: B rows
    assert calls.get("mkl::_mkl_linear", 0) == 4 * n_linear + 1
    assert calls.get("aten::linear", 0) >= n_linear - 1  # the rest of the prompt: B x P rows
    assert "mkldnn::_linear_pointwise" not in calls
    assert fastpath.model_kernel(lm.model, 3) == "MKL packed" and fastpath.model_kernel(lm.model, 21) == "F.linear"


def test_copies_keep_the_kernel_chosen_but_not_the_packed_tensor(monkeypatch):
    """A deep copy or an unpickled model must not pack a kind the original never held (it starts empty)."""
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "plain")
    model = load("tiny", weights="random", with_hf=False).model
    prepare_for_inference(model, batch_size=4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with torch.inference_mode():
            other(synthetic_prompts(model.cfg.vocab_size, 4, 1), torch.zeros(4, 1, dtype=torch.long))
        assert fastpath.packed_bytes(other) == 0 and fastpath.model_kernel(other, 4) == "F.linear"


def test_an_unknown_kernel_switch_is_refused(monkeypatch):
    model = load("tiny", weights="random", with_hf=False).model
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "onednn")
    with pytest.raises(ValueError, match="BATCH_KERNEL is 'onednn'; choose one of auto, plain, packed, mkl"):
        prepare_for_inference(model, batch_size=4)


def test_batch_kernel_is_measured_once_per_row_count_and_forced_ones_fall_back(monkeypatch):
    monkeypatch.setattr(fastpath, "_BATCH_CHOICE", {})
    model = load("tiny", weights="random", with_hf=False).model
    measured = []
    real = fastpath._fastest
    monkeypatch.setattr(fastpath, "_fastest", lambda *a: measured.append(a[2]) or real(*a))
    other = load("tiny-llama", weights="random", with_hf=False).model  # other matrix shapes: measured anew
    for m, rows in ((model, 4), (model, 4), (model, 8), (other, 4)):
        assert fastpath.batch_kernel(m, torch.float32, rows) in ("packed", "mkl", "plain")
    assert measured == [4, 8, 4]
    monkeypatch.setattr(fastpath, "_mkl_packable", lambda dtype: False)  # a build without MKL (ARM wheels)
    monkeypatch.setattr(fastpath, "BATCH_KERNEL", "mkl")
    assert fastpath.batch_kernel(model, torch.float32, 4) == "packed"
    monkeypatch.setattr(fastpath, "_onednn", lambda dtype: False)
    assert fastpath.batch_kernel(model, torch.float32, 4) == "plain"


MKL_RESIDENT_SCRIPT = """
import psutil, torch
import kvlib.models.fastpath as fastpath
fastpath.BATCH_KERNEL = "mkl"
model = torch.nn.Sequential(*(fastpath.Linear(1024, 2048, bias=False) for _ in range(16))).eval()  # 128 MiB
before = psutil.Process().memory_info().rss
fastpath.prepare_for_inference(model, batch_size=4)
print(psutil.Process().memory_info().rss - before, fastpath.packed_bytes(model))
"""


def test_mkl_packed_copy_holds_about_the_weights_bytes():
    """packed_bytes counts an MKL copy as its weight's bytes although MKL's pack buffer is allocated 2-9x as large
    (4x for this shape): what becomes resident when packing must be about the weights' size. In a fresh process:
    memory freed by earlier tests would be reused and hide the growth."""
    if not fastpath._mkl_packable(torch.float32):
        pytest.skip("this PyTorch build has no MKL")
    out = subprocess.run([sys.executable, "-c", MKL_RESIDENT_SCRIPT], capture_output=True, text=True, check=True)
    grown, counted = (int(v) for v in out.stdout.split())
    weights = 16 * 1024 * 2048 * 4
    assert counted == weights
    assert 0.8 * weights < grown < 1.5 * weights, f"resident growth {grown / 2**20:.0f} MiB for 128 MiB of weights"


def test_llama_rope_table_and_folded_rotation_are_bit_identical_to_the_textbook_rotation():
    """The decode path's RoPE (a precomputed table, rotate_half's sign folded into the sine, queries and keys
    rotated in one pass) against rope_cos_sin + rotate, HF's formulation: equal to the bit, in float32 and bf16."""
    from kvlib.core.rope import RopeTable, rope_cos_sin, rope_inv_freq, rotate, rotate_folded

    cfg = get_preset("tiny-llama")
    inv_freq = rope_inv_freq(cfg)
    table = RopeTable(inv_freq, 16)  # smaller than the positions asked for below: it grows
    positions = torch.tensor([[3, 4, 5], [0, 1, 40]])  # (B, T), one row past the table
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, cfg.n_head, cfg.head_dim).to(dtype)  # (B, T, h, hd)
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)  # (B, 1, T, hd)
        want = rotate(x.transpose(1, 2), cos, sin).transpose(1, 2)
        got = rotate_folded(x, *table(positions, dtype))
        assert torch.equal(got, want), dtype


def test_llama_rmsnorm_fused_op_equals_the_formula():
    from kvlib.models.llama import RMSNorm

    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(3, 5, 64) * 4
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), norm.weight * h)


def test_sdpa_hands_the_kernel_contiguous_queries_when_masked(monkeypatch):
    """kvlib.models.attention.sdpa: with a mask and several queries the CPU kernel gets contiguous queries (faster:
    measured on Gemma 3's windowed prefill), without changing the result; one query or no mask is passed as is."""
    import torch.nn.functional as F

    from kvlib.models import attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4, 8, generator=g).transpose(1, 2)  # (B, nh, T, hd), a transposed view as the decoders'
    k, v = (torch.randn(2, 6, 2, 8, generator=g).transpose(1, 2) for _ in range(2))
    i = torch.arange(6)
    mask = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - 3))[None, None]  # causal, window 3
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append(q.is_contiguous())
        return real(q, *a, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    assert torch.allclose(attention.sdpa(q, k, v, mask, False, None), want, atol=1e-6)
    attention.sdpa(q, k, v, None, True, None)
    attention.sdpa(q[:, :, :1], k, v, mask[..., :1, :], False, None)
    assert seen == [True, False, False]


@pytest.mark.parametrize("stream_bytes", [1, 200_000, 2**40])
def test_kernel_choice_streams_distinct_weights(monkeypatch, stream_bytes):
    """The kernel choice times each shape over `stream_copies` distinct weights filling STREAM_BYTES (only as many as
    the model has when the whole model fits in it), not one weight read again from the cache. Regression: with one
    weight per shape the kernels were timed from the CPU's cache, as no decode step reads them, and the choice
    flipped between processes."""
    seen: dict[tuple[int, int], set[int]] = {}
    real = torch.nn.functional.linear

    class Recording:
        @staticmethod
        def linear(x, w, b=None):
            seen.setdefault(tuple(w.shape), set()).add(w.data_ptr())
            return real(x, w, b)

    lm = load("tiny-llama", weights="random", with_hf=False)
    monkeypatch.setattr(fastpath, "STREAM_BYTES", stream_bytes)
    monkeypatch.setattr(fastpath, "F", Recording)
    fastpath._fastest(lm.model, torch.float32, 1, ["plain", "packed"])
    shapes = fastpath._shapes(lm.model, torch.float32)
    model_bytes = sum(o * i * c * 4 for (o, i), c in shapes.items())
    assert set(seen) == set(shapes)
    for (o, i), count in shapes.items():
        n = fastpath.stream_copies((o, i), count, 4, model_bytes)
        assert len(seen[(o, i)]) == n
        if stream_bytes == 1:
            assert n == 1
        elif model_bytes <= stream_bytes:  # the whole model fits: its own copies only
            assert n == count
        else:  # a model bigger than the budget: copies fill it, more than the model's own for a small shape
            assert n == max(1, -(-stream_bytes // (o * i * 4)))
