"""Grouped-query and multi-query attention measured: the cache shrinks by exactly n_head / n_kv_head."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from kvlib.core import checks
from kvlib.models.loading import LoadedModel, load
from kvlib.models.prompts import synthetic_prompts
from kvlib.study.strategies.common import check_sizes, generate_fn, held_bytes, interleaved_runs, timing_summary


def default_kv_heads(n_head: int, n_kv_head: int | None = None) -> list[int]:
    """n_head (multi-head), n_head / 3 (grouped; n_head / 2 when 3 does not divide it) and 1 (multi-query); with
    `n_kv_head` (a model's own, e.g. SmolLM2's 3 of 9), that instead of n_head / 3."""
    n_head = checks.whole("n_head", n_head, where="default_kv_heads:")
    mid = n_head // 3 if n_head % 3 == 0 else n_head // 2
    if n_kv_head is not None:
        mid = checks.whole("n_kv_head", n_kv_head, where="default_kv_heads:")
    return sorted({n_head, max(mid, 1), 1}, reverse=True)


def check_kv_heads(
    n_head: int, kv_heads: Sequence[int] | None, name: str = "kv_heads", where: str = ""
) -> list[int] | None:
    """None (then gqa_reduction uses default_kv_heads), or key/value head counts that each divide n_head."""
    n_head = checks.whole("n_head", n_head, where=where)
    kv_heads = checks.optional_whole_list(name, kv_heads, where=where)
    bad = [k for k in kv_heads or [] if n_head % k]
    if bad:
        allowed = f"None or whole numbers that divide n_head ({n_head}); {bad[0]} does not"
        raise checks.fail(name, kv_heads, allowed, where)
    return kv_heads


def gqa_reduction(
    model_name: str = "tiny",
    kv_heads: Sequence[int] | None = None,
    batch_size: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    base: LoadedModel | None = None,
) -> pd.DataFrame:
    """The same architecture with n_kv_head key/value heads (same width), through the static cache.

    `base`, when given, is the model already loaded (e.g. SmolLM2-135M with its pretrained weights and its own 3
    key/value heads for 9 query heads): it is measured as it is, and every other head count is built from its
    config with seeded random weights (no such pretrained model exists); without it, every model has random
    weights. kv_heads None: n_head, the base model's own count (else n_head / 3) and 1.

    One row per n_kv_head: weights (pretrained or random), held_bytes (the cache's tensors), formula_bytes
    (kv_bytes_per_token x batch x slots), reduction (held bytes of the multi-head model / held bytes here),
    expected_reduction (n_head / n_kv_head), reduction_exact (the two are equal), and timing. The models differ, so
    their tokens are not compared.
    """

    where = "gqa_reduction:"
    check_sizes(
        where, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
        seed=seed,
    )  # fmt: skip
    kv_heads = checks.optional_whole_list("kv_heads", kv_heads, where=where)
    if base is None:
        base = load(model_name, weights="random", device=device, dtype=dtype, seed=seed, with_hf=False)
    own = base.cfg.n_kv_head
    kv_heads = check_kv_heads(base.cfg.n_head, kv_heads, where=where) or default_kv_heads(
        base.cfg.n_head, own if own != base.cfg.n_head else None
    )
    models = {k: base if k == own else load(model_name, "random", device, dtype, seed, k, False) for k in kv_heads}
    ids = synthetic_prompts(base.cfg.vocab_size, batch_size, prompt_len, seed, base.device)  # the same for every model
    runs, last = interleaved_runs(
        {f"n_kv_head={k}": generate_fn(m.model, ids, new_tokens, ("static", {})) for k, m in models.items()},
        repeats,
        warmup,
    )
    timing = timing_summary(runs).set_index("variant")
    slots = prompt_len + new_tokens  # the static cache's preallocation
    element = base.model.wte.weight.element_size()
    mha = base.cfg.with_kv_heads(base.cfg.n_head).kv_bytes_per_token(element) * batch_size * slots
    rows = []
    for k, m in models.items():
        held = held_bytes(last[f"n_kv_head={k}"].cache)
        rows.append(
            {
                "model": m.cfg.name,
                "weights": m.weights,
                "n_head": m.cfg.n_head,
                "n_kv_head": k,
                "attention": "multi-head" if k == m.cfg.n_head else ("multi-query" if k == 1 else "grouped-query"),
                "held_bytes": held,
                "formula_bytes": m.cfg.kv_bytes_per_token(m.model.wte.weight.element_size()) * batch_size * slots,
                "bytes_per_token": held / (batch_size * slots),
                "reduction": mha / held,
                "expected_reduction": m.cfg.n_head / k,
                "reduction_exact": mha * k == held * m.cfg.n_head,
                **timing.loc[f"n_kv_head={k}"].to_dict(),
            }
        )
    return pd.DataFrame(rows)
