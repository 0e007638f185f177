"""What each lossy cache costs in quality, on real text (notebook 08_quality): StreamingLLM and KIVI in miniature.

Every perplexity here comes from kvlib.measure.perplexity (the "fast" one-pass method by default, proven equal to
teacher forcing through the cache itself by tests/test_perplexity.py). Tidy frames: one row per variant.
The papers' numbers are in REFERENCES, each with where it comes from; they are theirs, never ours.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from kvlib.measure.perplexity import (
    HF_QUANTIZED,
    perplexity,
    perplexity_hf,
    perplexity_hf_quantized,
)

# The published figures put beside ours (marked as theirs wherever shown).
REFERENCES = pd.DataFrame(
    [
        {
            "source": "StreamingLLM (Xiao et al. 2023), Llama-2-13B, 65K tokens of PG-19, cache 1024",
            "variant": "window only (0 sinks)",
            "sink": 0,
            "perplexity": 5158.0,
        },
        {
            "source": "StreamingLLM (Xiao et al. 2023), Llama-2-13B, 65K tokens of PG-19, cache 1024",
            "variant": "4 sinks + 1020 recent",
            "sink": 4,
            "perplexity": 5.40,
        },
    ]
)
# Quantization claims: (label, effective bits per stored element, perplexity change in %, how the number was had)
QUANT_REFERENCES = pd.DataFrame(
    [
        {
            "reference": "llama.cpp q8_0 K/V cache: about +0.005 perplexity (taken on a base of about 6: +0.08%)",
            "bits_per_element": 8.5,
            "ppl_change_pct": 0.08,
        },
        {
            "reference": "KIVI / HF quantized-cache blog: int4 close to full precision (claim, placed at 0%)",
            "bits_per_element": 4.5,
            "ppl_change_pct": 0.0,
        },
    ]
)


def variant_label(cache: str, options: dict[str, Any]) -> str:
    """A short name for a cache and its options ("window 4+252", "int4 kivi r32 g32", ...)."""
    o = options
    if cache == "window":
        pos = " (cache positions)" if o.get("positions") == "cache" else ""
        return f"window {o.get('sink', 4)}+{o.get('window', 64)}{pos}"
    if cache == "quantized":
        kivi = o.get("key_axis") == "channel"
        name = f"int{o.get('bits', 8)} {'kivi' if kivi else 'per-token'}"
        if o.get("residual_len"):
            name += f" r{o['residual_len']}"
        if o.get("group"):
            name += f" g{o['group']}"
        return name
    if cache == HF_QUANTIZED:
        return f"hf quanto int{o.get('bits', 4)} r{o.get('residual_len', 128)}"
    return "full (static)" if cache == "static" else cache


def full_bytes_per_token(cfg: Any, dtype: torch.dtype) -> int:
    return cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())


def run_variants(
    model: Any, ids: torch.Tensor, variants: list[tuple[str, dict[str, Any]]], method: str = "fast"
) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Perplexity of `ids` (1, N) through each (cache, options); the first variant is the baseline of the changes.
    Returns the tidy table and each variant's per-token NLL (for rolling plots)."""
    N = ids.shape[1]
    rows, nlls = [], {}
    full_bpt = full_bytes_per_token(model.cfg, model.wte.weight.dtype)
    elements = 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim  # K and V values per token
    for cache, options in variants:
        r = perplexity(model, ids, cache, options, method)
        label = variant_label(cache, options)
        nlls[label] = r.nll
        rows.append(
            {
                "variant": label,
                "cache": cache,
                **{k: options.get(k) for k in ("sink", "window", "bits", "key_axis", "residual_len")},
                "positions": options.get("positions", "original") if cache == "window" else None,
                "group": options.get("group"),
                "tokens": N,
                "perplexity": r.perplexity,
                "nll_mean": r.nll_mean,
                "kv_bytes_held": r.kv_bytes_held,
                "bytes_per_token": r.kv_bytes_held / N,
                "bits_per_element": r.kv_bytes_held / N * 8 / elements,
                "saving_pct": 100 * (1 - r.kv_bytes_held / (N * full_bpt)),
                "time_s": r.time_s,
                "method": method,
            }
        )
    df = pd.DataFrame(rows)
    for col in ("sink", "window", "bits", "residual_len", "group"):
        df[col] = df[col].astype("Int64")  # whole numbers, blank where a layout has no such option
    df["ppl_change_pct"] = 100 * (df["perplexity"] / df["perplexity"].iloc[0] - 1)
    return df, nlls


def streaming_variants(budgets: list[int], sinks: list[int], cache_positions_sink: int | None = 4) -> list:
    """Full cache first, then for each budget: window only and each sink count (sink + window = budget); and, at the
    largest budget, `cache_positions_sink` sinks with StreamingLLM's positions counted within the cache."""
    out: list[tuple[str, dict[str, Any]]] = [("static", {})]
    for b in budgets:
        for s in sinks:
            out.append(("window", {"sink": s, "window": b - s}))
        if cache_positions_sink and b == max(budgets):
            out.append(
                ("window", {"sink": cache_positions_sink, "window": b - cache_positions_sink, "positions": "cache"})
            )
    return out


def quantized_variants(kivi_group: int, residuals: list[int]) -> list:
    """Full cache first; int8 and int4 per token; KIVI int4 and int2 (keys per channel, values per token in groups
    of `kivi_group` channels) with each full-precision residual."""
    out: list[tuple[str, dict[str, Any]]] = [("static", {}), ("quantized", {"bits": 8}), ("quantized", {"bits": 4})]
    for bits in (4, 2):
        for r in residuals:
            out.append(("quantized", {"bits": bits, "key_axis": "channel", "residual_len": r, "group": kivi_group}))
    return out


def rolling(nlls: dict[str, torch.Tensor], width: int, keep: list[str] | None = None) -> pd.DataFrame:
    """Perplexity over a moving window of `width` scored tokens, against position: tidy (variant, position, ppl)."""
    frames = []
    for label, nll in nlls.items():
        if keep is not None and label not in keep:
            continue
        s = pd.Series(nll.numpy()).rolling(width).mean().dropna()
        frames.append(pd.DataFrame({"variant": label, "position": s.index + 1, "rolling_ppl": s.map(math.exp)}))
    return pd.concat(frames, ignore_index=True)


def hf_quantized_rows(hf_model: Any, ids: torch.Tensor, bits_list: list[int], residual_len: int) -> pd.DataFrame:
    """Hugging Face's QuantizedCache (quanto) token by token, against HF's own model without a cache on the same
    tokens; a backend that cannot run is a row saying why."""
    base = perplexity_hf(hf_model, ids)
    rows = [{"variant": "hf full (no cache)", "bits": None, "perplexity": base.perplexity, "ppl_change_pct": 0.0,
             "status": "ok", "time_s": base.time_s}]  # fmt: skip
    for bits in bits_list:
        label = variant_label(HF_QUANTIZED, {"bits": bits, "residual_len": residual_len})
        try:
            r = perplexity_hf_quantized(hf_model, ids, bits=bits, residual_len=residual_len)
        except Exception as e:  # a backend that cannot run is reported, not skipped in silence
            rows.append({"variant": label, "bits": bits, "perplexity": float("nan"), "ppl_change_pct": float("nan"),
                         "status": f"unavailable: {str(e).splitlines()[0]}", "time_s": float("nan")})  # fmt: skip
            continue
        rows.append({"variant": label, "bits": bits, "perplexity": r.perplexity,
                     "ppl_change_pct": 100 * (r.perplexity / base.perplexity - 1), "status": "ok",
                     "time_s": r.time_s, "bytes_per_token": r.kv_bytes_held / ids.shape[1]})  # fmt: skip
    df = pd.DataFrame(rows)
    df["tokens"] = ids.shape[1]
    return df


def greedy_divergence(
    model: Any, prompts: torch.Tensor, new_tokens: int, variants: list[tuple[str, dict[str, Any]]], tokenizer: Any
) -> pd.DataFrame:
    """Greedy continuation of each prompt (B, P) under each layout, and the first step where it leaves the
    full-precision (static) continuation (None: never, within new_tokens)."""
    from kvlib.models.decode import generate

    ref = generate(model, prompts, new_tokens, cache="static").tokens
    rows = []
    for cache, options in variants:
        out = generate(model, prompts, new_tokens, cache=cache, cache_options=options).tokens
        for b in range(prompts.shape[0]):
            differ = (out[b] != ref[b]).nonzero()
            text = tokenizer.decode(out[b]) if tokenizer is not None else " ".join(map(str, out[b].tolist()))
            rows.append({"prompt": b, "variant": variant_label(cache, options),
                         "first_divergence_step": int(differ[0]) if len(differ) else None,
                         "continuation": text})  # fmt: skip
    return pd.DataFrame(rows)


def best_saving_within(table: pd.DataFrame, max_change_pct: float) -> pd.Series | None:
    """The variant with the largest memory saving whose perplexity rose by at most `max_change_pct` (None: none)."""
    ok = table[(table["ppl_change_pct"] <= max_change_pct) & (table["saving_pct"] > 0)]
    return None if ok.empty else ok.sort_values("saving_pct").iloc[-1]
