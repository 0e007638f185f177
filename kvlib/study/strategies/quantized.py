"""The quantized layouts measured: bytes and error against full precision, kvlib's and Hugging Face's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from kvlib.core import checks
from kvlib.models.decode import generate
from kvlib.models.decoders import Decoder
from kvlib.models.hf_quantized import (
    HF_BACKENDS,
    hf_backend_status,
    hf_cache_bytes,
    hf_greedy_loop,
    hf_quantized_tokens,
    make_hf_quantized_cache,
)
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
)


def default_quantized_variants() -> dict[str, Variant]:
    return {
        "int8 per-token": ("quantized", {"bits": 8}),
        "int8 per-token, 32-token fp tail": ("quantized", {"bits": 8, "residual_len": 32}),
        "int4 per-token": ("quantized", {"bits": 4}),
        "int4 KIVI (per-channel keys, 32-token groups)": (
            "quantized",
            {"bits": 4, "key_axis": "channel", "residual_len": 32},
        ),
    }


DEFAULT_HF_BACKENDS: tuple[tuple[str, int | None], ...] = (("quanto", 4), ("hqq", 4), ("hqq", 8), ("fp8", None))


def quantized_error(
    model: Decoder,
    batch_size: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 32,
    variants: Mapping[str, Variant] | None = None,
    hf_model: Any | None = None,
    hf_backends: Sequence[tuple[str, int | None]] = DEFAULT_HF_BACKENDS,
    hf_residual_len: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> pd.DataFrame:
    """kvlib's quantized layouts against its full-precision static cache, and (with `hf_model`, the same weights in
    transformers) HF's QuantizedCache backends against HF's own DynamicCache, all on the same prompts.

    One row per variant: engine, variant, status ("ok" or "unavailable: why"), reference (what its error and
    saving are measured against: the full-precision cache of the same engine), exact, bits (of the stored keys and
    values), held_bytes, bytes_per_token, saving_vs_full_pct (against the full-precision cache of the same engine
    and run), stored_tokens and quantized_tokens (per sequence at the end of the run: how many of the stored tokens
    were actually quantized; 0 when a full-precision tail held them all, and then the row measures full-precision
    storage, not quantization), ttft/tpot (kvlib: generate; HF: a greedy loop of forward calls, see
    kvlib.models.hf_quantized), and the error columns. HF's integer backends keep their last
    `hf_residual_len` tokens at full precision (transformers' default is 128) and quantize per channel in groups.
    Prompts: passages of the novel with `tokenizer` (a pretrained model's), else synthetic ids.
    """
    where = "quantized_error:"
    check_sizes(
        where, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, hf_residual_len=hf_residual_len,
        repeats=repeats, warmup=warmup, seed=seed,
    )  # fmt: skip
    hf_backends = check_hf_backends(hf_backends, where)
    device = model.wte.weight.device
    ids = prompts_for(model.cfg.vocab_size, tokenizer, batch_size, prompt_len, seed, device)  # text with a tokenizer
    stored = batch_size * (prompt_len + new_tokens - 1)
    variants = {"full precision (static)": ("static", {})} | check_variants(
        default_quantized_variants() if variants is None else variants, where
    )
    exact = generate(model, ids, new_tokens, cache="static", keep_logits=True)
    runs, last = interleaved_runs(
        {k: generate_fn(model, ids, new_tokens, v) for k, v in variants.items()}, repeats, warmup
    )
    timing = timing_summary(runs).set_index("variant")
    full = held_bytes(last["full precision (static)"].cache)
    rows = []
    for label, (cache, options) in variants.items():
        kv = last[label].cache
        forced = teacher_forced_logits(model, ids, exact.tokens, cache, options)
        rows.append(
            {
                "engine": "kvlib",
                "variant": label,
                "status": "ok",
                "reference": "full precision (static)",
                "exact": type(kv).exact,
                "bits": options.get("bits", 8 * model.wte.weight.element_size()),
                "held_bytes": held_bytes(kv),
                "bytes_per_token": held_bytes(kv) / stored,
                "saving_vs_full_pct": 100.0 * (1 - held_bytes(kv) / full),
                "stored_tokens": prompt_len + new_tokens - 1,
                "quantized_tokens": lossy_tokens(kv),
                **timing.loc[label].to_dict(),
                **error_vs_exact(exact.step_logits, exact.tokens, forced, last[label].tokens),
            }
        )
    rows += _hf_quantized_rows(hf_model, ids, new_tokens, hf_backends, hf_residual_len, repeats, warmup, stored)
    return finish(pd.DataFrame(rows))


def check_hf_backends(backends: Any, where: str) -> list[tuple[str, int | None]]:
    """A list of (backend, bits) pairs: backend one of HF_BACKENDS, bits None or a whole number >= 1."""
    allowed = f"a list of (backend, bits) pairs, backend one of {', '.join(HF_BACKENDS)} and bits None or >= 1"
    if isinstance(backends, (str, bytes)) or not isinstance(backends, Sequence):
        raise checks.fail("hf_backends", backends, allowed, where)
    for pair in backends:
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
        if not (ok and pair[0] in HF_BACKENDS and (pair[1] is None or (checks.is_whole(pair[1]) and pair[1] >= 1))):
            raise checks.fail("hf_backends", backends, allowed, where)
    return [(b, n) for b, n in backends]


def _hf_quantized_rows(
    hf_model: Any | None,
    ids: torch.Tensor,
    new_tokens: int,
    backends: Sequence[tuple[str, int | None]],
    residual_len: int,
    repeats: int,
    warmup: int,
    stored: int,
) -> list[dict]:
    from transformers.cache_utils import DynamicCache  # heavy: seconds to import

    labels = {(b, n): f"HF {b} int{n}, {residual_len}-token fp tail" if n else f"HF {b}" for b, n in backends}
    status = {key: hf_backend_status(hf_model, *key) for key in backends}
    rows = [
        {"engine": "hf", "variant": labels[key], "status": why, "reference": None, "exact": False, "bits": key[1]}
        for key, why in status.items()
        if why != "ok"
    ]
    usable = [key for key, why in status.items() if why == "ok"]
    if hf_model is None or not usable:
        return rows
    reference = "HF dynamic (full precision)"
    makers = {reference: lambda: DynamicCache(config=hf_model.config)}
    for key in usable:
        makers[labels[key]] = lambda key=key: make_hf_quantized_cache(hf_model, key[0], key[1], residual_len)
    exact = hf_greedy_loop(hf_model, ids, new_tokens, makers[reference], keep_logits=True)
    runs, last = interleaved_runs(
        {k: (lambda m=m: hf_greedy_loop(hf_model, ids, new_tokens, m)) for k, m in makers.items()}, repeats, warmup
    )
    timing = timing_summary(runs).set_index("variant")
    full = hf_cache_bytes(last[reference].cache)
    element_bits = 8 * hf_model.get_input_embeddings().weight.element_size()
    for label, maker in makers.items():
        held = hf_cache_bytes(last[label].cache)
        forced = hf_greedy_loop(hf_model, ids, new_tokens, maker, forced_tokens=exact.tokens, keep_logits=True)
        key = next((k for k in usable if labels[k] == label), None)
        rows.append(
            {
                "engine": "hf",
                "variant": label,
                "status": "ok",
                "reference": reference,
                "exact": key is None,
                "bits": element_bits if key is None else (key[1] or 8),  # fp8 stores 8 bits
                "held_bytes": held,
                "bytes_per_token": held / stored,
                "saving_vs_full_pct": 100.0 * (1 - held / full),
                "stored_tokens": ids.shape[1] + new_tokens - 1,
                "quantized_tokens": hf_quantized_tokens(last[label].cache),
                **timing.loc[label].to_dict(),
                **error_vs_exact(exact.step_logits, exact.tokens, forced.step_logits, last[label].tokens),
            }
        )
    return rows
