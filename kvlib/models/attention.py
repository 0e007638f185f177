"""Attention over a KV cache: the one step both architectures (kvlib.models.gpt2.GPT, kvlib.models.llama.Llama) share.

`attend` stores this call's keys and values in the cache and attends over everything the cache returns; it is
where a KV cache enters the computation. `attention_mask` builds the mask for T queries at explicit cache slots.

Shapes: B batch, T new positions in this call, S positions visible to attention (cached + new), nh / nkv query /
key-value heads, hd head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlib.caches.base import KVCache
from kvlib.errors import KvlibError
from kvlib.models.fastpath import one_query_attention


def attention_mask(
    T: int, start: int, key_valid: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The attention mask for T queries at slots [start, start + T) over keys at slots [0, start + T).

    Returns (mask, is_causal). Query i may see key j when j <= start + i and key j is not padding; it always sees
    itself, so a padding query (whose keys are all padding) gets a finite, unused output instead of NaN.
    Without padding, one new token sees every key (no mask), and a fresh prefill is plain causal attention.
    """
    if key_valid is None:
        if T == 1:
            return None, False
        if start == 0:
            return None, True
    S = start + T
    q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    if key_valid is None:
        return causal[None, None], False  # (1, 1, T, S)
    mask = causal[None] & key_valid[:, None, :S]  # (B, T, S)
    mask |= k_slot == q_slot
    return mask[:, None], False  # (B, 1, T, S)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None,
    layer: int,
    start: int,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hd) over this call's k, v (B, nkv, T, hd) and, with a cache,
    every earlier key and value; returns (B, nh, T, hd).

    Keys arrive with their positions already applied (GPT-2 added them to the input; Llama rotated them), so the
    cache stores them as they are and never needs to know about positions.
    """
    if cache is not None:
        # The whole point of the study: store this step's keys/values, attend over all of them.
        k, v = cache.update(layer, k, v, start)  # (B, nkv, S, hd)
    if mask is not None and mask.shape[-1] != k.shape[2]:
        # A layout that keeps fewer keys than slots (a window with sinks) cannot say which kept key is padding.
        raise KvlibError(
            f"{cache.name} cache returned {k.shape[2]} of {mask.shape[-1]} keys: it cannot be used with "
            "left padding (attention_mask) or a multi-token write after the prompt"
        )
    if q.shape[2] == 1 and q.is_cpu and q.dtype != torch.float32:
        return one_query_attention(q, k, v, mask)  # faster than SDPA's CPU kernel in half precision (see there)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )  # (B, nh, T, hd)
