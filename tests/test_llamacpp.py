"""llama.cpp as a peer engine (kvlib.models.llamacpp), on a tiny GGUF this test writes itself with the gguf package:
tiny-llama's random weights as Hugging Face holds them, Q and K permuted as llama.cpp's converter does, float32,
and a byte-level SentencePiece vocabulary. llama.cpp's logits on that file must equal kvlib's on the same weights
(float32 cache, no flash attention); its cache types behave as documented; bad input is one line."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kvlib.core.errors import KvlibError
from kvlib.models import llamacpp
from kvlib.models.loading import load

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed (make setup)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    lm = load("tiny-llama", "random", seed=3, with_hf=True)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    llamacpp.export_gguf(lm.hf, path)
    return path, lm


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A tiny Llama with 64-value heads (what llama.cpp needs to quantize a flash-attention cache in blocks of 32,
    and to rotate it), random weights, as a float32 GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger keys than the default init, so that 4-bit codes visibly move the logits
        for layer in hf.model.layers:
            layer.self_attn.k_proj.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("gguf") / "wide-llama-f32.gguf"
    return llamacpp.export_gguf(hf, path)


IDS = [5, 300, 17, 42, 511, 260, 99, 7, 128, 400, 3, 64, 200, 301, 302, 12]


@needs_llamacpp
def test_llamacpp_logits_equal_kvlib_on_the_same_weights(tiny_gguf):
    """The engine path end to end: llama.cpp (float32 weights and cache, no flash attention) scores the same ids as
    kvlib's decoder within float32 rounding, so a cross-engine gap on real weights is the weights' precision and the
    cache types, not a mismatch of models."""
    path, lm = tiny_gguf
    eng = llamacpp.open_engine(path, 32, "f32", "f32", flash_attn=False, logits_all=True)
    got, _ = eng.logprobs(IDS)
    with torch.inference_mode():
        ids = torch.tensor([IDS])
        want = torch.log_softmax(lm.model(ids, torch.arange(len(IDS))[None], last_only=False)[0, :-1].float(), -1)
    assert got.shape == want.shape == (len(IDS) - 1, 512)
    assert (got - want).abs().max() < 2e-4
    assert eng.shape.n_layer == 2 and eng.shape.n_kv_head == 2 and eng.shape.sliding_window is None
    eng.close()


@needs_llamacpp
def test_llamacpp_cache_types_cost_in_order(wide_gguf):
    """f16 with flash attention is within rounding of f32; q8_0 and q4_0 move the log probabilities more, q4_0 most;
    llama.cpp's rotation changes a quantized cache's logits and leaves f16's alone; the greedy path returns exactly
    the tokens asked for with one timing per decode step."""
    path = wide_gguf
    ref = llamacpp.open_engine(path, 32, "f32", "f32", flash_attn=False, logits_all=True).logprobs(IDS)[0]
    gap = {}
    for t in ("f16", "q8_0", "q4_0"):
        lp = llamacpp.open_engine(path, 32, t, t, logits_all=True).logprobs(IDS)[0]
        gap[t] = float((lp - ref).abs().max())
    assert gap["f16"] < 5e-3 and gap["f16"] < gap["q4_0"] and gap["q8_0"] < gap["q4_0"]

    def logprobs(t, rotate):
        return llamacpp.open_engine(path, 32, t, t, rotate=rotate, logits_all=True).logprobs(IDS)[0]

    assert torch.equal(logprobs("f16", True), logprobs("f16", False))  # nothing to rotate in an f16 cache
    assert not torch.equal(logprobs("q4_0", True), logprobs("q4_0", False))
    eng = llamacpp.open_engine(path, 32)
    tokens, prefill, steps = eng.greedy(IDS[:8], 5)
    assert len(tokens) == 5 and len(steps) == 4 and prefill > 0 and all(s > 0 for s in steps)
    assert all(0 <= t < 512 for t in tokens)


def test_cache_bytes_follow_the_type():
    """q8_0 holds 34 bytes per 32 values, q4_0 18, f16 64; a sliding layer reads at most its window."""
    shape = llamacpp.GGUFShape("llama", 30, 3, 64, 64, None, 0, 8192, 0, 0, "Q4_1")
    assert llamacpp.kv_cache_bytes(shape, 1, "f16", "f16") == 30 * 3 * 64 * 2 * 2
    assert llamacpp.kv_cache_bytes(shape, 32, "q8_0", "q8_0") == 30 * 3 * 2 * 32 * 2 * 34
    assert llamacpp.kv_cache_bytes(shape, 32, "q4_0", "f16") == 30 * 3 * (2 * 18 + 128) * 32
    gemma = llamacpp.GGUFShape("gemma3", 18, 1, 256, 256, 512, 15, 32768, 0, 0, "Q4_K_M")
    assert llamacpp.kv_cache_bytes(gemma, 4096, "f16", "f16", read=True) == 1 * 512 * 2 * (3 * 4096 + 15 * 512)
    assert llamacpp.kv_cache_bytes(gemma, 4096, "f16", "f16") == 1 * 512 * 2 * 18 * 4096  # swa_full
    assert llamacpp.swa_cells(gemma) == 1024 and llamacpp.swa_cells(shape) is None  # window + 512, to 256
    held = llamacpp.kv_cache_bytes(gemma, 4096, "f16", "f16", sliding_cells=1024)
    assert held == 1 * 512 * 2 * (3 * 4096 + 15 * 1024)


@needs_llamacpp
def test_llamacpp_bad_input_is_one_line(tmp_path):
    """An unknown cache type, a quantized value cache without flash attention, a file that is not a GGUF, a model
    without GGUF weights: KvlibError with one line each (before llama.cpp is touched where it can be)."""
    with pytest.raises(KvlibError, match=r"unknown llama.cpp cache type 'q3_k'.*f16"):
        llamacpp.check_cache_type("q3_k")
    with pytest.raises(KvlibError, match="needs flash attention"):
        llamacpp.check_types("f16", "q8_0", flash_attn=False)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(KvlibError, match=r"cannot read .*bad.gguf as a GGUF") as e:
        llamacpp.read_shape(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(KvlibError, match="multiple of 32 values; m's have 16"):
        shape = llamacpp.GGUFShape("llama", 2, 2, 16, 16, None, 0, 256, 0, 0, "F32")
        llamacpp.check_head(shape, "q8_0", "f16", True, "m")
    with pytest.raises(KvlibError, match="gpt2 has no GGUF weights"):
        llamacpp.gguf_file("gpt2")
    with pytest.raises(KvlibError, match="neither a preset"):
        llamacpp.gguf_file(str(tmp_path / "missing.gguf"))


def test_llamacpp_missing_is_one_line(monkeypatch):
    """Without llama-cpp-python in the environment: one line that says how to get it."""
    import builtins

    real = builtins.__import__

    def no_llama(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(KvlibError, match=r"llama.cpp is not installed.*make setup"):
        llamacpp.binding()
    assert not llamacpp.available()


def test_llamacpp_runspec_refuses_what_it_cannot_run():
    """The harness's llamacpp engine: a cache type (not a kvlib layout), one sequence, a preset with a GGUF, its own
    weights; each refusal one line, before anything loads."""
    from kvlib.measure.harness import RunSpec

    cases = [
        (dict(cache="static"), "unknown cache 'static' for engine llamacpp"),
        (dict(batch_size=2), "one sequence"),
        (dict(model="gpt2"), "runs a GGUF; gpt2 has none"),
        (dict(weights="random"), "own weights"),
    ]
    for change, message in cases:
        spec = RunSpec(**{"engine": "llamacpp", "cache": "f16", "model": "smollm2-135m", "weights": "pretrained",
                          **change})  # fmt: skip
        with pytest.raises(KvlibError, match=message):
            spec.validate()


@needs_llamacpp
def test_run_engine_llamacpp_counts_the_gguf_and_its_cache_type(capsys):
    """`run --engine llamacpp`: one row a repeat, the GGUF's weight bytes and its cache type's bytes in the step's
    bytes (so MBU compares across engines), the weights' type as the dtype, exactly the tokens asked for."""
    from kvlib.cli import main
    from kvlib.measure.harness import RunSpec, measure

    m = measure(RunSpec("llamacpp", "q8_0", "smollm2-135m", "pretrained", 1, 16, 4), 1, 0, roofline=False)
    r = m.runs.iloc[0]
    per_token = 30 * 3 * 2 * 2 * 34  # layers x kv heads x (keys, values) x 2 blocks of 32 values x 34 bytes
    assert r["engine"] == "llamacpp" and r["dtype"] == "Q4_1" and r["tokens_generated"] == 4
    assert r["kv_cache_bytes"] == r["kv_cache_bytes_formula"] == 20 * per_token
    assert r["weights_bytes"] == llamacpp.read_shape(llamacpp.gguf_file("smollm2-135m")).weight_bytes
    assert r["decode_step_bytes"] == r["weights_bytes"] + 18 * per_token  # steps read 17, 18, 19 positions
    assert len(m.steps) == 3
    code = main(["run", "--engine", "llamacpp", "--model", "smollm2-135m", "--cache", "q4_0", "--prompt_len", "16",
                 "--max_new_tokens", "4", "--repeats", "1", "--warmup", "0", "--no-roofline"])  # fmt: skip
    assert code == 0 and "llamacpp cache=q4_0" in capsys.readouterr().out


@needs_llamacpp
def test_perplexity_engine_llamacpp_compares_with_its_f16_cache_and_floor(tmp_path, capsys):
    """`perplexity --engine llamacpp --baseline f16`: perplexity, then KL divergence against llama.cpp's f16 cache and
    the floor (f16 with flash attention off), one CSV row with the GGUF named; bad flags one line each, exit 2."""
    from kvlib.cli import main

    csv = tmp_path / "ppl.csv"
    args = ["perplexity", "--engine", "llamacpp", "--tokens", "64", "--cache-type-k", "q8_0", "--baseline", "f16"]
    assert main([*args, "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "cache q8_0:" in out and "against llama.cpp f16 (perplexity" in out and "floor: against" in out
    row = pd.read_csv(csv).iloc[0]
    assert row["cache"] == "llama.cpp q8_0" and row["dtype"] == "Q4_1" and row["kv_bytes_held"] == 64 * 12240
    for bad, message in (
        (["--engine", "llamacpp", "--bits", "4"], "--bits do not apply to --engine llamacpp"),
        (["--engine", "llamacpp", "--cache-type-k", "q3_k"], "unknown llama.cpp cache type"),
        (["--engine", "llamacpp", "--cache-type-v", "q8_0", "--flash-attn", "off"], "needs flash attention"),
        (["--engine", "llamacpp", "--baseline", "static"], "--baseline f16"),
        (["--cache-type-k", "q8_0"], "--cache-type-k applies to --engine llamacpp"),
    ):
        assert main(["perplexity", "--tokens", "64", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
