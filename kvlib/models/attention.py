"""Attention over a KV cache: the one step both architectures (kvlib.models.gpt2.GPT, kvlib.models.llama.Llama) share.

`attend` stores this call's keys and values in the cache and attends over everything the cache returns; it is
where a KV cache enters the computation. `attention_mask` builds the mask for T queries at explicit cache slots.
`attention_received` computes the attention weights that the eviction policies (kvlib.caches.eviction) score by.

Shapes: B batch, T new positions in this call, S positions visible to attention (cached + new), nh / nkv query /
key-value heads, hd head_dim.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kvlib.caches.base import KVCache
from kvlib.models.fastpath import one_query_attention

# Set by `outputs_unused`; a context variable, so that another thread (or task) decoding meanwhile is unaffected.
_outputs_unused: contextvars.ContextVar[bool] = contextvars.ContextVar("kvlib_attention_outputs_unused", default=False)


@contextlib.contextmanager
def outputs_unused() -> Iterator[None]:
    """Within it, `attend` still writes the cache and shows it the attention its keys received, but returns zeros
    instead of the attention's output, and the decoders' attention modules return their input without the output
    projection (`output_wanted`): for a caller that discards every output (kvlib.study.passkey replays a recorded
    prefill into a cache, where only the cache's writes and observations count). Saves one attention and one
    projection per layer; the tests that replay a prefill prove the caches and answers unchanged."""
    token = _outputs_unused.set(True)
    try:
        yield
    finally:
        _outputs_unused.reset(token)


def output_wanted() -> bool:
    """False within `outputs_unused`: an attention module may then skip its output projection."""
    return not _outputs_unused.get()


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float | None
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd), GQA without copies;
    (B, nh, T, hd). With a mask and more than one query the queries are made contiguous first: the decoders produce
    them as a transposed view of (B, T, nh, hd), and the CPU kernel with a mask was measured slower on that layout
    (Gemma 3's sliding-window prefill, 2048 tokens, 4 heads of 256: 93 ms strided against 74 ms with the copy)."""
    if mask is not None and q.shape[2] > 1:
        q = q.contiguous()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


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
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hd) over this call's k, v (B, nkv, T, hd) and, with a cache,
    every earlier key and value; returns (B, nh, T, hd). `scale` multiplies q k^T (None: 1/sqrt(hd)).

    Keys arrive with their positions already applied (GPT-2 added them to the input; Llama rotated them), so the
    cache stores them as they are and never needs to know about positions.

    A cache whose `needs_attention` is set (the eviction policies of kvlib.caches.eviction: H2O, TOVA, SnapKV)
    is then shown the attention its keys received (`attention_received`, the same scale and mask) through
    `cache.observe`; for every other layout this costs one attribute read. Within `outputs_unused` it returns
    zeros (B, nh, T, hd) instead of the output, after the same writes and observations.
    """
    if cache is not None and mask is None and scale is None and q.shape[2] == 1 and not _outputs_unused.get():
        y = cache.decode_attention(layer, q, k, v, start)  # a layout that attends over its own storage
        if y is not None:
            return y  # (B, nh, 1, hd)
    if cache is not None:
        # The whole point of the study: store this step's keys/values, attend over all of them.
        k, v = cache.update(layer, k, v, start)  # (B, nkv, S, hd)
        if mask is not None and mask.shape[-1] != k.shape[2]:
            # A layout that keeps fewer keys than slots (eviction) maps the mask onto the keys it kept, or raises.
            mask = cache.visible_mask(layer, mask, q.shape[1])  # (B, nh, T, S)
    one_query = q.shape[2] == 1 and q.is_cpu and q.dtype != torch.float32 and scale is None
    if _outputs_unused.get():  # the caller discards the output (outputs_unused)
        y = torch.zeros_like(q)
    elif one_query and (mask is None or mask.shape[1] == 1):  # its mask is shared by the heads; its scale 1/sqrt(hd)
        y = one_query_attention(q, k, v, mask)  # faster than SDPA's CPU kernel in half precision (see there)
    else:
        y = sdpa(q, k, v, mask, is_causal, scale)  # (B, nh, T, hd)
    if cache is not None and cache.needs_attention:
        n = cache.observed_queries(layer)
        cache.observe(layer, attention_received(q, k, mask, is_causal, scale, n) if n else None)
    return y


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    n_queries: int,
    block_elems: int = 1 << 24,
) -> torch.Tensor:
    """Attention each key received from the last `n_queries` queries: softmax(q k^T * scale) with the mask
    attention used, summed over those queries and over the query heads sharing each key-value head.

    q (B, nh, T, hd); k (B, nkv, S, hd); mask None or bool (B or 1, 1 or nh, T, S), True where visible;
    `is_causal` (a fresh prefill: S == T) masks key j for query i when j > i. scale None: 1/sqrt(hd), as SDPA.
    Returns (B, nkv, S) float32. Computed in blocks of queries of at most `block_elems` scores (memory bound).
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    scale = hd**-0.5 if scale is None else scale
    kf = k.float()[:, :, None]  # (B, nkv, 1, S, hd)
    out = torch.zeros(B, nkv, S, dtype=torch.float32, device=q.device)
    rows = max(1, block_elems // max(1, B * nh * S))
    for r0 in range(T - n_queries, T, rows):
        r1 = min(r0 + rows, T)
        qb = q[:, :, r0:r1].float().reshape(B, nkv, g, r1 - r0, hd)  # head h is in group h // g, as SDPA's GQA
        s = (qb @ kf.transpose(-1, -2)) * scale  # (B, nkv, g, b, S)
        if mask is not None:
            mb = mask[:, :, r0:r1]
            mb = mb[:, :, None] if mb.shape[1] == 1 else mb.reshape(mb.shape[0], nkv, g, r1 - r0, S)
            s = s.masked_fill(~mb, float("-inf"))
        elif is_causal:
            q_at = torch.arange(r0, r1, device=q.device)[:, None] + (S - T)  # (b, 1)
            s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > q_at, float("-inf"))
        out += s.softmax(dim=-1).sum(dim=(2, 3))
    return out
