"""The quantized layout's Hadamard rotation (`rotate`, as QuaRot and llama.cpp): orthonormal, exact when nothing is
lost to quantization, applied the same way by the cache and by the one-pass method, and what it is for: an outlier
channel's error spread over every channel."""

from __future__ import annotations

import pytest
import torch

import kvlib.caches.quantized as quantized
from kvlib.caches.base import make_cache
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.perplexity import perplexity
from kvlib.models.loading import load

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [1, 2, 16, 64, 256])
def test_hadamard_is_orthonormal(n):
    h = quantized.hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-6, rtol=0)
    assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5))


def test_other_sizes_and_values_are_refused_in_one_line():
    with pytest.raises(KvlibError, match="power-of-two size; head_dim is 48"):
        quantized.hadamard(48)
    with pytest.raises(KvlibError, match="rotate"):
        make_cache("quantized", get_preset("tiny"), 1, 4, "cpu", torch.float32, rotate="yes")


def test_attention_is_invariant_under_the_rotation():
    """softmax((qH)(kH)^T) (vH) H^T = softmax(q k^T) v: rotating keys, values and queries changes nothing exactly."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g) for n in (5, 40, 40))
    h = quantized.hadamard(64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rotated = quantized.rotated(sdpa(*(quantized.rotated(t, h) for t in (q, k, v))), h, inverse=True)
    torch.testing.assert_close(rotated, sdpa(q, k, v), atol=1e-5, rtol=0)


def test_rotation_alone_changes_no_logit(monkeypatch):
    """With a lossless quantizer in place of the min/max codes, the rotated layout's perplexity equals the exact
    cache's token for token: the rotation itself is exact (float error only), so any difference the study measures
    comes from quantizing in the rotated basis."""
    model = load("tiny-llama", weights="random", seed=0, with_hf=False).model
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(quantized, "quantize_grouped", lambda x, bits, group, dtype: (x, None, None))
    monkeypatch.setattr(quantized, "dequantize_grouped", lambda codes, scale, zero, dtype: codes)
    exact = perplexity(model, ids, "static").nll
    for options in ({"bits": 4, "rotate": True}, {"bits": 2, "rotate": True}):
        got = perplexity(model, ids, "quantized", options, "fast").nll
        assert (got - exact).abs().max() < 1e-5, options


def test_the_cache_stores_what_the_one_pass_method_assumes():
    """The cache's dequantized keys and values (rotated, quantized, rotated back) are the one-pass method's
    `fake_quantized` of the same tensors."""
    cfg = get_preset("tiny-llama")
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, cfg.n_kv_head, 12, cfg.head_dim, generator=g) for _ in range(2))
    options = {"bits": 4, "residual_len": 0, "key_axis": "token", "group": 0, "rotate": True}
    kv = make_cache("quantized", cfg, 2, 16, "cpu", torch.float32, bits=4, rotate=True)
    kv.update(0, k, v, 0)
    got_k, got_v = kv.layer_kv(0)
    want_k, want_v = quantized.fake_quantized(k, v, options)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_v, want_v, atol=1e-6, rtol=0)
    assert not kv.attends_codes  # the rotated layout reads through its dequantized copy


def test_rotation_spreads_an_outlier_channel():
    """Keys with one outlier channel (as real keys have): per-token int4 codes smear the outlier's range over the
    other channels; after the rotation the error is smaller (QuaRot's reason for rotating)."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(1, 2, 64, 64, generator=g)
    k[..., 5] *= 30.0
    plain = {"bits": 4, "residual_len": 0, "key_axis": "token", "group": 0, "rotate": False}
    err = {}
    for rotate in (False, True):
        kq, _ = quantized.fake_quantized(k, k, {**plain, "rotate": rotate})
        err[rotate] = (kq - k).pow(2).mean().item()
    assert err[True] < 0.5 * err[False], err
