"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer"), in Hugging Face's layout: dimension i pairs with
i + head_dim/2. The math alone, shared by the Llama and Gemma 3 decoders (kvlib.models), the window cache, which
rotates its sinks forward with positions="cache" (kvlib.caches.window), and the one-pass perplexity.
"""

from __future__ import annotations

import torch

from kvlib.core.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """The rotation frequencies theta^(-2i/hd), i = 0 .. hd/2 - 1, float32 (hd/2,); theta defaults to
    cfg.rope_theta (Gemma 3's sliding layers pass cfg.rope_local_theta)."""
    hd = cfg.head_dim
    theta = cfg.rope_theta if theta is None else theta
    return 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (B, 1, T, hd), computed in float32 and cast to `dtype` (as HF does).

    Angle of dimension pair i at position p: p * inv_freq[i]; HF's layout pairs dimension i with i + hd/2.
    """
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, h, T, hd): each pair (x_i, x_{i+hd/2}) rotated by its angle."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # HF's rotate_half
    return x * cos + rotated_half * sin


class RopeTable:
    """cos and sin of every position up to the context, computed once per (dtype, device) with the arithmetic
    of `rope_cos_sin`; a forward pass then only gathers its positions' rows: one small gather per step instead
    of recomputing angles, and the sign of rotate_half folded into the sine (`sin_signed`), so that rotating is
    four ops with no concatenation (`rotate_folded`), bit-identical to `rotate` (tests)."""

    def __init__(self, inv_freq: torch.Tensor, n_positions: int) -> None:
        self.inv_freq, self.n_positions = inv_freq, n_positions
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed) of `positions` (B, T), each (B, T, 1, hd): broadcast over the heads of (B, T, h, hd)."""
        key = (dtype, positions.device)
        top = int(positions.max()) + 1  # a window cache or a perplexity run may go past the context: grow
        if key not in self._tables or self._tables[key][0].shape[0] < top:
            self.n_positions = max(self.n_positions, top)
            all_positions = torch.arange(self.n_positions, device=positions.device)[None]  # (1, n_positions)
            cos, sin = rope_cos_sin(all_positions, self.inv_freq.to(positions.device), dtype)  # (1, 1, n, hd)
            half = sin.shape[-1] // 2
            sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # rotate_half's sign, folded in
            self._tables[key] = (cos[0, 0], sin_signed[0, 0])  # (n_positions, hd) each
        cos, sin_signed = self._tables[key]
        if positions.is_cpu and positions.shape[0] > 1 and bool((positions == positions[:1]).all()):
            positions = positions[:1]  # no padding: every sequence has the same positions, gather them once
        return cos[positions][:, :, None], sin_signed[positions][:, :, None]  # (B or 1, T, 1, hd)


def rotate_folded(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`rotate` of x (..., hd) with the sign folded into the sine: x * cos + swap_halves(x) * sin_signed.
    (-a) * s and a * (-s) round alike, so this is bit-identical to HF's x * cos + rotate_half(x) * sin."""
    out = x * cos
    return out.add_(x.roll(x.shape[-1] // 2, dims=-1).mul_(sin_signed))
