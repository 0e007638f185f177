"""Figures published by others, or measured outside this study, that its pages put beside their own: read from
kvlib/data/published.yaml, where each says where it comes from. None is measured by kvlib; every page that shows
one marks it as theirs.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import pandas as pd
import yaml

FILE = "published.yaml"  # in kvlib/data


@functools.cache
def _data() -> dict[str, Any]:
    return yaml.safe_load(resources.files("kvlib").joinpath("data", FILE).read_text(encoding="utf-8"))


def passkey_retrieval() -> pd.DataFrame:
    """Pass-key retrieval counts: model, source, policy, setting, kept_fraction, retrieved, n (one row each)."""
    columns = ["model", "source", "policy", "setting", "kept_fraction", "retrieved", "n"]
    return pd.DataFrame(_data()["passkey_retrieval"], columns=columns)


def passkey_sources() -> dict[str, str]:
    """What each source of `passkey_retrieval` and `passkey_perplexity` is, in words."""
    return dict(_data()["passkey_retrieval_sources"])


def passkey_perplexity() -> pd.DataFrame:
    """Perplexity change against the full cache: model, source, policy, kept_fraction, ppl_change_pct (%), computed
    from the published full-cache and policy perplexities."""
    rows = [
        {**{k: r[k] for k in ("model", "source", "policy", "kept_fraction")},
         "ppl_change_pct": r["perplexity"] / r["full"] * 100 - 100}
        for r in _data()["passkey_perplexity"]
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["model", "source", "policy", "kept_fraction", "ppl_change_pct"])


def passkey_notes(model: str) -> tuple[str, ...]:
    """Per model: what its published figures are (first: what the figure's grey crosses show), then what was
    published without a figure to plot; () for a model with none."""
    return tuple(_data()["passkey_notes"].get(model, ()))


def streaming_llm() -> pd.DataFrame:
    """StreamingLLM's perplexities: source, variant, sink, perplexity."""
    return pd.DataFrame(_data()["streaming_llm"], columns=["source", "variant", "sink", "perplexity"])


def quantization() -> pd.DataFrame:
    """Quantized caches' perplexity changes: reference, bits_per_element, ppl_change_pct."""
    return pd.DataFrame(_data()["quantization"], columns=["reference", "bits_per_element", "ppl_change_pct"])


def kv_divergence() -> tuple[str, pd.DataFrame]:
    """llama.cpp's published KL divergences of a quantized cache (and its floor) against the f16 cache: (where they
    come from, rows of cache, bits_per_element, kld (nats), ppl_change (absolute perplexity change))."""
    d = _data()["kv_divergence"]
    return d["source"], pd.DataFrame(d["rows"], columns=["cache", "bits_per_element", "kld", "ppl_change"])


def llamacpp_rotation() -> pd.DataFrame:
    """llama.cpp's published effect of its Hadamard rotation on a quantized cache: rows of cache, bits_per_element,
    ppl_change_pct (%), source."""
    d = _data()["llamacpp_rotation"]
    return pd.DataFrame([{**r, "source": d["source"]} for r in d["rows"]],
                        columns=["cache", "bits_per_element", "ppl_change_pct", "source"])  # fmt: skip


def paged_waste() -> dict[str, Any]:
    """PagedAttention's waste figures: source, contiguous_low_pct, contiguous_high_pct, paged_below_pct."""
    return dict(_data()["paged_waste"])
