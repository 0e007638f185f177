"""Quantized KV cache: keys and values stored as 8-, 4- or 2-bit integer codes with scales, the most recent tokens
optionally kept at full precision. Lossy (`exact = False`): it reports its error, it never claims identity.

Quantization is asymmetric (min/max): x ~ code * scale + zero with code in [0, 2^bits - 1], computed in float32;
scale and zero are stored in the cache's dtype, and codes are computed against those stored (rounded) values.

- values: one (scale, zero) per token and head, over head_dim (per-token), as in KIVI; with `group` g, one per
  token, head and run of g channels (KIVI's group size: head_dim / g scales per token).
- keys: per-token too (`key_axis="token"`), or per-channel (`key_axis="channel"`, KIVI): one (scale, zero) per
  channel over a group of `residual_len` tokens, because keys have outlier channels that per-token scales smear.
- int4 / int2: two / four codes per byte along head_dim (head_dim must be a multiple of 2 / 4).
- KIVI in miniature: key_axis="channel", bits 4 or 2, residual_len 32 or 128, group 32. One simplification: the
  keys' per-channel group along tokens is the residual itself (KIVI quantizes a full residual of R tokens in
  groups of G <= R; here G = R), and values are flushed with their keys, a group at a time.
- residual: with `key_axis="token"`, the last `residual_len` tokens stay at full precision; with "channel" the
  full-precision tail fills up to `residual_len` tokens and is then quantized as one group (KIVI's rule).

Attention during the prompt's prefill uses the prompt's keys and values at full precision (as Hugging Face's
QuantizedCache does). Every later step of the int8 per-token layout attends over the codes themselves, the scales
applied after the products (`attention_over_codes`, converting CODE_BLOCK tokens of codes to float at a time); the
other options attend over the dequantized cache plus the full-precision tail, a full O(S) pass per layer and step
(no fused kernel), which the decode latency includes.

Bytes: codes, scales, zeros and the residual tail all count; storage is preallocated for max_len tokens like the
static cache (less the residual_len slots that per-token mode never quantizes), so `nbytes()` is the reservation
and `used_bytes()` the part holding tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from kvlib.caches.base import KVCache, OnePass, causal_mask, formula_options, register_layout
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError

KEY_AXES = ("token", "channel")
BITS = (8, 4, 2)
# Whether the int8 per-token cache attends over its codes at decode (QuantizedCache.decode_attention); False:
# every step dequantizes the whole cache into a float copy first (the tests compare the two)
ATTEND_CODES = True
CODE_BLOCK = 1024  # tokens of codes converted to floats at a time in attention_over_codes


def quantize(x: torch.Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Asymmetric quantization of `x` over `dim`: (codes uint8, scale, zero), scale and zero in `dtype` with `dim`
    kept as size 1. Codes are unpacked (one per byte)."""
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    qmax = 2**bits - 1
    # A constant slice would give scale 0: clamp to the dtype's smallest normal number (its codes are all 0).
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    zero = lo.to(dtype)
    codes = ((xf - zero.float()) / scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., k n) codes of `bits` bits -> (..., n) bytes, k = 8 // bits codes per byte, element k i + j in bits
    [j bits, (j + 1) bits) of byte i. 8 bits: unchanged."""
    per_byte = 8 // bits
    out = codes[..., 0::per_byte].clone()
    for j in range(1, per_byte):
        out |= codes[..., j::per_byte] << (bits * j)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte, mask = 8 // bits, 2**bits - 1
    if per_byte == 1:
        return packed
    return torch.stack([(packed >> (bits * j)) & mask for j in range(per_byte)], dim=-1).flatten(-2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) codes in [0, 15] -> (..., n) bytes, even elements in the low nibble."""
    return pack_codes(codes, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return unpack_codes(packed, 4)


def quantize_grouped(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Per-token quantization of x (..., hd) in runs of `group` channels: codes (..., hd), scale and zero
    (..., hd / group)."""
    codes, scale, zero = quantize(x.unflatten(-1, (-1, group)), bits, dim=-1, dtype=dtype)
    return codes.flatten(-2), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_grouped(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of quantize_grouped: codes (..., hd), scale and zero (..., hd / group) -> (..., hd)."""
    ng = scale.shape[-1]
    return dequantize(codes.unflatten(-1, (ng, -1)), scale[..., None], zero[..., None], dtype).flatten(-2)


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix H (n, n) float32, H @ H.T = I, by Sylvester's construction
    (H_2n = [[H, H], [H, -H]] / sqrt 2), as QuaRot (Ashkboos et al. 2024) and llama.cpp's rotated quantized caches
    use. Raises KvlibError unless n is a power of two."""
    if not (checks.is_whole(n) and n >= 1 and n & (n - 1) == 0):
        raise KvlibError(f"a Hadamard rotation needs a power-of-two size; head_dim is {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0) / math.sqrt(2)
    return h.to(device)


def rotated(x: torch.Tensor, h: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (..., hd) times the rotation h (x @ h), or its inverse (x @ h.T), computed in float32, in x's dtype."""
    return (x.float() @ (h.T if inverse else h)).to(x.dtype)


@register_layout
class QuantizedCache(KVCache):
    """Options: bits (8, 4 or 2), residual_len (0: every token quantized), key_axis ("token" or "channel"),
    group (channels per scale of per-token quantization; 0: the whole head_dim), rotate (quantize keys and values
    after an orthonormal Hadamard rotation over head_dim and rotate them back when read, as QuaRot and llama.cpp's
    quantized caches since 2026-04 do: an outlier channel's energy is spread over every channel before the min/max
    scale is taken; head_dim must be a power of two). Rotating back when read makes attention exactly what it would
    be over the unrotated keys and values (H is orthonormal: q.k = (qH).(kH)), so only the quantization error
    differs; the rotated layout reads through the dequantized copy (no attention over codes), so its speed is not
    what a fused kernel would give. The rotation matrix (hd x hd float32) is not counted in the cache's bytes."""

    name = "quantized"
    exact = False
    loses = "quantized"
    step_overhead = "dequantizing its codes"
    colour = "#d55e00"  # int8's; figures tell bits apart by label (kvlib.study.plotting)

    @classmethod
    def label(cls, options: Mapping[str, Any] | None = None) -> str:
        """ "int8 per-token", "int4 kivi r32 g32": bits, key axis (KIVI: keys per channel), tail and group if set."""
        kivi = cls.option(options, "key_axis") == "channel"
        name = f"int{cls.option(options, 'bits')} {'kivi' if kivi else 'per-token'}"
        if cls.option(options, "residual_len"):
            name += f" r{cls.option(options, 'residual_len')}"
        if cls.option(options, "group"):
            name += f" g{cls.option(options, 'group')}"
        if cls.option(options, "rotate"):
            name += " rotated"
        return name

    @classmethod
    def one_pass(cls, n_tokens: int, options: Mapping[str, Any] | None, device: torch.device | str) -> OnePass:
        """Causal, with keys and values seen as codes where the layout would hold codes (`quantized_where`), fake-
        quantized by the layout's own functions (`fake_quantized`)."""
        o = {k: cls.option(options, k) for k in ("bits", "residual_len", "key_axis", "group", "rotate")}
        return OnePass(
            causal_mask(n_tokens, device),
            codes_where=quantized_where(n_tokens, o, device),
            fake_quantized=functools.partial(fake_quantized, options=o),
        )

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        bits: int = 8,
        residual_len: int = 0,
        key_axis: str = "token",
        group: int = 0,
        rotate: bool = False,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype)
        if not isinstance(rotate, bool):
            raise checks.fail("rotate", rotate, "true or false", "quantized cache:")
        self.rotation = hadamard(cfg.head_dim, self.device) if rotate else None
        if not (checks.is_whole(bits) and bits in BITS):
            raise checks.fail("bits", bits, "8, 4 or 2", "quantized cache:")
        bits = int(bits)
        group = checks.whole("group", group, minimum=0, where="quantized cache:") or cfg.head_dim
        if cfg.head_dim % group:
            raise KvlibError(f"quantized cache: group {group} does not divide head_dim {cfg.head_dim}")
        key_axis = checks.one_of("key_axis", key_axis, KEY_AXES, where="quantized cache:")
        residual_len = checks.whole("residual_len", residual_len, minimum=0, where="quantized cache:")
        if key_axis == "channel" and residual_len < 2:
            raise KvlibError(
                "quantized cache: key_axis='channel' quantizes keys in groups of residual_len tokens; "
                f"residual_len must be >= 2, got {residual_len}"
            )
        per_byte = 8 // bits
        if cfg.head_dim % per_byte:
            raise KvlibError(
                f"quantized cache: int{bits} packs {per_byte} codes per byte; head_dim {cfg.head_dim} is not a "
                f"multiple of {per_byte}"
            )
        self.bits, self.residual_len, self.key_axis, self.group = bits, residual_len, key_axis, group
        c, hd = cfg, cfg.head_dim
        width, n_groups = hd // per_byte, hd // group
        lead = (c.n_layer, batch_size, c.n_kv_head)
        # Slots that can ever be quantized: per-token mode always keeps the last residual_len at full precision.
        n_codes = max(max_len - residual_len, 0) if key_axis == "token" else max_len
        self.k_codes = torch.zeros(*lead, n_codes, width, dtype=torch.uint8, device=self.device)  # (L, B, nkv, S, w)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.v_scale = torch.zeros(*lead, n_codes, n_groups, dtype=dtype, device=self.device)  # (L, B, nkv, S, ng)
        self.v_zero = torch.zeros_like(self.v_scale)
        if key_axis == "token":
            self.k_scale = torch.zeros_like(self.v_scale)
        else:  # one (scale, zero) per channel and group of residual_len tokens
            groups = math.ceil(max_len / residual_len)
            self.k_scale = torch.zeros(*lead, groups, hd, dtype=dtype, device=self.device)  # (L, B, nkv, G, hd)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.n_quant = [0] * c.n_layer  # tokens stored quantized, per layer
        self.res_k: list[torch.Tensor | None] = [None] * c.n_layer  # full-precision tail (B, nkv, r, hd)
        self.res_v: list[torch.Tensor | None] = [None] * c.n_layer

    def _codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits)

    def _uncodes(self, stored: torch.Tensor) -> torch.Tensor:
        return unpack_codes(stored, self.bits)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v (B, nkv, n, hd) into the next n quantized slots of `layer` (rotated first with `rotate`)."""
        q0, n = self.n_quant[layer], k.shape[2]
        if self.rotation is not None:
            k, v = rotated(k, self.rotation), rotated(v, self.rotation)
        codes, scale, zero = quantize_grouped(v, self.bits, self.group, self.dtype)
        self.v_codes[layer, :, :, q0 : q0 + n] = self._codes(codes)
        self.v_scale[layer, :, :, q0 : q0 + n] = scale
        self.v_zero[layer, :, :, q0 : q0 + n] = zero
        if self.key_axis == "token":
            codes, scale, zero = quantize_grouped(k, self.bits, self.group, self.dtype)
            self.k_scale[layer, :, :, q0 : q0 + n] = scale
            self.k_zero[layer, :, :, q0 : q0 + n] = zero
        else:  # n is a whole number of groups: (B, nkv, n/G, G, hd), reduce over the G tokens of each group
            G = self.residual_len
            B, nkv, _, hd = k.shape
            codes, scale, zero = quantize(k.reshape(B, nkv, n // G, G, hd), self.bits, dim=3, dtype=self.dtype)
            codes = codes.reshape(B, nkv, n, hd)
            self.k_scale[layer, :, :, q0 // G : (q0 + n) // G] = scale.squeeze(3)
            self.k_zero[layer, :, :, q0 // G : (q0 + n) // G] = zero.squeeze(3)
        self.k_codes[layer, :, :, q0 : q0 + n] = self._codes(codes)
        self.n_quant[layer] = q0 + n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._write(layer, k, v, start)
        if start == 0:
            return k, v  # the prompt attends to itself at full precision
        return self.layer_kv(layer)

    @property
    def attends_codes(self) -> bool:
        """Whether a decode step attends over the integer codes themselves (`decode_attention`): int8 codes with
        one scale per token and head (keys per token, no channel groups), and ATTEND_CODES set."""
        unrotated = self.rotation is None
        return (
            ATTEND_CODES
            and unrotated
            and self.bits == 8
            and self.key_axis == "token"
            and self.group == self.cfg.head_dim
        )

    def decode_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor | None:
        """The int8 cache's decode step without a dequantized copy of the cache (`attention_over_codes`): the
        write, then attention from the codes, scales and zeros and the full-precision tail. None (nothing written)
        for another layout option, the prompt or a multi-token write."""
        if start == 0 or k.shape[2] != 1 or not self.attends_codes:
            return None
        self._write(layer, k, v, start)
        n = self.n_quant[layer]
        return attention_over_codes(
            q,
            self.k_codes[layer, :, :, :n],
            self.k_scale[layer, :, :, :n],
            self.k_zero[layer, :, :, :n],
            self.v_codes[layer, :, :, :n],
            self.v_scale[layer, :, :, :n],
            self.v_zero[layer, :, :, :n],
            self.res_k[layer],
            self.res_v[layer],
        )

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v (B, nkv, T, hd): into the full-precision tail, flushing what leaves it as codes."""
        self._check_write(layer, k, start, capacity=self.max_len)
        old_k, old_v = self.res_k[layer], self.res_v[layer]
        tail_k = k if old_k is None else torch.cat([old_k, k], dim=2)  # (B, nkv, r, hd)
        tail_v = v if old_v is None else torch.cat([old_v, v], dim=2)
        r = tail_k.shape[2]
        if self.key_axis == "token":
            flush = max(r - self.residual_len, 0)  # keep exactly the last residual_len tokens
        else:
            flush = r // self.residual_len * self.residual_len  # whole groups only
        if flush:
            self._store(layer, tail_k[:, :, :flush], tail_v[:, :, :flush])
        # clone: never keep a view of the fused qkv activations (or of a concatenation) alive
        self.res_k[layer] = tail_k[:, :, flush:].clone() if flush < r else None
        self.res_v[layer] = tail_v[:, :, flush:].clone() if flush < r else None

    def _dequantized(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_quant[layer]
        v = dequantize_grouped(
            self._uncodes(self.v_codes[layer, :, :, :n]),
            self.v_scale[layer, :, :, :n],
            self.v_zero[layer, :, :, :n],
            self.dtype,
        )
        codes = self._uncodes(self.k_codes[layer, :, :, :n])
        if self.key_axis == "token":
            k = dequantize_grouped(codes, self.k_scale[layer, :, :, :n], self.k_zero[layer, :, :, :n], self.dtype)
        else:
            G = self.residual_len
            B, nkv, _, hd = codes.shape
            scale = self.k_scale[layer, :, :, : n // G, None]  # (B, nkv, n/G, 1, hd)
            zero = self.k_zero[layer, :, :, : n // G, None]
            k = dequantize(codes.reshape(B, nkv, n // G, G, hd), scale, zero, self.dtype).reshape(B, nkv, n, hd)
        if self.rotation is not None:
            k, v = rotated(k, self.rotation, inverse=True), rotated(v, self.rotation, inverse=True)
        return k, v

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantized(layer)  # (B, nkv, n_quant, hd)
        if self.res_k[layer] is None:
            return k, v
        return torch.cat([k, self.res_k[layer]], dim=2), torch.cat([v, self.res_v[layer]], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        tails = [t for t in (*self.res_k, *self.res_v) if t is not None]
        return [self.k_codes, self.v_codes, self.k_scale, self.k_zero, self.v_scale, self.v_zero, *tails]

    def used_bytes(self) -> int:
        """Bytes holding tokens: the filled codes and their scales/zeros, plus the full-precision tail."""
        c, el = self.cfg, self.k_scale.element_size()
        rows = self.batch_size * c.n_kv_head
        total = 0
        for layer in range(c.n_layer):
            n = self.n_quant[layer]
            ng = self.v_scale.shape[-1]
            total += 2 * rows * n * self.k_codes.shape[-1]  # K and V codes, packed bytes
            total += 2 * rows * n * ng * el  # V scale and zero, per token (and group of channels)
            if self.key_axis == "token":
                total += 2 * rows * n * ng * el
            else:
                total += 2 * rows * (n // self.residual_len) * c.head_dim * el
            for t in (self.res_k[layer], self.res_v[layer]):
                total += 0 if t is None else t.numel() * t.element_size()
        return total

    @classmethod
    def used_bytes_after(
        cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, batch_size: int = 1, **options: Any
    ) -> int:
        """After n tokens (the base class's contract): n_q of them as codes with their scales and zeros, the rest
        in the full-precision tail; n_q = n - residual_len per token (at least 0), the whole groups of residual_len
        per channel (KIVI)."""
        o = formula_options(cls, cfg, n_tokens, dtype, batch_size, options)
        bits, r, hd, el = o["bits"], o["residual_len"], cfg.head_dim, dtype.itemsize
        n_groups = hd // (o["group"] or hd)  # scales per token and head
        if o["key_axis"] == "token":
            n_q = max(n_tokens - r, 0)
            key_scales = 2 * n_q * n_groups * el  # K scale and zero, per token
        else:
            n_q = n_tokens // r * r
            key_scales = 2 * (n_q // r) * hd * el  # K scale and zero, per channel and group of r tokens
        per_row = 2 * n_q * (hd * bits // 8) + 2 * n_q * n_groups * el + key_scales  # codes, V scales, K scales
        rows = cfg.n_layer * batch_size * cfg.n_kv_head
        return rows * per_row + (n_tokens - n_q) * batch_size * cfg.kv_bytes_per_token(dtype.itemsize)

    def lossy_tokens(self) -> int:
        """Tokens per sequence not held exactly: `quantized_tokens`."""
        return self.quantized_tokens

    @property
    def quantized_tokens(self) -> int:
        """Tokens per sequence stored as integer codes so far (in every layer); the others sit in the full-precision
        tail. 0 means every token stayed at full precision: a run like that measures nothing about quantization."""
        return min(self.n_quant)


# ---- attention over int8 codes (a decode step that reads the codes, not a dequantized copy) ------------------------


def _times_codes(a: torch.Tensor, codes: torch.Tensor, transposed: bool) -> torch.Tensor:
    """a @ codes^T (transposed: a (..., g, hd), codes (..., n, hd) -> (..., g, n)) or a @ codes (a (..., g, n) ->
    (..., g, hd)), codes uint8 converted to a's dtype CODE_BLOCK tokens at a time: a float block of the codes,
    never the whole cache (measured against other block sizes: docs/2026-12-07-int8-attention.md)."""
    n = codes.shape[-2]
    if n <= CODE_BLOCK:
        c = codes.to(a.dtype)
        return a @ c.transpose(-1, -2) if transposed else a @ c
    if transposed:
        return torch.cat([a @ codes[..., i : i + CODE_BLOCK, :].to(a.dtype).transpose(-1, -2)
                          for i in range(0, n, CODE_BLOCK)], dim=-1)  # fmt: skip
    out = a[..., :CODE_BLOCK] @ codes[..., :CODE_BLOCK, :].to(a.dtype)
    for i in range(CODE_BLOCK, n, CODE_BLOCK):
        out += a[..., i : i + CODE_BLOCK] @ codes[..., i : i + CODE_BLOCK, :].to(a.dtype)
    return out


def attention_over_codes(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    tail_k: torch.Tensor | None,
    tail_v: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of one query per head over n keys held as int8 codes (one scale and zero per token and head) and
    r full-precision tail keys, without dequantizing: with k_j = s_j c_j + z_j,
    q . k_j = s_j (q . c_j) + z_j sum(q), and sum_j p_j v_j = (p * s^v) @ C^v + (p . z^v) for the values; the
    scales are applied after the products with the codes (as integer-code kernels do, e.g. llama.cpp's q8_0).

    q (B, nh, 1, hd); k_codes, v_codes (B, nkv, n, hd) uint8; scales and zeros (B, nkv, n, 1); tails (B, nkv, r,
    hd) or None. Scale 1/sqrt(hd); GQA: query head h uses key-value head h // (nh / nkv). Returns (B, nh, 1, hd) in
    q's dtype. Arithmetic in float32 (the scores and the weighted sum), as the dequantized path's."""
    B, nh, _, hd = q.shape
    nkv = k_codes.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd).float() * hd**-0.5  # (B, nkv, g, hd)
    ks, kz = k_scale.float().squeeze(-1)[:, :, None], k_zero.float().squeeze(-1)[:, :, None]  # (B, nkv, 1, n)
    scores = _times_codes(qg, k_codes, transposed=True) * ks + qg.sum(-1, keepdim=True) * kz  # (B, nkv, g, n)
    if tail_k is not None:
        scores = torch.cat([scores, qg @ tail_k.float().transpose(-1, -2)], dim=-1)  # (B, nkv, g, n + r)
    p = scores.softmax(dim=-1)
    n = k_codes.shape[2]
    pq = p[..., :n]
    vs, vz = v_scale.float().squeeze(-1)[:, :, None], v_zero.float().squeeze(-1)[:, :, None]  # (B, nkv, 1, n)
    y = _times_codes(pq * vs, v_codes, transposed=False) + (pq * vz).sum(-1, keepdim=True)  # (B, nkv, g, hd)
    if tail_v is not None:
        y = y + p[..., n:] @ tail_v.float()
    return y.to(q.dtype).reshape(B, nh, 1, hd)


# ---- the layout read token by token, as one pattern (KVCache.one_pass) ----------------------------------------------


def quantized_where(T: int, options: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool: whether query i's step sees key j as integer codes (else at full precision) in the quantized
    layout, which holds a full-precision tail: per token, the last residual_len tokens; per channel, the tokens
    past the last whole group of residual_len. The first step attends to its own key at full precision.
    `options`: the layout's options, every one given (QuantizedCache.option fills the defaults)."""
    r = options["residual_len"]
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    per_token = options["key_axis"] == "token"
    held = j <= i - r if per_token else j < (i + 1) // r * r
    held[0] = False
    return held & (j <= i)


def fake_quantized(k: torch.Tensor, v: torch.Tensor, options: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, nkv, T, hd) quantized and dequantized as the quantized layout stores them (per-channel keys: only
    the whole groups of residual_len tokens; the rest is returned unchanged and never used as codes). `options`:
    every option of the layout given; with `rotate`, quantized after the Hadamard rotation and rotated back, as the
    layout stores and reads them."""
    if options.get("rotate"):
        h = hadamard(k.shape[-1], k.device)
        kq, vq = fake_quantized(rotated(k, h), rotated(v, h), {**options, "rotate": False})
        return rotated(kq, h, inverse=True), rotated(vq, h, inverse=True)
    bits, group = options["bits"], options["group"] or k.shape[-1]
    dtype = k.dtype
    vq = dequantize_grouped(*quantize_grouped(v, bits, group, dtype), dtype)
    if options["key_axis"] == "token":
        return dequantize_grouped(*quantize_grouped(k, bits, group, dtype), dtype), vq
    G = options["residual_len"]
    B, nkv, T, hd = k.shape
    n = T // G * G
    kq = k.clone()
    if n:
        codes, scale, zero = quantize(k[:, :, :n].reshape(B, nkv, n // G, G, hd), bits, dim=3, dtype=dtype)
        kq[:, :, :n] = dequantize(codes, scale, zero, dtype).reshape(B, nkv, n, hd)
    return kq, vq
