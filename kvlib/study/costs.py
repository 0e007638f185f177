"""What decoding costs, counted rather than timed, and the KV-cache size of well-known architectures.

Counts are the minimal work the computation needs (matmul FLOPs = 2 x multiply-adds; causal attention counts only
the keys a query may see: on a sliding-window layer, at most its window), per decode step:

- naive: step i runs the whole sequence so far (P + i tokens) through the model: every key and value of every
  earlier token is projected again, and every query attends over its prefix;
- cached: step 0 (the prefill) is the same as naive's; each later step projects one token and attends one
  query over the P + i keys in the cache.

So per step, naive work grows with the length and cached work stays (nearly) constant; summed over N new
tokens, projections cost O(N^2) against O(N), and attention O(N^3) against O(N^2).

One concept in one file (over 400 lines): what a cache costs, computed from shapes (work, bytes, the published
architectures' shapes with their sources), never measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvlib.caches.base import REFERENCE, check_layout, make_cache
from kvlib.core import checks
from kvlib.core.config import PRESETS, ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.measure.memory import PeakTracker, bytes_per_element, held_cache_bytes, kv_cache_bytes_formula, layer_slots
from kvlib.models.decode import generate, prefill, prepare_positions
from kvlib.models.fastpath import packed_bytes, prepare_for_inference
from kvlib.models.prompts import synthetic_prompts


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """Matmul FLOPs of the transformer blocks for one token: q/k/v, output projection and MLP (one multiply-add
    per weight of each matrix: ModelConfig.block_matmul_params)."""
    checks.config("cfg", cfg, where="linear_flops_per_token:")
    return 2 * cfg.block_matmul_params() * cfg.n_layer


def keys_seen(n_queries: int, start: int, window: int | None = None) -> int:
    """Keys the causal attention of `n_queries` queries at positions start, start+1, ... reads: the query at
    position p sees p + 1 keys, or min(p + 1, window) on a sliding-window layer (Gemma 3's local layers)."""
    first, last = start + 1, start + n_queries  # keys seen by the first and the last query, without a window
    if window is None or last <= window:
        return n_queries * start + n_queries * (n_queries + 1) // 2
    below = min(last, window)  # queries that still see every key: first .. below keys
    growing = below * (below + 1) // 2 - (first - 1) * first // 2 if below >= first else 0
    return growing + (last - max(first - 1, window)) * window  # the rest see the window


def attention_flops(cfg: ModelConfig, n_queries: int, start: int) -> int:
    """QK^T and AV FLOPs for `n_queries` queries at positions start, start+1, ...: 4 x head_dim x heads per key a
    query sees, summed over layers; query j sees j + 1 keys, at most the window on a sliding layer (`keys_seen`)."""
    checks.config("cfg", cfg, where="attention_flops:")
    checks.whole("n_queries", n_queries, minimum=0, where="attention_flops:")
    checks.whole("start", start, minimum=0, where="attention_flops:")
    seen = sum(keys_seen(n_queries, start, cfg.window_of(layer)) for layer in range(cfg.n_layer))
    return 4 * cfg.head_dim * cfg.n_head * seen


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

FULL, SLIDING = "full_attention", "sliding_attention"  # Hugging Face's names of the two layer types


@dataclass(frozen=True)
class Architecture:
    cfg: ModelConfig  # only the attention shapes matter here: layers, heads, kv heads, head_dim
    params: float | None  # parameter count as published (None: not listed here)
    family: str
    sliding_window: int = 0  # keys a sliding layer's query sees, itself included (0: no sliding layers)
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; () = every layer full attention
    config_source: str = "the model's published config.json"  # where the shapes and the window come from

    def windows(self) -> list[int | None]:
        """Each layer's window (None: a full-attention layer), from `layer_types` and `sliding_window`."""
        types = self.layer_types or (FULL,) * self.cfg.n_layer
        return [self.sliding_window if t == SLIDING else None for t in types]


def layer_pattern(n_layer: int, every: int) -> tuple[str, ...]:
    """Hugging Face's default layer types for Gemma: layer i is full attention when (i + 1) % every == 0, sliding
    otherwise (Gemma 2: every 2, local and global alternating; Gemma 3: every 6, five local to one global)."""
    return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(n_layer))


# fmt: off
def _arch(
    name: str, n_embd: int, n_layer: int, n_head: int, n_kv_head: int, n_positions: int, vocab: int,
    head_dim: int = 0,
) -> ModelConfig:
    """The attention shapes of a published model; `head_dim` where it is not n_embd / n_head (Gemma: kvlib allows
    that on its gemma3 architecture only; the MLP width is a placeholder, unused here)."""
    shape = {} if not head_dim else {"head_dim": head_dim, "arch": "gemma3", "intermediate_size": 4 * n_embd}
    return ModelConfig(
        name=name, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        n_positions=n_positions, vocab_size=vocab, **shape,
    )
# fmt: on


def _preset(name: str, family: str) -> Architecture:
    """A study preset as a table row; its sliding layers (Gemma 3) from its own config."""
    cfg = PRESETS[name]
    source = f"kvlib preset {name!r} (kvlib/core/config.py, the config its GGUF gives)"
    return Architecture(cfg, cfg.n_params(), family, cfg.sliding_window, cfg.layer_types, source)


_HF = "transformers"
_GEMMA2_CONVERT = f"{_HF}/models/gemma2/convert_gemma2_weights_to_hf.py"
_GEMMA3_CONVERT = f"{_HF}/models/gemma3/convert_gemma3_weights.py, _VARIANTS"
# Shapes from each model's published config; computed here, never measured (nothing this large runs here). The
# sliding-window rows cite where their shapes come from (`config_source`): Hugging Face's conversion scripts hold
# the configs Google published (huggingface/transformers on GitHub, src/transformers/models/...), and the installed
# transformers' config classes hold the defaults of the checkpoints their docstrings name.
# fmt: off
PUBLISHED: tuple[Architecture, ...] = (
    Architecture(PRESETS["distilgpt2"], PRESETS["distilgpt2"].n_params(), "GPT-2"),
    Architecture(PRESETS["gpt2"], PRESETS["gpt2"].n_params(), "GPT-2"),
    Architecture(PRESETS["gpt2-medium"], PRESETS["gpt2-medium"].n_params(), "GPT-2"),
    Architecture(PRESETS["smollm2-135m"], PRESETS["smollm2-135m"].n_params(), "Llama (GQA, 3 kv heads)"),
    _preset("gemma3-270m", "Gemma 3 (5 local : 1 global)"),
    Architecture(_arch("gpt2-large", 1280, 36, 20, 20, 1024, 50257), None, "GPT-2"),
    Architecture(_arch("gpt2-xl", 1600, 48, 25, 25, 1024, 50257), None, "GPT-2"),
    Architecture(_arch("Llama-2-7B", 4096, 32, 32, 32, 4096, 32000), 6.74e9, "Llama (MHA)"),
    Architecture(_arch("Llama-2-13B", 5120, 40, 40, 40, 4096, 32000), 13.0e9, "Llama (MHA)"),
    Architecture(_arch("Llama-2-70B", 8192, 80, 64, 8, 4096, 32000), 69.0e9, "Llama (GQA, 8 kv heads)"),
    Architecture(_arch("Llama-3-8B", 4096, 32, 32, 8, 8192, 128256), 8.03e9, "Llama (GQA, 8 kv heads)"),
    Architecture(
        _arch("Mistral-7B-v0.1", 4096, 32, 32, 8, 32768, 32000), 7.24e9, "Mistral (GQA, 8 kv heads)", 4096,
        (SLIDING,) * 32,
        "mistralai/Mistral-7B-v0.1 config.json (sliding_window 4096, max_position_embeddings 32768); the installed "
        f"{_HF}' MistralConfig defaults name that checkpoint (32 layers, 8 kv heads, sliding_window 4096)",
    ),
    Architecture(_arch("Falcon-7B", 4544, 32, 71, 1, 2048, 65024), None, "Falcon (multi-query, 1 kv head)"),
    # Gemma 2: local (window 4096) and global layers alternating, the first one local.
    Architecture(
        _arch("Gemma-2-2B", 2304, 26, 8, 4, 8192, 256000, head_dim=256), None, "Gemma 2 (1 local : 1 global)", 4096,
        layer_pattern(26, 2), f"the installed {_HF}' Gemma2Config defaults (hidden 2304, 26 layers, the 2B's shape)",
    ),
    Architecture(
        _arch("Gemma-2-9B", 3584, 42, 16, 8, 8192, 256000, head_dim=256), None, "Gemma 2 (1 local : 1 global)", 4096,
        layer_pattern(42, 2), f"{_GEMMA2_CONVERT}, gemma_9b_config",
    ),
    Architecture(
        _arch("Gemma-2-27B", 4608, 46, 32, 16, 8192, 256000, head_dim=128), None, "Gemma 2 (1 local : 1 global)",
        4096, layer_pattern(46, 2), f"{_GEMMA2_CONVERT}, gemma_27b_config",
    ),
    # Gemma 3: five local layers to one global; window 512 on the 270M and 1B, 1024 on the larger ones.
    Architecture(
        _arch("Gemma-3-1B", 1152, 26, 4, 1, 32768, 262144, head_dim=256), None, "Gemma 3 (5 local : 1 global)", 512,
        layer_pattern(26, 6), f"{_GEMMA3_CONVERT}['gemma3_1b']",
    ),
    Architecture(
        _arch("Gemma-3-4B", 2560, 34, 8, 4, 131072, 262144, head_dim=256), None, "Gemma 3 (5 local : 1 global)",
        1024, layer_pattern(34, 6), f"{_GEMMA3_CONVERT}['gemma3_4b'] (context: Gemma3TextConfig's default 131,072)",
    ),
    Architecture(
        _arch("Gemma-3-12B", 3840, 48, 16, 8, 131072, 262144, head_dim=256), None, "Gemma 3 (5 local : 1 global)",
        1024, layer_pattern(48, 6), f"{_GEMMA3_CONVERT}['gemma3_12b'] (context: Gemma3TextConfig's default 131,072)",
    ),
    Architecture(
        _arch("Gemma-3-27B", 5376, 62, 32, 16, 131072, 262144, head_dim=128), None, "Gemma 3 (5 local : 1 global)",
        1024, layer_pattern(62, 6), f"{_GEMMA3_CONVERT}['gemma3_27b'] (context: Gemma3TextConfig's default 131,072)",
    ),
)
# fmt: on

# Which runtimes allocate a sliding layer's cache for the window only (what the windowed columns assume), and how;
# each line says where that is read. Nothing else is claimed here.
SLIDING_RUNTIMES: tuple[dict[str, str], ...] = (
    {
        "runtime": "Hugging Face transformers (installed version), DynamicCache",
        "what it holds on a sliding layer": "the last sliding_window - 1 tokens (DynamicSlidingWindowLayer), chosen "
        "per layer from config.layer_types (Gemma 2/3) or, without layer_types, for every layer of a config with a "
        "sliding_window (Mistral)",
        "source": "transformers/cache_utils.py: DynamicSlidingWindowLayer.update, get_layer_types_and_kwargs",
    },
    {
        "runtime": "Hugging Face transformers (installed version), StaticCache",
        "what it holds on a sliding layer": "min(sliding_window, max_cache_len) preallocated slots "
        "(StaticSlidingWindowLayer)",
        "source": "transformers/cache_utils.py: StaticSlidingWindowLayer.__init__",
    },
    {
        "runtime": "vLLM (v1 engine)",
        "what it holds on a sliding layer": "paged blocks; a sliding-window layer group's manager frees the blocks "
        "that fall wholly before the window (so it holds the window rounded up to whole blocks)",
        "source": "vllm-project/vllm, vllm/v1/core/single_type_kv_cache_manager.py: SlidingWindowManager."
        "remove_skipped_blocks",
    },
    {
        "runtime": "llama.cpp",
        "what it holds on a sliding layer": "a separate SWA cache of min(context, n_swa x sequences + n_ubatch) "
        "cells padded to 256, for architectures whose loader sets a SWA pattern (Gemma 2: set_swa_pattern(2), "
        "Gemma 3: set_swa_pattern(6)); --swa-full gives the SWA layers the whole context instead",
        "source": "ggml-org/llama.cpp, src/llama-kv-cache-iswa.cpp (llama_kv_cache_iswa constructor); "
        "src/llama-model.cpp (hparams of LLM_ARCH_GEMMA2 / LLM_ARCH_GEMMA3)",
    },
)


def kv_bytes_table(
    bytes_per_element: int,
    architectures: tuple[Architecture, ...] = PUBLISHED,
    context_tokens: int | None = None,
) -> pd.DataFrame:
    """KV-cache bytes of each architecture at the given element size, one row per architecture.

    `kv_bytes_per_token` is what one token adds to a full cache (every layer keeps every token). At a context of
    `context_tokens` tokens (capped at each model's own context length; None: that length), the windowed columns
    count each layer type apart, as a cache that keeps only the window on a sliding layer holds it:

        global layers:  n_global x 2 x n_kv_head x head_dim x bytes x context
        sliding layers: n_sliding x 2 x n_kv_head x head_dim x bytes x min(context, window)

    (batch 1). `windowed_over_full` is their sum over the full cache's bytes at that context (1 without sliding
    layers). Raises KvlibError on a bad argument.
    """
    where = "kv_bytes_table:"
    checks.whole("bytes_per_element", bytes_per_element, where=where)
    if not isinstance(architectures, (tuple, list)) or not all(isinstance(a, Architecture) for a in architectures):
        what = "a sequence of kvlib.study.costs.Architecture"
        raise checks.fail("architectures", architectures, what, where)
    if context_tokens is not None:
        checks.whole("context_tokens", context_tokens, where=where)
    rows = []
    for a in architectures:
        c = a.cfg
        per_token = c.kv_bytes_per_token(bytes_per_element)
        per_layer_token = 2 * c.n_kv_head * c.head_dim * bytes_per_element  # K and V of one token on one layer
        context = c.n_positions if context_tokens is None else min(context_tokens, c.n_positions)
        windows = a.windows()
        sliding = [w for w in windows if w is not None]
        n_global = len(windows) - len(sliding)
        global_bytes = n_global * per_layer_token * context
        sliding_bytes = sum(per_layer_token * min(context, w) for w in sliding)
        full_bytes = per_token * context
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
                "sliding_window": a.sliding_window if sliding else 0,
                "n_sliding_layers": len(sliding),
                "n_global_layers": n_global,
                "context_tokens": context,
                "kv_bytes_global_layers": global_bytes,
                "kv_bytes_sliding_layers": sliding_bytes,
                "kv_bytes_windowed": global_bytes + sliding_bytes,
                "kv_bytes_full_cache": full_bytes,
                "windowed_over_full": (global_bytes + sliding_bytes) / full_bytes,
                "source": "computed from published config",
                "config_source": a.config_source,
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


def max_context_tokens_windowed(
    budget_bytes: float,
    weight_bytes: float,
    kv_bytes_per_token_layer: float,
    n_global: int,
    n_sliding: int,
    window: int,
    batch_size: int = 1,
    context_limit: int | None = None,
) -> int:
    """The most tokens per sequence whose windowed KV cache fits in what the budget leaves after the weights:
    bytes(T) = batch x kv_bytes_per_token_layer x (n_global x T + n_sliding x min(T, window)). Without global
    layers the cache stops growing at the window, so memory never limits a longer context: the answer is then
    `context_limit` (or 2^62 without one) when the window fits, 0 otherwise."""
    where = "max_context_tokens_windowed:"
    checks.number("budget_bytes", budget_bytes, minimum=0, where=where)
    checks.number("weight_bytes", weight_bytes, minimum=0, where=where)
    checks.number("kv_bytes_per_token_layer", kv_bytes_per_token_layer, minimum=0, above=True, where=where)
    checks.whole("n_global", n_global, minimum=0, where=where)
    checks.whole("n_sliding", n_sliding, minimum=0, where=where)
    checks.whole("window", window, where=where)
    checks.whole("batch_size", batch_size, where=where)
    if n_global + n_sliding == 0:
        raise KvlibError(f"{where} n_global + n_sliding must be at least 1")
    free = (budget_bytes - weight_bytes) / (batch_size * kv_bytes_per_token_layer)  # token-layer slots that fit
    if free <= 0:
        return 0
    within = int(free // (n_global + n_sliding))  # every layer still holds every token
    if within <= window or n_sliding == 0:
        return within
    if n_global == 0:
        return 2**62 if context_limit is None else int(context_limit)
    return int((free - n_sliding * window) // n_global)


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
    `limited_by` whether memory or the model's context length comes first. An architecture with sliding-window
    layers gets a second row, "<name> (windowed cache)", for a cache that keeps only the window on those layers
    (`max_context_tokens_windowed`).
    """
    where = "context_budget:"
    batch_sizes = checks.whole_list("batch_sizes", batch_sizes, where=where)
    checks.number("budget_bytes", budget_bytes, minimum=0, where=where)
    checks.number("weight_bytes", weight_bytes, minimum=0, where=where)
    checks.number("kv_bytes_per_token", kv_bytes_per_token, minimum=0, above=True, where=where)
    checks.whole("context_limit", context_limit, where=where)
    if architectures is not None and not isinstance(architectures, pd.DataFrame):
        raise checks.fail("architectures", architectures, "None or a DataFrame from kv_bytes_table", where)
    entries = [(model, True, weight_bytes, kv_bytes_per_token, context_limit, None)]
    if architectures is not None:
        for _, a in architectures[architectures["params"].notna()].iterrows():
            bpe, name = a["bytes_per_element"], a["architecture"]
            entries.append((name, False, a["params"] * bpe, a["kv_bytes_per_token"], a["context_len"], None))
            if a.get("n_sliding_layers", 0):  # also with only the window cached on its sliding layers
                entries.append((f"{name} (windowed cache)", False, a["params"] * bpe, a["kv_bytes_per_token"],
                                a["context_len"], a))  # fmt: skip
    rows = []
    for name, measured, weights, per_token, limit, windowed in entries:
        for b in batch_sizes:
            if windowed is None:
                tokens = max_context_tokens(budget_bytes, weights, per_token, b)
            else:
                tokens = max_context_tokens_windowed(
                    budget_bytes, weights, per_token / windowed["n_layer"], int(windowed["n_global_layers"]),
                    int(windowed["n_sliding_layers"]), int(windowed["sliding_window"]), b, limit,
                )  # fmt: skip
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


def require_sliding_layers(cfg: ModelConfig, name: str = "hybrid_model") -> ModelConfig:
    """`cfg`, if it has sliding-window layers (Gemma 3); else a one-line KvlibError naming the parameter."""
    checks.config(name, cfg, where="parameter")
    if not cfg.is_hybrid:
        hybrid = [n for n, c in PRESETS.items() if c.is_hybrid]
        raise KvlibError(
            f"parameter {name}: {cfg.name} has no sliding-window layers; choose a model trained with them "
            f"({', '.join(hybrid)})"
        )
    return cfg


def hybrid_cache_bytes(
    cfg: ModelConfig, tokens: list[int], batch_size: int = 1, dtype: torch.dtype | str = "float32"
) -> pd.DataFrame:
    """Computed, not measured: the KV bytes after each number of tokens of a full cache of `cfg`'s shape ("static":
    every layer keeps every token) and of the hybrid layout (a sliding layer keeps min(tokens, window)), split by
    layer type. One row per (tokens, layout); `ratio_to_full` is the layout's bytes over the full cache's."""
    where = "hybrid_cache_bytes:"
    checks.config("cfg", cfg, where=where)
    tokens = checks.whole_list("tokens", tokens, where=where)
    checks.whole("batch_size", batch_size, where=where)
    per_slot = 2 * batch_size * cfg.n_kv_head * cfg.head_dim * bytes_per_element(dtype)  # K and V, one layer
    sliding = [cfg.window_of(layer) is not None for layer in range(cfg.n_layer)]
    rows = []
    for t in tokens:
        full = per_slot * t * cfg.n_layer
        for layout in (REFERENCE, "hybrid"):
            slots = layer_slots(cfg, t, layout)
            on_sliding = per_slot * sum(n for n, s in zip(slots, sliding, strict=True) if s)
            on_full = per_slot * sum(n for n, s in zip(slots, sliding, strict=True) if not s)
            rows.append(
                {
                    "model": cfg.name,
                    "layout": layout,
                    "batch_size": batch_size,
                    "tokens": t,
                    "kv_bytes": on_sliding + on_full,
                    "kv_mib": (on_sliding + on_full) / 2**20,
                    "bytes_sliding_layers": on_sliding,
                    "bytes_full_layers": on_full,
                    "ratio_to_full": (on_sliding + on_full) / full if full else 1.0,
                    "sliding_window": cfg.sliding_window,
                    "n_sliding_layers": sum(sliding),
                    "source": "computed: kvlib.measure.memory.kv_cache_bytes_formula",
                }
            )
    return pd.DataFrame(rows)


# ---- measured: bytes the caches actually hold -----------------------------------------------------------------


def measured_cache_bytes(
    lm: Any, layouts: list[str], batch_sizes: list[int], seq_lens: list[int], seed: int = 0
) -> pd.DataFrame:
    """Fill a cache of each layout with a real prefill of B x T tokens; count the bytes its tensors hold and
    compare with the formula 2 x layers x B x T x kv heads x head_dim x bytes, summed per layer (the hybrid layout
    of a model with sliding layers keeps min(T, window) on those: kvlib.measure.memory.kv_cache_bytes_formula).
    One row per (layout, B, T)."""
    where = "measured_cache_bytes:"
    layouts = checks.name_list("layouts", layouts, where=where)
    for layout in layouts:
        check_layout(layout)
    batch_sizes = checks.whole_list("batch_sizes", batch_sizes, where=where)
    seq_lens = checks.whole_list("seq_lens", seq_lens, where=where)
    checks.seed("seed", seed, where=where)
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
                formula = kv_cache_bytes_formula(lm.cfg, batch, tokens, lm.dtype, layout)  # per layer type
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
    ids = synthetic_prompts(lm.cfg.vocab_size, batch_size, prompt_len, seed, lm.device)
    prepare_for_inference(lm.model, batch_size)  # the fast path's kernel measurement borrows memory: not in the peak
    with PeakTracker(lm.device) as tracker:
        g = generate(lm.model, ids, new_tokens, cache=layout)
    peak = tracker.result

    weights, packed = lm.model.weight_bytes(), packed_bytes(lm.model)
    cache = held_cache_bytes(g.cache)
    parts = {
        "weights": weights,
        "packed weight copy": packed,  # the CPU fast path's packed copy of the same weights (0 when unused)
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
