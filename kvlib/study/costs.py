"""What decoding costs, counted rather than timed, and the KV-cache size of well-known architectures.

Counts are the minimal work the computation needs (matmul FLOPs = 2 x multiply-adds; causal attention counts only
the keys a query may see), per decode step:

- naive: step i runs the whole sequence so far (P + i tokens) through the model: every key and value of every
  earlier token is projected again, and every query attends over its prefix;
- cached: step 0 (the prefill) is the same as naive's; each later step projects one token and attends one
  query over the P + i keys in the cache.

So per step, naive work grows with the length and cached work stays (nearly) constant; summed over N new
tokens, projections cost O(N^2) against O(N), and attention O(N^3) against O(N^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvlib import checks
from kvlib.models.config import PRESETS, ModelConfig


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """Matmul FLOPs of the transformer blocks for one token: q/k/v, output projection and MLP (one multiply-add
    per weight of each matrix: ModelConfig.block_matmul_params)."""
    checks.config("cfg", cfg, where="linear_flops_per_token:")
    return 2 * cfg.block_matmul_params() * cfg.n_layer


def attention_flops(cfg: ModelConfig, n_queries: int, start: int) -> int:
    """QK^T and AV FLOPs for `n_queries` queries at positions start, start+1, ...; query j sees j + 1 keys."""
    checks.config("cfg", cfg, where="attention_flops:")
    checks.whole("n_queries", n_queries, minimum=0, where="attention_flops:")
    checks.whole("start", start, minimum=0, where="attention_flops:")
    keys_seen = n_queries * start + n_queries * (n_queries + 1) // 2
    return 4 * cfg.head_dim * cfg.n_head * cfg.n_layer * keys_seen


def decode_work(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> pd.DataFrame:
    """One row per (mode, step): tokens run through the model, K/V vectors projected, FLOPs, and running totals.

    `position` is the number of tokens attention sees at that step (P + step). The LM head runs on the last
    position only, in both modes (all greedy decoding needs).
    """
    checks.config("cfg", cfg, where="decode_work:")
    checks.whole("prompt_len", prompt_len, where="decode_work:")
    checks.whole("max_new_tokens", max_new_tokens, where="decode_work:")
    head = 2 * cfg.n_embd * cfg.vocab_size
    rows = []
    for mode in ("naive", "cached"):
        for step in range(max_new_tokens):
            length = prompt_len + step
            if mode == "naive" or step == 0:
                tokens, start = length, 0
            else:
                tokens, start = 1, length - 1
            rows.append(
                {
                    "mode": mode,
                    "step": step,
                    "position": length,
                    "tokens_processed": tokens,
                    "kv_projections": 2 * cfg.n_layer * cfg.n_kv_head * tokens,  # K and V vectors, per head
                    "attention_flops": attention_flops(cfg, tokens, start),
                    "linear_flops": linear_flops_per_token(cfg) * tokens + head,
                }
            )
    df = pd.DataFrame(rows)
    df["total_flops"] = df["attention_flops"] + df["linear_flops"]
    for col in ("kv_projections", "attention_flops", "total_flops"):
        df[f"cumulative_{col}"] = df.groupby("mode")[col].cumsum()
    return df


# ---- published architectures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    cfg: ModelConfig  # only the attention shapes matter here: layers, heads, kv heads, head_dim
    params: float | None  # parameter count as published (None: not listed here)
    family: str


def _arch(
    name: str, n_embd: int, n_layer: int, n_head: int, n_kv_head: int, n_positions: int, vocab: int
) -> ModelConfig:
    return ModelConfig(
        name=name, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        n_positions=n_positions, vocab_size=vocab,
    )  # fmt: skip


# Shapes from each model's published config.json; computed here, never measured (nothing this large runs here).
PUBLISHED: tuple[Architecture, ...] = (
    Architecture(PRESETS["distilgpt2"], PRESETS["distilgpt2"].n_params(), "GPT-2"),
    Architecture(PRESETS["gpt2"], PRESETS["gpt2"].n_params(), "GPT-2"),
    Architecture(PRESETS["gpt2-medium"], PRESETS["gpt2-medium"].n_params(), "GPT-2"),
    Architecture(PRESETS["smollm2-135m"], PRESETS["smollm2-135m"].n_params(), "Llama (GQA, 3 kv heads)"),
    Architecture(_arch("gpt2-large", 1280, 36, 20, 20, 1024, 50257), None, "GPT-2"),
    Architecture(_arch("gpt2-xl", 1600, 48, 25, 25, 1024, 50257), None, "GPT-2"),
    Architecture(_arch("Llama-2-7B", 4096, 32, 32, 32, 4096, 32000), 6.74e9, "Llama (MHA)"),
    Architecture(_arch("Llama-2-13B", 5120, 40, 40, 40, 4096, 32000), 13.0e9, "Llama (MHA)"),
    Architecture(_arch("Llama-2-70B", 8192, 80, 64, 8, 4096, 32000), 69.0e9, "Llama (GQA, 8 kv heads)"),
    Architecture(_arch("Llama-3-8B", 4096, 32, 32, 8, 8192, 128256), 8.03e9, "Llama (GQA, 8 kv heads)"),
    Architecture(_arch("Mistral-7B-v0.1", 4096, 32, 32, 8, 32768, 32000), 7.24e9, "Mistral (GQA, 8 kv heads)"),
    Architecture(_arch("Falcon-7B", 4544, 32, 71, 1, 2048, 65024), None, "Falcon (multi-query, 1 kv head)"),
)


def kv_bytes_table(bytes_per_element: int, architectures: tuple[Architecture, ...] = PUBLISHED) -> pd.DataFrame:
    """KV-cache bytes per token of each architecture at the given element size: one row per architecture."""
    checks.whole("bytes_per_element", bytes_per_element, where="kv_bytes_table:")
    if not isinstance(architectures, (tuple, list)) or not all(isinstance(a, Architecture) for a in architectures):
        what = "a sequence of kvlib.study.costs.Architecture"
        raise checks.fail("architectures", architectures, what, "kv_bytes_table:")
    rows = []
    for a in architectures:
        c = a.cfg
        per_token = c.kv_bytes_per_token(bytes_per_element)
        rows.append(
            {
                "architecture": c.name,
                "family": a.family,
                "n_layer": c.n_layer,
                "n_head": c.n_head,
                "n_kv_head": c.n_kv_head,
                "head_dim": c.head_dim,
                "context_len": c.n_positions,
                "params": a.params,
                "bytes_per_element": bytes_per_element,
                "kv_bytes_per_token": per_token,
                "kv_mib_per_token": per_token / 2**20,
                "kv_gib_full_context": per_token * c.n_positions / 2**30,
                "source": "computed from published config",
            }
        )
    return pd.DataFrame(rows)


def max_context_tokens(budget_bytes: float, weight_bytes: float, kv_bytes_per_token: float, batch_size: int = 1) -> int:
    """The most tokens per sequence whose KV cache fits in what the budget leaves after the weights (0 if none)."""
    where = "max_context_tokens:"
    checks.number("budget_bytes", budget_bytes, minimum=0, where=where)
    checks.number("weight_bytes", weight_bytes, minimum=0, where=where)
    checks.number("kv_bytes_per_token", kv_bytes_per_token, minimum=0, above=True, where=where)
    checks.whole("batch_size", batch_size, where=where)
    free = budget_bytes - weight_bytes
    if free <= 0:
        return 0
    return int(free // (kv_bytes_per_token * batch_size))


def context_budget(
    budget_bytes: float,
    batch_sizes: list[int],
    model: str,
    weight_bytes: float,
    kv_bytes_per_token: float,
    context_limit: int,
    architectures: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The longest context per sequence that fits in `budget_bytes`, at each batch size: for the measured model,
    and for each published architecture with a parameter count (16-bit weights), from `kv_bytes_table` rows.

    One row per (model, batch size); `measured` tells the study's own model from the computed ones, and
    `limited_by` whether memory or the model's context length comes first.
    """
    where = "context_budget:"
    batch_sizes = checks.whole_list("batch_sizes", batch_sizes, where=where)
    checks.number("budget_bytes", budget_bytes, minimum=0, where=where)
    checks.number("weight_bytes", weight_bytes, minimum=0, where=where)
    checks.number("kv_bytes_per_token", kv_bytes_per_token, minimum=0, above=True, where=where)
    checks.whole("context_limit", context_limit, where=where)
    if architectures is not None and not isinstance(architectures, pd.DataFrame):
        raise checks.fail("architectures", architectures, "None or a DataFrame from kv_bytes_table", where)
    entries = [(model, True, weight_bytes, kv_bytes_per_token, context_limit)]
    if architectures is not None:
        for _, a in architectures[architectures["params"].notna()].iterrows():
            bpe = a["bytes_per_element"]
            entries.append((a["architecture"], False, a["params"] * bpe, a["kv_bytes_per_token"], a["context_len"]))
    rows = []
    for name, measured, weights, per_token, limit in entries:
        for b in batch_sizes:
            tokens = max_context_tokens(budget_bytes, weights, per_token, b)
            if tokens == 0:
                limited_by = "no room: weights exceed the budget"
            else:
                limited_by = "context length" if limit <= tokens else "memory"
            rows.append(
                {
                    "model": name,
                    "measured": measured,
                    "batch_size": b,
                    "weight_bytes": weights,
                    "max_tokens_memory": tokens,
                    "context_limit": limit,
                    "max_tokens": min(tokens, limit),
                    "limited_by": limited_by,
                    "budget_gib": budget_bytes / 2**30,
                }
            )
    return pd.DataFrame(rows)


# ---- measured: bytes the caches actually hold -----------------------------------------------------------------


def measured_cache_bytes(
    lm: Any, layouts: list[str], batch_sizes: list[int], seq_lens: list[int], seed: int = 0
) -> pd.DataFrame:
    """Fill a cache of each layout with a real prefill of B x T tokens; count the bytes its tensors hold and
    compare with the formula 2 x layers x B x T x kv heads x head_dim x bytes. One row per (layout, B, T)."""
    from kvlib.caches.base import check_layout, make_cache

    where = "measured_cache_bytes:"
    layouts = checks.name_list("layouts", layouts, where=where)
    for layout in layouts:
        check_layout(layout)
    batch_sizes = checks.whole_list("batch_sizes", batch_sizes, where=where)
    seq_lens = checks.whole_list("seq_lens", seq_lens, where=where)
    checks.seed("seed", seed, where=where)
    from kvlib.measure.memory import held_cache_bytes, kv_cache_bytes_formula
    from kvlib.models.decode import prefill, prepare_positions
    from kvlib.models.prompts import synthetic_prompts

    rows = []
    for layout in layouts:
        for batch in batch_sizes:
            for tokens in seq_lens:
                ids = synthetic_prompts(lm.cfg.vocab_size, batch, tokens, seed, lm.device)
                positions, _ = prepare_positions(ids, None, 0)
                cache = make_cache(layout, lm.cfg, batch, tokens, lm.device, lm.dtype)
                with torch.inference_mode():
                    prefill(lm.model, ids, positions, cache, None)
                held = held_cache_bytes(cache)
                formula = kv_cache_bytes_formula(lm.cfg, batch, tokens, lm.dtype)
                rows.append(
                    {
                        "model": lm.cfg.name,
                        "dtype": lm.dtype_name,
                        "device": str(lm.device),
                        "weights": lm.weights,
                        "layout": layout,
                        "batch_size": batch,
                        "tokens": tokens,
                        "held_bytes": held,
                        "formula_bytes": formula,
                        "held_mib": held / 2**20,
                        "formula_mib": formula / 2**20,
                        "held_over_formula": held / formula,
                    }
                )
                del cache
    return pd.DataFrame(rows)


def memory_breakdown(
    lm: Any, layout: str, batch_size: int, prompt_len: int, new_tokens: int, seed: int = 0
) -> pd.DataFrame:
    """Peak memory of one cached generation split into weights, KV cache and the rest, one row per component.

    On CPU the peak is the process's resident set (RSS), so "rest" holds Python, the libraries, activations
    and the allocator's free memory; on CUDA it is torch's peak allocation, so "rest" is activations and
    workspace.
    """
    where = "memory_breakdown:"
    if not isinstance(layout, str):
        raise checks.fail("layout", layout, 'a cache layout name, or "none"', where)
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        checks.whole(name, value, where=where)
    checks.seed("seed", seed, where=where)
    from kvlib.measure.memory import PeakTracker, held_cache_bytes
    from kvlib.models.decode import generate
    from kvlib.models.prompts import synthetic_prompts

    ids = synthetic_prompts(lm.cfg.vocab_size, batch_size, prompt_len, seed, lm.device)
    with PeakTracker(lm.device) as tracker:
        g = generate(lm.model, ids, new_tokens, cache=layout)
    peak = tracker.result
    from kvlib.models.fastpath import packed_bytes

    weights, packed = lm.model.weight_bytes(), packed_bytes(lm.model)
    cache = held_cache_bytes(g.cache)
    parts = {
        "weights": weights,
        "packed weight copy": packed,  # the CPU fast path's oneDNN layout of the same weights (0 when unused)
        "KV cache": cache,
        "rest": max(0, peak.peak_bytes - weights - packed - cache),
    }
    return pd.DataFrame(
        [
            {
                "component": name,
                "bytes": n,
                "mib": n / 2**20,
                "peak_kind": peak.kind,
                "peak_bytes": peak.peak_bytes,
                "layout": layout,
                "batch_size": batch_size,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
            }
            for name, n in parts.items()
        ]
    )
