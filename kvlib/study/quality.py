"""What each lossy cache costs in quality, on real text, measured: StreamingLLM and KIVI in miniature.

Notebook 08's measurements (its page, which turns these frames into tables, figures, sentences and headline rows, is
kvlib.study.quality_page): the text every perplexity reads, the variants (cache, options) of each comparison, and
their perplexity, bytes, decode latency and greedy text. Every perplexity here comes from kvlib.measure.perplexity
(the "fast" one-pass method by default, proven equal to teacher forcing through the cache itself by
tests/test_perplexity.py; sliding window with re-computation batches its windows, proven equal to one pass per
window). Decode latency is timed as notebook 7 times it (kvlib.study.strategies.common). Tidy frames: one row per
variant. The papers' numbers are in REFERENCES and QUANT_REFERENCES (kvlib/data/published.yaml, each with where it
comes from); they are theirs, never ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from kvlib.caches.base import CACHE_LAYOUTS, evicts, layout_class
from kvlib.measure.perplexity import (
    HF_QUANTIZED,
    HF_QUANTIZED_DEFAULTS,
    perplexity,
    perplexity_hf,
    perplexity_hf_quantized,
    read_text,
    recompute_nll,
    recompute_targets,
    text_token_ids,
)
from kvlib.models.decode import generate
from kvlib.models.hf_quantized import hf_backend_status, hf_greedy_loop, make_hf_quantized_cache
from kvlib.models.prompts import prompts_for, synthetic_prompts, text_prompts
from kvlib.study import published
from kvlib.study.strategies.common import generate_fn, interleaved_runs, timing_summary

# The published figures put beside ours (marked as theirs wherever shown), from kvlib/data/published.yaml
REFERENCES = published.streaming_llm()
# StreamingLLM's effect counts as reproduced (in direction) when window only is at least this many times the
# perplexity of the best sink count at the same budget (the notebook's sentence and the report's finding).
SINK_EFFECT = 1.1
QUANT_REFERENCES = published.quantization()  # (reference, effective bits per stored element, perplexity change %)
FULL = "full (static)"  # the full cache's label (variant_label of the static layout): every comparison's baseline
RECOMPUTE = "re-computation"  # the sliding window with re-computation's row (recompute_comparison)
HF_FULL = "hf full (dynamic)"  # Hugging Face's full-precision cache in the latency table (decode_latency)
Variant = tuple[str, dict[str, Any]]  # (cache layout, its options), or (HF_QUANTIZED, options)


@dataclass(frozen=True)
class Text:
    """The token ids every perplexity of the page reads, (1, tokens) on the model's device; what they are; and
    whether a perplexity of them means anything (pretrained weights with a tokenizer: the study's novel)."""

    ids: torch.Tensor
    name: str
    meaningful: bool


def load_text(lm: Any, vocab_size: int, tokens: int, seed: int) -> Text:
    """The first `tokens` tokens of the study's text for a pretrained model with a tokenizer; seeded synthetic ids
    (named as meaningless) otherwise."""
    if lm.tokenizer is not None and lm.weights == "pretrained":
        text, text_name = read_text(None)
        return Text(text_token_ids(lm.tokenizer, text, tokens, text_name).to(lm.device), text_name, True)
    text_name = "synthetic token ids (random weights: every perplexity below is MEANINGLESS)"
    return Text(synthetic_prompts(vocab_size, 1, tokens, seed, lm.device), text_name, False)


def variant_label(cache: str, options: dict[str, Any]) -> str:
    """A short name for a cache and its options: the layout's own label ("window 4+252", "int4 kivi r32 g32",
    KVCache.label), or Hugging Face's quantized cache's ("hf quanto int4 r128")."""
    if cache == HF_QUANTIZED:
        o = {**HF_QUANTIZED_DEFAULTS, **options}
        return f"hf quanto int{o['bits']} r{o['residual_len']}"
    return layout_class(cache).label(options)


def full_bytes_per_token(cfg: Any, dtype: torch.dtype) -> int:
    """Bytes a full-precision cache holds per token (keys and values of every layer) for elements of `dtype`."""
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
        nlls[label] = r.nll.cpu()  # (N - 1,) float64, on the host for pandas
        rows.append(
            {
                "variant": label,
                "cache": cache,
                **{k: options.get(k) for k in ("sink", "window", "bits", "key_axis", "residual_len")},
                "positions": layout_class(cache).option(options, "positions") if cache in CACHE_LAYOUTS else None,
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


def streaming_variants(budgets: list[int], sinks: list[int], cache_positions_sink: int | None = 4) -> list[Variant]:
    """Full cache first, then for each budget: window only and each sink count (sink + window = budget); and, at the
    largest budget, `cache_positions_sink` sinks with StreamingLLM's positions counted within the cache."""
    out: list[Variant] = [("static", {})]
    for b in budgets:
        for s in sinks:
            out.append(("window", {"sink": s, "window": b - s}))
        if cache_positions_sink and b == max(budgets):
            out.append(
                ("window", {"sink": cache_positions_sink, "window": b - cache_positions_sink, "positions": "cache"})
            )
    return out


def streaming(
    model: Any, ids: torch.Tensor, budgets: list[int], sinks: list[int], method: str = "fast"
) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """run_variants over streaming_variants: the full cache, then every (budget, sinks) window; the table gains
    `budget` (tokens kept: sink + window; blank for the full cache)."""
    stream, nll = run_variants(model, ids, streaming_variants(budgets, sinks), method)
    stream["budget"] = (stream["sink"].fillna(0) + stream["window"]).where(stream["cache"].map(evicts))
    return stream, nll


def same_budget(budget: int, sinks: list[int]) -> list[str]:
    """Labels of the full cache and of every sink count's window at `budget` (sink + window = budget): the rows
    compared at one budget (rolling perplexity, re-computation)."""
    return [FULL] + [variant_label("window", {"sink": s, "window": budget - s}) for s in sinks]


def quantized_variants(kivi_group: int, residuals: list[int]) -> list[Variant]:
    """Full cache first; int8 and int4 per token; KIVI int4 and int2 (keys per channel, values per token in groups
    of `kivi_group` channels) with each full-precision residual."""
    out: list[Variant] = [("static", {}), ("quantized", {"bits": 8}), ("quantized", {"bits": 4})]
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


def recompute_comparison(
    model: Any,
    ids: torch.Tensor,
    budgets: list[int],
    every: int,
    nlls: dict[str, torch.Tensor],
    compare: Callable[[int], list[str]],
    method: str = "fast",
) -> pd.DataFrame:
    """StreamingLLM's "sliding window with re-computation" baseline at each budget W: every `every`-th scored token
    past W (before it, re-computation is the full cache) is scored given only the last W tokens re-run from scratch
    (kvlib.measure.perplexity.recompute_nll); the variants `compare(W)` names (labels of `nlls`, the per-token NLL
    of run_variants) are scored on the same tokens. Tidy: budget,
    variant, perplexity, tokens_scored, every, first_token, time_s (of re-computation)."""
    N = ids.shape[1]
    rows = []
    for W in budgets:
        targets = recompute_targets(N, W, every)
        if not len(targets):
            continue
        t0 = time.perf_counter()
        nll = recompute_nll(model, ids, W, targets, method)
        took = time.perf_counter() - t0
        common = {"budget": W, "tokens_scored": len(targets), "every": every, "first_token": int(targets[0])}
        rows.append({**common, "variant": RECOMPUTE, "perplexity": math.exp(float(nll.mean())),
                     "time_s": took})  # fmt: skip
        for name in compare(W):
            if name in nlls:
                ppl = math.exp(float(nlls[name][targets - 1].mean()))
                rows.append({**common, "variant": name, "perplexity": ppl, "time_s": float("nan")})
    return pd.DataFrame(rows)


def decode_latency(
    lm: Any,
    variants: list[tuple[str, dict[str, Any]]],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    hf_bits: list[int],
    hf_residual: int,
    warmup: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Decode latency (TPOT) of each kvlib layout (cache, options) and of Hugging Face's full cache and quanto
    QuantizedCache (`hf_bits`, residual `hf_residual`) on one prompt of `prompt_len` tokens (a passage of the novel
    for a pretrained model), `new_tokens` greedy tokens: notebook 07's timing (kvlib.study.strategies.common:
    `warmup` unrecorded runs, then `repeats` interleaved rounds; TPOT = the median decode step of a run; its median
    over repeats with min and max). One row per variant: variant, engine, status, tpot_ms (_min, _max), ttft_ms,
    repeats, tpot_vs_full (TPOT / the same engine's full-precision cache's), cache (kvlib's layout; blank for HF)."""
    ids = prompts_for(lm.cfg.vocab_size, lm.tokenizer, 1, prompt_len, seed, lm.device)
    runs, engine, status, layout = {}, {}, {}, {}
    for cache, options in variants:
        label = variant_label(cache, options)
        runs[label], engine[label] = generate_fn(lm.model, ids, new_tokens, (cache, options)), "kvlib"
        layout[label] = cache
    if lm.hf is not None:
        from transformers.cache_utils import DynamicCache  # heavy: seconds to import

        makers = {HF_FULL: lambda: DynamicCache(config=lm.hf.config)}
        for bits in hf_bits:
            label = variant_label(HF_QUANTIZED, {"bits": bits, "residual_len": hf_residual})
            status[label] = hf_backend_status(lm.hf, "quanto", bits)
            if status[label] == "ok":
                makers[label] = lambda bits=bits: make_hf_quantized_cache(lm.hf, "quanto", bits, hf_residual)
        for label, make in makers.items():
            runs[label] = lambda make=make: hf_greedy_loop(lm.hf, ids, new_tokens, make)
            engine[label] = "hf"
    timing = timing_summary(interleaved_runs(runs, repeats, warmup)[0])
    timing["engine"] = timing["variant"].map(engine)
    timing["cache"] = timing["variant"].map(layout)
    timing["status"] = "ok"
    full = {"kvlib": variant_label(*variants[0]), "hf": HF_FULL}
    base = timing.set_index("variant")["tpot_ms"]
    timing["tpot_vs_full"] = [r.tpot_ms / base.get(full[r.engine], math.nan) for r in timing.itertuples()]
    missing = [{"variant": k, "engine": "hf", "status": v} for k, v in status.items() if v != "ok"]
    out = pd.concat([timing, pd.DataFrame(missing)], ignore_index=True) if missing else timing
    out["prompt_len"], out["new_tokens"] = prompt_len, new_tokens
    return out


def cost_table(quant: pd.DataFrame, hf_rows: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """Perplexity change, bytes per token and decode latency side by side, one row per quantized variant (kvlib's
    from the `quant` table, Hugging Face's from `hf_rows`, each against its own engine's full-precision cache)."""
    cols = ["variant", "bytes_per_token", "ppl_change_pct", "tokens"]
    ours = quant[cols].assign(engine="kvlib")
    theirs = hf_rows[hf_rows["variant"] != "hf full (no cache)"] if len(hf_rows) else hf_rows
    hf = theirs.reindex(columns=cols).assign(engine="hf") if len(theirs) else None
    both = pd.concat([ours, hf], ignore_index=True) if hf is not None else ours
    lat = latency[~latency["cache"].map(evicts)]  # the quantized caches' costs: evicting layouts are timed too
    lat = lat[["variant", "engine", "tpot_ms", "tpot_ms_min", "tpot_ms_max", "tpot_vs_full", "repeats"]]
    table = lat.merge(both.drop(columns="engine"), on="variant", how="left")  # latency's order: kvlib, then HF
    return table.rename(columns={"tokens": "ppl_tokens"})


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


def greedy_variants(sink: int, window: int, kivi_group: int, residuals: list[int]) -> list[Variant]:
    """The layouts of the greedy comparison: `sink` sinks + `window` recent, the window alone of the same size, and
    every quantized variant of quantized_variants (the first residual only)."""
    return [("window", {"sink": sink, "window": window}), ("window", {"sink": 0, "window": sink + window})] + [
        v for v in quantized_variants(kivi_group, residuals[:1])[1:]
    ]


def greedy_prompts(lm: Any, vocab_size: int, prompts: int, prompt_len: int, seed: int) -> torch.Tensor:
    """(prompts, prompt_len) ids on the model's device: passages of the novel with a tokenizer, seeded synthetic ids
    otherwise."""
    if lm.tokenizer is not None:
        return torch.stack(text_prompts(lm.tokenizer, [prompt_len] * prompts, seed, lm.device))
    return synthetic_prompts(vocab_size, prompts, prompt_len, seed, lm.device)


def greedy_divergence(
    model: Any, prompts: torch.Tensor, new_tokens: int, variants: list[tuple[str, dict[str, Any]]], tokenizer: Any
) -> pd.DataFrame:
    """Greedy continuation of each prompt (B, P) under each layout, and the first step where it leaves the
    full-precision (static) continuation (None: never, within new_tokens)."""
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
