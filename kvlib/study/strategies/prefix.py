"""Prefix sharing measured: time to first token and memory, shared prefix against full prompts."""

from __future__ import annotations

import pandas as pd
import torch

from kvlib.decoding.prefix import generate_with_shared_prefix
from kvlib.models.decode import generate
from kvlib.models.decoders import Decoder
from kvlib.models.prompts import synthetic_prompts
from kvlib.study.strategies.common import check_sizes, held_bytes, interleaved_runs, timing_summary, used_bytes


def prefix_sharing(
    model: Decoder,
    batch_size: int = 4,
    prefix_len: int = 96,
    suffix_len: int = 8,
    new_tokens: int = 8,
    block_size: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Prompts sharing a prefix: prefilled in full for each prompt (static and paged caches) against the prefix
    prefilled once and shared (generate_with_shared_prefix). One row per variant: prefill_tokens (positions run
    through the model before the first token), held_bytes / used_bytes, ttft/tpot, tokens_equal (to the static
    cache on the full prompts: the sharing must not change a token)."""
    check_sizes(
        "prefix_sharing:", batch_size=batch_size, prefix_len=prefix_len, suffix_len=suffix_len, new_tokens=new_tokens,
        block_size=block_size, repeats=repeats, warmup=warmup, seed=seed,
    )  # fmt: skip
    device = model.wte.weight.device
    prefix = synthetic_prompts(model.cfg.vocab_size, 1, prefix_len, seed, device)
    suffix = synthetic_prompts(model.cfg.vocab_size, batch_size, suffix_len, seed + 1, device)
    full = torch.cat([prefix.expand(batch_size, prefix_len), suffix], dim=1)
    runs_fns = {
        "full prompts, static": lambda: generate(model, full, new_tokens, cache="static"),
        f"full prompts, paged (block {block_size})": lambda: generate(
            model, full, new_tokens, cache="paged", cache_options={"block_size": block_size}
        ),
        f"shared prefix, paged (block {block_size})": lambda: generate_with_shared_prefix(
            model, prefix, suffix, new_tokens, block_size
        ),
    }
    runs, last = interleaved_runs(runs_fns, repeats, warmup)
    timing = timing_summary(runs).set_index("variant")
    reference = last["full prompts, static"].tokens
    rows = []
    for label, g in last.items():
        shared = label.startswith("shared")
        rows.append(
            {
                "variant": label,
                "batch_size": batch_size,
                "prefix_len": prefix_len,
                "suffix_len": suffix_len,
                "prefill_tokens": prefix_len + batch_size * suffix_len if shared else batch_size * full.shape[1],
                "held_bytes": held_bytes(g.cache),
                "used_bytes": used_bytes(g.cache),
                **timing.loc[label].to_dict(),
                "tokens_equal": bool(torch.equal(g.tokens, reference)),
            }
        )
    return pd.DataFrame(rows)
