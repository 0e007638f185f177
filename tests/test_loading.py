"""Loading: pretrained through the real from_pretrained, random seeded, auto falling back loudly; bad input."""

from __future__ import annotations

import pytest
import torch

from kvlib.core.config import PRESETS, GPTConfig, get_preset
from kvlib.core.errors import KvlibError
from kvlib.models.decode import generate
from kvlib.models.loading import hub_reachable, load, resolve_device, resolve_dtype
from kvlib.models.prompts import synthetic_prompts


def test_pretrained_from_a_local_folder_uses_from_pretrained(tiny, tiny_saved):
    lm = load(str(tiny_saved), weights="pretrained")
    assert lm.weights == "pretrained" and lm.source == str(tiny_saved) and lm.warning is None
    assert lm.cfg.n_layer == tiny.cfg.n_layer and lm.cfg.vocab_size == tiny.cfg.vocab_size
    ids = synthetic_prompts(lm.cfg.vocab_size, 2, 12, seed=2)
    assert torch.equal(generate(lm.model, ids, 6).tokens, generate(tiny.model, ids, 6).tokens)


def test_auto_takes_local_pretrained_when_it_can(tiny_saved):
    assert load(str(tiny_saved), weights="auto").weights == "pretrained"


def test_auto_without_network_falls_back_to_random_loudly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        lm = load("tiny", weights="auto")
    assert lm.weights == "random" and "RANDOM WEIGHTS" in lm.warning


def test_pretrained_unavailable_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvlibError, match="pretrained weights for distilgpt2 unavailable") as e:
        load("distilgpt2", weights="pretrained")
    assert "\n" not in str(e.value)


def test_random_weights_are_seeded():
    a, b, c = (load("tiny", weights="random", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.model.wte.weight, b.model.wte.weight)
    assert not torch.equal(a.model.wte.weight, c.model.wte.weight)
    assert a.source == "random(seed=3)"


def test_regression_loading_does_not_disturb_the_global_rng():
    """Building the kvlib model drew from torch's global RNG, changing a caller's seeded prompts."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load("tiny", weights="random", seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_grouped_query_config_is_kvlib_only_and_shrinks_the_cache():
    lm = load("tiny", weights="random", n_kv_head=1)
    assert lm.hf is None and lm.cfg.n_kv_head == 1 and lm.cfg.is_gqa
    ids = synthetic_prompts(lm.cfg.vocab_size, 2, 6)
    g = generate(lm.model, ids, 3, cache="dynamic")
    full = get_preset("tiny")
    assert g.cache.nbytes() * full.n_head == full.kv_bytes_per_token(4) * 2 * 8


def test_bf16_model_runs():
    lm = load("tiny", weights="random", dtype="bf16")
    assert lm.model.wte.weight.dtype == torch.bfloat16 and lm.hf.dtype == torch.bfloat16
    assert generate(lm.model, synthetic_prompts(lm.cfg.vocab_size, 1, 4), 3).tokens.shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "gpt5"}, "unknown model preset 'gpt5'"),
        ({"weights": "maybe"}, "unknown weights 'maybe'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(KvlibError, match=message):
        load(**{"model": "tiny", "weights": "random", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent():
    with pytest.raises(KvlibError, match="no CUDA device"):
        resolve_device("cuda")


def test_auto_device_and_dtype_aliases():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("fp32", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_config_validation():
    with pytest.raises(KvlibError, match="not divisible by n_kv_head"):
        GPTConfig(name="x", n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(KvlibError, match="positive integer"):
        GPTConfig(name="x", n_layer=0)
    assert PRESETS["distilgpt2"].kv_bytes_per_token(2) == 2 * 6 * 12 * 64 * 2


def test_config_param_count_matches_hf(tiny):
    assert tiny.cfg.n_params() == sum(p.numel() for p in tiny.hf.parameters())
    assert tiny.cfg.n_params() == sum(p.numel() for p in tiny.model.parameters())
