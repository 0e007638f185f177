"""Issue 14, kind 4: the two sides of a comparison are timed from the same point.

Time to first token starts *before* the cache is created, for every engine and path: Hugging Face's `generate`
creates its cache inside the timed call, so kvlib's decoding, its prefix sharing and the HF quantized-cache loop
must count their cache's creation too. Each test makes cache creation slow on purpose and checks that TTFT grows
by at least that much.
"""

from __future__ import annotations

import time

import pytest
import torch

import kvlib.decoding.prefix
import kvlib.models.decode
from kvlib.models.decode import generate
from kvlib.models.loading import load

SLOW_S = 0.2


@pytest.fixture(scope="module")
def lm():
    return load("tiny", "random", "cpu", "float32", 0, with_hf=True)


def _slow(fn):
    def wrapper(*args, **kwargs):
        time.sleep(SLOW_S)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("cache", ["dynamic", "static", "paged", "quantized", "window"])
def test_kvlib_ttft_counts_creating_its_cache(lm, monkeypatch, cache):
    monkeypatch.setattr(kvlib.models.decode, "make_cache", _slow(kvlib.models.decode.make_cache))
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 8))
    g = generate(lm.model, ids, 3, cache=cache)
    assert g.prefill_s >= SLOW_S


def test_prefix_sharing_ttft_counts_creating_its_block_pool(lm, monkeypatch):
    monkeypatch.setattr(kvlib.decoding.prefix, "BlockPool", _slow(kvlib.decoding.prefix.BlockPool))
    prefix = torch.randint(0, lm.cfg.vocab_size, (8,))
    suffix = torch.randint(0, lm.cfg.vocab_size, (2, 4))
    g = kvlib.decoding.prefix.generate_with_shared_prefix(lm.model, prefix, suffix, 3)
    assert g.prefill_s >= SLOW_S


def test_hf_ttft_counts_creating_its_static_cache(lm, monkeypatch):
    import transformers

    from kvlib.models.hf import hf_generate

    monkeypatch.setattr(transformers.StaticCache, "__init__", _slow(transformers.StaticCache.__init__))
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 8))
    g = hf_generate(lm.hf, ids, 3, cache="static")
    assert g.prefill_s >= SLOW_S


def test_hf_quantized_loop_ttft_counts_creating_its_cache(lm):
    from kvlib.models.hf_quantized import hf_greedy_loop

    def make():
        time.sleep(SLOW_S)
        return transformers_dynamic_cache(lm.hf)

    ids = torch.randint(0, lm.cfg.vocab_size, (1, 8))
    g = hf_greedy_loop(lm.hf, ids, 3, make)
    assert g.prefill_s >= SLOW_S


def transformers_dynamic_cache(hf_model):
    from transformers import DynamicCache

    return DynamicCache(config=hf_model.config)


def test_the_readme_states_where_ttft_starts():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text()  # moved from the README
    rows = readme[readme.index("**Rows: the output contract.**") :]
    assert "cache's creation" in rows or "creating the cache" in rows
