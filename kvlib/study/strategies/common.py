"""Shared machinery of the strategy measurements: byte accounting, interleaved timing, error against the exact
path. The definitions are in the package docstring (kvlib/study/strategies/__init__.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch

import kvlib.caches  # noqa: F401  (registers the layouts, whatever way kvlib was imported)
from kvlib.caches.base import KVCache, check_layout, make_cache
from kvlib.caches.paged import PagedCache
from kvlib.core import checks
from kvlib.models.decode import Generation, check_inputs, decode_step, generate, prefill, prepare_positions
from kvlib.models.decoders import Decoder

Variant = tuple[str, dict]  # (layout name, cache options)

ZERO_OK = ("warmup", "sink")  # counts that may be 0; every other size or count of a measurement must be >= 1


def check_sizes(where: str, **values: Any) -> None:
    """The sizes and counts a measurement function was given: whole numbers >= 1 (>= 0 for ZERO_OK), and `seed`
    a seed; a KvlibError naming the function, the parameter and its value otherwise."""
    for name, value in values.items():
        if name == "seed":
            checks.seed(name, value, where=where)
        else:
            checks.whole(name, value, 0 if name in ZERO_OK else 1, where=where)


def check_variants(variants: Any, where: str) -> dict[str, Variant]:
    """label -> (layout, options), every layout and option name checked before anything runs."""
    if not isinstance(variants, Mapping):
        raise checks.fail("variants", variants, "a mapping of label to (layout, options)", where)
    out = {}
    for label, variant in variants.items():
        if not (isinstance(variant, (tuple, list)) and len(variant) == 2):
            raise checks.fail(f"variants[{label!r}]", variant, "a (layout, options) pair", where)
        layout, options = variant
        out[label] = (layout, check_layout(layout, options, name=f"variants[{label!r}] cache"))
    return out


# ---- accounting ------------------------------------------------------------------------------------------------


def bytes_per_token(model: Decoder) -> int:
    """Full-precision KV bytes of one token of one sequence: 2 x layers x kv heads x head_dim x element size."""
    return model.cfg.kv_bytes_per_token(model.wte.weight.element_size())


def held_bytes(cache: KVCache) -> int:
    return cache.allocated_bytes() if isinstance(cache, PagedCache) else cache.nbytes()


def used_bytes(cache: KVCache) -> int:
    """Bytes storing tokens: the layout's own count (KVCache.used_bytes; contiguous layouts: every written slot)."""
    return cache.used_bytes()


def lossy_tokens(cache: KVCache) -> int:
    """Tokens per sequence that a layout did not keep exactly at the end of a run: quantized (quantized layout) or
    evicted (window); 0 for exact layouts. A lossy layout at 0 behaved exactly in that run, so its error and its
    saving say nothing about what it loses (KVCache.lossy_tokens: the layout's own count)."""
    return int(cache.lossy_tokens())


# ---- timing and error ------------------------------------------------------------------------------------------


def interleaved_runs(
    runs: Mapping[str, Callable[[], Generation]], repeats: int = 3, warmup: int = 1
) -> tuple[pd.DataFrame, dict[str, Generation]]:
    """Run every variant `warmup` times, then `repeats` rounds of each variant in turn (A/B interleaving, so drift
    and noise from other processes hit all variants alike). Returns one row per (variant, repeat) with ttft_s and
    tpot_s (the median decode step of that run), and the last Generation of each variant."""
    check_sizes("interleaved_runs:", repeats=repeats, warmup=warmup)
    if not isinstance(runs, Mapping) or not all(callable(r) for r in runs.values()):
        raise checks.fail("runs", runs, "a mapping of label to a function that returns a Generation")
    for _ in range(warmup):
        for run in runs.values():
            run()
    rows, last = [], {}
    for r in range(repeats):
        for label, run in runs.items():
            g = run()
            tpot = statistics.median(g.decode_s) if g.decode_s else math.nan
            rows.append({"variant": label, "repeat": r, "ttft_s": g.prefill_s, "tpot_s": tpot})
            last[label] = g
    return pd.DataFrame(rows), last


def timing_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant: median ttft_ms / tpot_ms over repeats, with min and max."""
    out = []
    for label, g in runs.groupby("variant", sort=False):
        row: dict[str, Any] = {"variant": label, "repeats": len(g)}
        for col in ("ttft", "tpot"):
            ms = g[f"{col}_s"] * 1e3
            row |= {f"{col}_ms": ms.median(), f"{col}_ms_min": ms.min(), f"{col}_ms_max": ms.max()}
        out.append(row)
    return pd.DataFrame(out)


@torch.inference_mode()
def teacher_forced_logits(
    model: Decoder,
    input_ids: torch.Tensor,
    tokens: torch.Tensor,
    cache: str,
    cache_options: dict | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (N, B, V) of every step when the cache is fed `tokens` (B, N) instead of its own choices."""
    check_inputs(model, input_ids, attention_mask)
    check_inputs(model, tokens, name="tokens")
    cache_options = check_layout(cache, cache_options)
    B, P = input_ids.shape
    if tokens.shape[0] != B:
        raise checks.fail("tokens", tuple(tokens.shape), f"a ({B}, new_tokens) tensor, as input_ids has {B} rows")
    N = tokens.shape[1]
    positions, key_valid = prepare_positions(input_ids, attention_mask, N)
    kv = make_cache(cache, model.cfg, B, P + N, input_ids.device, model.wte.weight.dtype, **(cache_options or {}))
    logits = torch.empty(N, B, model.cfg.vocab_size, device=input_ids.device)
    logits[0] = prefill(model, input_ids, positions, kv, key_valid)
    for i in range(1, N):
        logits[i] = decode_step(model, tokens[:, i - 1 : i], P + i - 1, positions, kv, key_valid)
    return logits


def error_vs_exact(
    exact_logits: torch.Tensor, exact_tokens: torch.Tensor, forced_logits: torch.Tensor, free_tokens: torch.Tensor
) -> dict[str, Any]:
    """The error columns (see the module docstring). exact_logits / forced_logits (N, B, V); tokens (B, N)."""
    diff = (forced_logits.float() - exact_logits.float()).abs()
    agree = exact_tokens == forced_logits.argmax(-1).T  # (B, N)
    differs = (free_tokens != exact_tokens).any(dim=0).nonzero()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "rel_logit_diff": diff.max().item() / exact_logits.abs().max().item(),
        "token_agreement_pct": 100.0 * agree.float().mean().item(),
        "agreeing_steps": int(agree.sum().item()),  # the numerator and denominator of token_agreement_pct:
        "compared_steps": agree.numel(),  # teacher-forced steps x sequences
        "tokens_equal": bool(torch.equal(free_tokens, exact_tokens)),
        "first_divergence_step": int(differs[0, 0]) if differs.numel() else pd.NA,
    }


def generate_fn(model: Decoder, ids: torch.Tensor, n: int, variant: Variant, **kw: Any) -> Callable[[], Generation]:
    cache, options = variant
    return lambda: generate(model, ids, n, cache=cache, cache_options=options, **kw)


def finish(df: pd.DataFrame) -> pd.DataFrame:
    counts = ("first_divergence_step", "agreeing_steps", "compared_steps", "stored_tokens", "quantized_tokens")
    for col in (*counts, "lossy_tokens"):  # whole numbers, NA where a row has none (an unavailable backend)
        if col in df:
            df[col] = df[col].astype("Int64")
    return df.reset_index(drop=True)
