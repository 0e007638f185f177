"""Shared machinery of the strategy measurements: byte accounting, interleaved timing, error against the exact
path. The definitions are in the package docstring (kvlib/strategies/__init__.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch

import kvlib.layouts  # noqa: F401  (registers the layouts, whatever way kvlib was imported)
from kvlib.cache import KVCache, make_cache
from kvlib.config import KvlibError
from kvlib.decode import Generation, decode_step, generate, prefill, prepare_positions
from kvlib.layouts.paged import PagedCache
from kvlib.model import Decoder

Variant = tuple[str, dict]  # (layout name, cache options)


# ---- accounting ------------------------------------------------------------------------------------------------


def bytes_per_token(model: Decoder) -> int:
    """Full-precision KV bytes of one token of one sequence: 2 x layers x kv heads x head_dim x element size."""
    return model.cfg.kv_bytes_per_token(model.wte.weight.element_size())


def held_bytes(cache: KVCache) -> int:
    return cache.allocated_bytes() if isinstance(cache, PagedCache) else cache.nbytes()


def used_bytes(cache: KVCache) -> int:
    """Bytes storing tokens: the layout's own count where it has one; for contiguous layouts every written slot."""
    if hasattr(cache, "used_bytes"):
        return cache.used_bytes()
    return cache.seq_len * cache.batch_size * cache.cfg.kv_bytes_per_token(cache.tensors()[0].element_size())


# ---- timing and error ------------------------------------------------------------------------------------------


def interleaved_runs(
    runs: Mapping[str, Callable[[], Generation]], repeats: int = 3, warmup: int = 1
) -> tuple[pd.DataFrame, dict[str, Generation]]:
    """Run every variant `warmup` times, then `repeats` rounds of each variant in turn (A/B interleaving, so drift
    and noise from other processes hit all variants alike). Returns one row per (variant, repeat) with ttft_s and
    tpot_s (the median decode step of that run), and the last Generation of each variant."""
    if repeats < 1 or warmup < 0:
        raise KvlibError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
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
    B, P = input_ids.shape
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
        "tokens_equal": bool(torch.equal(free_tokens, exact_tokens)),
        "first_divergence_step": int(differs[0, 0]) if differs.numel() else pd.NA,
    }


def generate_fn(model: Decoder, ids: torch.Tensor, n: int, variant: Variant, **kw: Any) -> Callable[[], Generation]:
    cache, options = variant
    return lambda: generate(model, ids, n, cache=cache, cache_options=options, **kw)


def finish(df: pd.DataFrame) -> pd.DataFrame:
    if "first_divergence_step" in df:
        df["first_divergence_step"] = df["first_divergence_step"].astype("Int64")
    return df.reset_index(drop=True)
