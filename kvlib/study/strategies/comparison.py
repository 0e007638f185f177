"""The comparison table of every layout on one workload, memory against length, and the window's flat memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from kvlib.caches.base import REFERENCE
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decode import generate
from kvlib.models.decoders import Decoder
from kvlib.models.prompts import prompts_for
from kvlib.study.strategies.common import (
    Variant,
    check_sizes,
    check_variants,
    error_vs_exact,
    finish,
    generate_fn,
    held_bytes,
    interleaved_runs,
    lossy_tokens,
    teacher_forced_logits,
    timing_summary,
    used_bytes,
)


def default_variants(block_size: int = 16, sink: int = 4, window: int = 64) -> dict[str, Variant]:
    check_sizes("default_variants:", block_size=block_size, sink=sink, window=window)
    return {
        "static": ("static", {}),
        "dynamic": ("dynamic", {}),
        f"paged (block {block_size})": ("paged", {"block_size": block_size}),
        "quantized int8": ("quantized", {"bits": 8}),
        "quantized int4": ("quantized", {"bits": 4}),
        "quantized int4, KIVI keys, 32-token fp tail": (
            "quantized",
            {"bits": 4, "key_axis": "channel", "residual_len": 32},
        ),
        f"window (sink {sink} + {window})": ("window", {"sink": sink, "window": window}),
    }


def comparison_table(
    model: Decoder,
    batch_size: int = 2,
    prompt_len: int = 64,
    new_tokens: int = 32,
    variants: Mapping[str, Variant] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> pd.DataFrame:
    """Every variant (label -> (layout, options)) on the same prompts, against the static cache ("static", which
    must be among them). One row per variant:

    variant, cache (layout), exact (what the layout claims), batch_size, prompt_len, new_tokens; held_bytes,
    used_bytes, bytes_per_token (held / tokens stored at the end: batch x (prompt + new - 1)),
    saving_vs_static_pct, waste_pct; stored_tokens (per sequence: prompt + new - 1) and lossy_tokens (of those,
    how many the layout quantized or evicted; 0 for exact layouts, and for a lossy one that lost nothing in this
    run); repeats, ttft_ms / tpot_ms with _min / _max; max_abs_logit_diff, rel_logit_diff, token_agreement_pct
    (agreeing_steps of compared_steps), tokens_equal, first_divergence_step (see the package docstring).
    Prompts: passages of the novel with `tokenizer` (a pretrained model's), else synthetic ids.
    """
    where = "comparison_table:"
    check_sizes(
        where, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
        seed=seed,
    )  # fmt: skip
    variants = check_variants(default_variants() if variants is None else variants, where)
    if variants.get(REFERENCE, (None,))[0] != REFERENCE:
        raise KvlibError(
            f'comparison_table needs the exact reference: a variant "{REFERENCE}" with layout "{REFERENCE}"'
        )
    device = model.wte.weight.device
    ids = prompts_for(model.cfg.vocab_size, tokenizer, batch_size, prompt_len, seed, device)  # text with a tokenizer
    exact = generate(model, ids, new_tokens, cache="static", keep_logits=True)
    runs, last = interleaved_runs(
        {k: generate_fn(model, ids, new_tokens, v) for k, v in variants.items()}, repeats, warmup
    )
    timing = timing_summary(runs).set_index("variant")
    stored = batch_size * (prompt_len + new_tokens - 1)  # tokens in the cache at the end: the last is never fed back
    static_held = held_bytes(last[REFERENCE].cache)
    rows = []
    for label, (cache, options) in variants.items():
        kv = last[label].cache
        held, used = held_bytes(kv), used_bytes(kv)
        forced = teacher_forced_logits(model, ids, exact.tokens, cache, options)
        rows.append(
            {
                "variant": label,
                "cache": cache,
                "exact": type(kv).exact,  # what the layout claims; tokens_equal is what was observed
                "batch_size": batch_size,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "held_bytes": held,
                "used_bytes": used,
                "bytes_per_token": held / stored,
                "saving_vs_static_pct": 100.0 * (1 - held / static_held),
                "waste_pct": 100.0 * (1 - used / held),
                "stored_tokens": prompt_len + new_tokens - 1,
                "lossy_tokens": lossy_tokens(kv),
                **timing.loc[label].to_dict(),
                **error_vs_exact(exact.step_logits, exact.tokens, forced, last[label].tokens),
            }
        )
    return finish(pd.DataFrame(rows))


def best_saving_at_equal_tokens(table: pd.DataFrame) -> pd.DataFrame:
    """The row of `table` (from comparison_table) with the largest saving_vs_static_pct among the variants other
    than "static" whose free-running tokens equalled the exact ones; empty when none did. A lossy variant that lost
    nothing in the run (lossy_tokens 0: nothing quantized or evicted) is not a candidate: its equal tokens say
    nothing about the layout."""
    ok = table[(table["variant"] != REFERENCE) & table["tokens_equal"]]
    if "lossy_tokens" in ok:
        ok = ok[ok["exact"] | (ok["lossy_tokens"] > 0)]
    if ok.empty:
        return ok
    best = ok.loc[[ok["saving_vs_static_pct"].idxmax()]]
    columns = ["variant", "cache", "exact", "held_bytes", "bytes_per_token", "saving_vs_static_pct", "tokens_equal"]
    return best[columns + [c for c in ("stored_tokens", "lossy_tokens") if c in best]]


def memory_by_length(
    model: Decoder,
    lengths: Sequence[int] = (32, 64, 128),
    prompt_len: int = 16,
    batch_size: int = 1,
    variants: Mapping[str, Variant] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Held and used bytes at the end of a run of total length prompt_len + new tokens, per variant and length.
    One row per (variant, total_tokens)."""
    where = "memory_by_length:"
    lengths = checks.whole_list("lengths", lengths, where=where)
    check_sizes(where, prompt_len=prompt_len, batch_size=batch_size, seed=seed)
    variants = check_variants(default_variants() if variants is None else variants, where)
    device = model.wte.weight.device
    ids = prompts_for(model.cfg.vocab_size, None, batch_size, prompt_len, seed, device)  # bytes only: synthetic ids
    rows = []
    for total in lengths:
        if total <= prompt_len:
            raise KvlibError(f"length {total} must exceed prompt_len {prompt_len}")
        for label, (cache, options) in variants.items():
            kv = generate(model, ids, total - prompt_len, cache=cache, cache_options=options).cache
            rows.append(
                {
                    "variant": label,
                    "cache": cache,
                    "total_tokens": total,
                    "held_bytes": held_bytes(kv),
                    "used_bytes": used_bytes(kv),
                    "bytes_per_token": held_bytes(kv) / (batch_size * (total - 1)),
                }
            )
    return pd.DataFrame(rows)


def window_memory(
    model: Decoder,
    lengths: Sequence[int] = (32, 64, 128),
    prompt_len: int = 16,
    sink: int = 4,
    window: int = 32,
    batch_size: int = 1,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> pd.DataFrame:
    """The sink + window cache against the static cache as the sequence grows: one row per (variant, length) with
    held_bytes, fits (total_tokens - 1 <= sink + window: nothing was evicted, so the layout was exact), and for the
    window its error against the static cache over that run (the static rows carry zeros by definition).
    Prompts: passages of the novel with `tokenizer` (a pretrained model's), else synthetic ids."""
    lengths = checks.whole_list("lengths", lengths, where="window_memory:")
    check_sizes("window_memory:", prompt_len=prompt_len, sink=sink, window=window, batch_size=batch_size, seed=seed)
    device = model.wte.weight.device
    ids = prompts_for(model.cfg.vocab_size, tokenizer, batch_size, prompt_len, seed, device)  # text with a tokenizer
    options = {"sink": sink, "window": window}
    rows = []
    for total in lengths:
        n = total - prompt_len
        if n < 1:
            raise KvlibError(f"length {total} must exceed prompt_len {prompt_len}")
        exact = generate(model, ids, n, cache="static", keep_logits=True)
        win = generate(model, ids, n, cache="window", cache_options=options)
        forced = teacher_forced_logits(model, ids, exact.tokens, "window", options)
        for label, g, err in (
            ("static", exact, error_vs_exact(exact.step_logits, exact.tokens, exact.step_logits, exact.tokens)),
            (
                f"window (sink {sink} + {window})",
                win,
                error_vs_exact(exact.step_logits, exact.tokens, forced, win.tokens),
            ),
        ):
            rows.append(
                {
                    "variant": label,
                    "cache": "static" if g is exact else "window",
                    "total_tokens": total,
                    "sink": sink,
                    "window": window,
                    # The last step attends over total - 1 slots: while they fit, nothing was evicted (exact).
                    "fits": total - 1 <= sink + window,
                    "held_bytes": held_bytes(g.cache),
                    **err,
                }
            )
    return finish(pd.DataFrame(rows))
