"""Prefix sharing: a batch of prompts that begin with the same prefix prefills that prefix once (batch 1), then
every sequence continues from it, its block table pointing at the prefix's blocks (no copy; a partly filled last
block is copied when a sequence first writes into it). This is vLLM's prefix caching on kvlib's paged cache.

Why a function and not a layout for `generate`: the saving happens before a cache sees any key (the prefix's
forward pass must run once instead of once per prompt), which only the driver of the forward passes can
arrange; `generate` runs the whole prompt batch in one call.

Suffixes must all have the same length: a batch of different suffix lengths would need padding in the middle of
each prompt, which the left-padding scheme of `kvlib.models.decode` does not express.
"""

from __future__ import annotations

import math

import torch

from kvlib.caches.paged import BlockPool, PagedCache
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decode import Clock, Generation, check_lengths, decode_loop, greedy
from kvlib.models.decoders import Decoder


@torch.inference_mode()
def generate_with_shared_prefix(
    model: Decoder,
    prefix_ids: torch.Tensor,
    suffix_ids: torch.Tensor,
    max_new_tokens: int,
    block_size: int = 16,
    keep_logits: bool = False,
) -> Generation:
    """Greedy decoding of exactly `max_new_tokens` tokens for prompts prefix + suffix[b].

    prefix_ids: (P_prefix,) or (1, P_prefix); suffix_ids: (B, P_suffix), P_suffix >= 1. Returns a Generation whose
    prefill_s covers both prefills (prefix once, then the suffixes over it) and the choice of the first token, and
    whose cache is the batch's PagedCache (shared blocks counted once by its allocated_bytes()).
    """
    block_size = checks.whole("block_size", block_size, where="shared prefix:")
    for name, ids in (("prefix_ids", prefix_ids), ("suffix_ids", suffix_ids)):
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise checks.fail(name, ids, "a tensor of token ids", "shared prefix:")
    if prefix_ids.dim() == 1:
        prefix_ids = prefix_ids[None]
    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or suffix_ids.dim() != 2:
        raise KvlibError(
            f"shared prefix: prefix_ids must be (P,) or (1, P) and suffix_ids (B, S), got "
            f"{tuple(prefix_ids.shape)} and {tuple(suffix_ids.shape)}"
        )
    B, S = suffix_ids.shape
    Pp = prefix_ids.shape[1]
    if Pp < 1 or S < 1:
        raise KvlibError(f"shared prefix: prefix and suffix need >= 1 token each, got {Pp} and {S}")
    P = Pp + S
    check_lengths(model, P, max_new_tokens)
    device, total = suffix_ids.device, P + max_new_tokens
    positions = torch.arange(total, device=device).expand(B, total)  # no padding: position = slot
    clock = Clock(device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    logits_log = torch.empty(max_new_tokens, B, model.cfg.vocab_size, device=device) if keep_logits else None
    t0 = clock.now()  # TTFT includes creating the cache (the block pool), as in kvlib.models.decode.generate
    # One pool for the prefix and every sequence: worst case each row needs all its blocks privately.
    pool = BlockPool(
        model.cfg,
        math.ceil(Pp / block_size) + B * math.ceil(total / block_size),
        block_size,
        device,
        model.wte.weight.dtype,
    )
    head = PagedCache(model.cfg, 1, Pp, device, pool.k.dtype, pool=pool)
    model(prefix_ids, positions[:1, :Pp], head, 0, None)  # the prefix, once
    kv = head.fork(B, total)
    head.release_all()  # the batch now holds the only references to the prefix's blocks
    logits = model(suffix_ids, positions[:, Pp:P], kv, Pp, None)[:, -1]  # each suffix attends over the prefix
    out[:, 0] = greedy(logits)
    if logits_log is not None:
        logits_log[0] = logits
    prev = clock.now()
    decode_s = decode_loop(model, out, P, positions, kv, None, logits_log, clock, prev)
    return Generation(out, prev - t0, decode_s, logits_log, kv)
