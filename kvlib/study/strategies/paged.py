"""The paged cache measured: reserved vs used memory on mixed-length batches, and decode latency."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from kvlib.caches.base import KVCache, layout_options, make_cache
from kvlib.caches.paged import PagedCache
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decode import check_lengths, decode_step, prefill, prepare_positions
from kvlib.models.decoders import Decoder
from kvlib.models.prompts import left_padded_prompts, synthetic_prompts
from kvlib.study.strategies.common import (
    Variant,
    bytes_per_token,
    check_sizes,
    generate_fn,
    held_bytes,
    interleaved_runs,
    timing_summary,
)


def mixed_batch(
    batch_size: int, max_prompt_len: int, max_new_tokens: int, spread: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Prompt and output lengths for a batch: uniform integers in [max(1, round((1 - spread) x max)), max].
    spread 0 gives every sequence the maximum lengths; spread 1 draws them from 1..max."""
    where = "mixed_batch:"
    check_sizes(where, batch_size=batch_size, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, seed=seed)
    spread = checks.fraction("spread", spread, where=where)
    gen = torch.Generator().manual_seed(seed)

    def draw(hi: int) -> list[int]:
        lo = max(1, round((1 - spread) * hi))
        return torch.randint(lo, hi + 1, (batch_size,), generator=gen).tolist()

    return draw(max_prompt_len), draw(max_new_tokens)


@dataclass(frozen=True)
class Arm:
    """One arm of the mixed-batch experiment: the layout it runs, whether a finished sequence's slots are released at
    once (KVCache.release), and whether the cache is sized to the model's whole context instead of the batch's run."""

    layout: str
    release_early: bool = False
    whole_context: bool = False


MIXED_ARMS: dict[str, Arm] = {
    "static": Arm("static"),
    "static_context": Arm("static", whole_context=True),
    "dynamic": Arm("dynamic"),
    "paged": Arm("paged", release_early=True),
    "paged_keep": Arm("paged"),
}
MIXED_LAYOUTS = tuple(MIXED_ARMS)  # the arms' names, as the experiment's tables name them


@dataclass
class MixedRun:
    steps: pd.DataFrame  # one row per decode step (step 0 = prefill)
    tokens: torch.Tensor  # (B, max(new_tokens)); row b is meaningful up to new_tokens[b]
    cache: KVCache


@torch.inference_mode()
def run_mixed_batch(
    model: Decoder,
    prompt_lens: Sequence[int],
    new_tokens: Sequence[int],
    layout: str,
    block_size: int = 16,
    seed: int = 0,
) -> MixedRun:
    """One static batch of sequences with their own prompt and output lengths, through `layout`:

    - "static": contiguous, preallocated to the batch's longest row (left-padded prompt + most new tokens);
    - "static_context": contiguous, preallocated to the model's context (a server that cannot know output lengths);
    - "dynamic": contiguous, grown by concatenation;
    - "paged": blocks for real tokens only (left padding mapped out), and a sequence's blocks are freed as soon as
      it has produced its last token;
    - "paged_keep": the same blocks, but kept until the batch ends (separates block granularity from early freeing).

    All rows run until the longest is done (kvlib batches statically), so a contiguous cache keeps every row
    to the end. After the prefill and after each decode step, a row records the bytes held for the batch
    (held_bytes) and the bytes of the tokens of sequences still generating (live_bytes).
    """
    where = "run_mixed_batch:"
    prompt_lens = checks.whole_list("prompt_lens", prompt_lens, where=where)
    new_tokens = checks.whole_list("new_tokens", new_tokens, where=where)
    if len(prompt_lens) != len(new_tokens):
        raise KvlibError(
            f"{where} prompt_lens and new_tokens must have one entry per sequence each, got {len(prompt_lens)} and "
            f"{len(new_tokens)}"
        )
    check_sizes(where, block_size=block_size, seed=seed)
    checks.one_of("layout", layout, MIXED_LAYOUTS, where=where)
    device = model.wte.weight.device
    ids, mask = left_padded_prompts(model.cfg.vocab_size, list(prompt_lens), seed, device)
    B, P = ids.shape
    N = max(new_tokens)
    check_lengths(model, P, N)
    positions, key_valid = prepare_positions(ids, mask, N)
    arm = MIXED_ARMS[layout]
    max_len = model.cfg.n_positions if arm.whole_context else P + N
    takes = layout_options(arm.layout)  # block-based layouts take the block size and map padding out
    options = {k: v for k, v in (("block_size", block_size), ("attention_mask", mask)) if k in takes}
    kv = make_cache(arm.layout, model.cfg, B, max_len, device, model.wte.weight.dtype, **options)
    bpt = bytes_per_token(model)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    rows = []

    def record(step: int) -> None:
        live = [b for b in range(B) if step < new_tokens[b]]
        live_tokens = sum(prompt_lens[b] + step for b in live)
        rows.append(
            {
                "layout": layout,
                "step": step,
                "live_sequences": len(live),
                "live_tokens": live_tokens,
                "held_bytes": held_bytes(kv),
                "live_bytes": live_tokens * bpt,
                "pool_bytes": kv.nbytes(),
            }
        )

    out[:, 0] = prefill(model, ids, positions, kv, key_valid).argmax(-1)
    record(0)
    for step in range(1, N):
        if arm.release_early:
            for b in range(B):
                if new_tokens[b] == step:  # its last token came out of the previous step
                    kv.release(b)
        out[:, step] = decode_step(model, out[:, step - 1 : step], P + step - 1, positions, kv, key_valid).argmax(-1)
        record(step)
    return MixedRun(pd.DataFrame(rows), out, kv)


def waste_pct(steps: pd.DataFrame) -> float:
    """100 x (1 - sum of live_bytes / sum of held_bytes) over the steps of a run: the share of held byte-steps
    that did not hold a token of a sequence still generating."""
    return 100.0 * (1 - steps["live_bytes"].sum() / steps["held_bytes"].sum())


def paged_waste(
    model: Decoder,
    batch_size: int = 8,
    max_prompt_len: int = 64,
    max_new_tokens: int = 32,
    spreads: Sequence[float] = (0.0, 0.5, 1.0),
    block_sizes: Sequence[int] = (16,),
    seed: int = 0,
) -> pd.DataFrame:
    """Reserved vs used KV memory on mixed batches (mixed_batch(spread)), per layout of run_mixed_batch.

    One row per (spread, layout, block_size): waste_pct (see waste_pct), peak and mean held / live bytes over the
    steps, pool_bytes (paged: the whole block pool), tokens_match_static (every sequence's tokens, up to its own
    length, equal those of the static layout). block_size applies to the paged layouts only.
    """
    spreads = checks.fraction_list("spreads", spreads, where="paged_waste:")
    block_sizes = checks.whole_list("block_sizes", block_sizes, where="paged_waste:")
    check_sizes("paged_waste:", batch_size=batch_size, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens)
    rows = []
    for spread in spreads:
        prompts, news = mixed_batch(batch_size, max_prompt_len, max_new_tokens, spread, seed)
        reference = None
        for layout in MIXED_LAYOUTS:
            for bs in block_sizes if layout.startswith("paged") else block_sizes[:1]:
                run = run_mixed_batch(model, prompts, news, layout, bs, seed)
                if reference is None:
                    reference = run.tokens
                match = all(torch.equal(run.tokens[b, :n], reference[b, :n]) for b, n in enumerate(news))
                s = run.steps
                rows.append(
                    {
                        "spread": spread,
                        "layout": layout,
                        "block_size": bs if layout.startswith("paged") else pd.NA,
                        "batch_size": batch_size,
                        "prompt_lens": ",".join(map(str, prompts)),
                        "new_tokens": ",".join(map(str, news)),
                        "steps": len(s),
                        "peak_held_bytes": int(s["held_bytes"].max()),
                        "peak_live_bytes": int(s["live_bytes"].max()),
                        "mean_held_bytes": float(s["held_bytes"].mean()),
                        "mean_live_bytes": float(s["live_bytes"].mean()),
                        "waste_pct": waste_pct(s),
                        "pool_bytes": int(s["pool_bytes"].max()),
                        "tokens_match_static": match,
                    }
                )
                if isinstance(run.cache, PagedCache):
                    run.cache.release_all()
    df = pd.DataFrame(rows)
    df["block_size"] = df["block_size"].astype("Int64")
    return df


def paged_latency(
    model: Decoder,
    batch_size: int = 4,
    prompt_len: int = 64,
    new_tokens: int = 32,
    block_sizes: Sequence[int] = (16,),
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Decode latency of the paged cache (its gather included) against static and dynamic, same prompts."""
    block_sizes = checks.whole_list("block_sizes", block_sizes, where="paged_latency:")
    check_sizes(
        "paged_latency:", batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
        warmup=warmup, seed=seed,
    )  # fmt: skip
    variants = {"static": ("static", {}), "dynamic": ("dynamic", {})}
    variants |= {f"paged (block {bs})": ("paged", {"block_size": bs}) for bs in block_sizes}
    return _timing_table(model, batch_size, prompt_len, new_tokens, variants, repeats, warmup, seed)


def _timing_table(
    model: Decoder,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    variants: Mapping[str, Variant],
    repeats: int,
    warmup: int,
    seed: int,
) -> pd.DataFrame:
    ids = synthetic_prompts(model.cfg.vocab_size, batch_size, prompt_len, seed, model.wte.weight.device)
    runs, last = interleaved_runs(
        {k: generate_fn(model, ids, new_tokens, v) for k, v in variants.items()}, repeats, warmup
    )
    df = timing_summary(runs)
    first = next(iter(last.values())).tokens
    df.insert(1, "cache", [variants[v][0] for v in df["variant"]])
    df["held_bytes"] = [held_bytes(last[v].cache) for v in df["variant"]]
    df["tokens_equal_reference"] = [bool(torch.equal(last[v].tokens, first)) for v in df["variant"]]  # first variant
    df["batch_size"], df["prompt_len"], df["new_tokens"] = batch_size, prompt_len, new_tokens
    return df
