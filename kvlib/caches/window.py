"""Sliding-window cache with attention sinks (StreamingLLM): keep the first `sink` tokens and the last `window`
tokens, so memory is bounded by sink + window slots however long the sequence grows. Lossy once the sequence no
longer fits (`exact = False`); exact, slot for slot, while it does.

- Prefill: the prompt attends to all of itself at full length (the keys returned are the prompt's own), so the
  first token is exact; only sink + window of the prompt's entries are then kept.
- Decode: the window is a ring buffer (slot sink + (j - sink) mod window for position j), so a step writes one
  slot and copies nothing. Once it has wrapped, attention sees the keys in ring order, which changes nothing but
  the order of a sum (attention is permutation invariant over keys when there is no mask).
- The contract: with `sink` S and `window` W the cache holds at most S + W tokens, the newest token's own key
  included. Query i (a decode step at position i) sees keys j < S and i - W < j <= i, nothing else
  (tests/test_perplexity.py checks it against an explicit mask).
- Positions, `positions="original"` (the default): every token keeps its true absolute position. GPT-2 adds
  learned position embeddings to the input, and the Llama decoder rotates keys (RoPE) *before* they reach the
  cache, so a cached key already carries its original position; a query at position i sees kept keys at their
  true distances i - j. Sequences stay limited to the model's n_positions.
- `positions="cache"` (StreamingLLM's convention, RoPE models only): positions are counted within the cache, so
  once it is full the query sits at position S + W - 1 and the keys at their slots. Window keys keep their
  distance to the query either way (the newest is at distance 0, the oldest at W - 1); only the sinks move: at
  distance S + W - 1 - j instead of i - j. kvlib keeps rotated keys and, at each step, returns the sinks rotated
  forward by i - (S + W - 1) (RoPE rotations compose: R(a) R(b) = R(a + b)), which gives exactly those distances.
  With no sinks the two conventions are the same computation.
- Not supported: left padding once the window has started to slide (the model cannot tell which kept slot is
  padding; it raises a KvlibError), and multi-token writes after the prompt (chunked prefill).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvlib.caches.base import KVCache, OnePass, formula_options, register_layout, sink_window_mask
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.core.rope import rope_inv_freq, rotate

POSITIONS = ("original", "cache")


@register_layout
class SinkWindowCache(KVCache):
    """Options: sink (4), window (64), positions ("original" or "cache", see the module docstring)."""

    name = "window"
    exact = False
    loses = "evicted"
    evicts = True
    chunked_writes = False  # a question after the prompt goes in one token per step
    colour = "#999933"

    @classmethod
    def label(cls, options: Mapping[str, Any] | None = None) -> str:
        """ "window 4+252", "window 4+252 (cache positions)": sink + window."""
        pos = " (cache positions)" if cls.option(options, "positions") == "cache" else ""
        return f"window {cls.option(options, 'sink')}+{cls.option(options, 'window')}{pos}"

    @classmethod
    def with_budget(cls, options: Mapping[str, Any], budget: int) -> dict[str, Any]:
        """sink + window = budget (sink: the given one, else the default). Raises KvlibError for a window given too
        (the budget would be given twice) or a budget the sinks alone would fill."""
        if "window" in options:
            raise KvlibError("give the window layout --budget or --window, not both (budget = sink + window)")
        sink = cls.option(options, "sink")
        if budget <= sink:
            raise KvlibError(f"--budget {budget} must exceed the {sink} sink tokens (at least one recent token)")
        return {**options, "sink": sink, "window": budget - sink}

    @classmethod
    def held_budget(cls, options: Mapping[str, Any] | None = None) -> int | None:
        return cls.option(options, "sink") + cls.option(options, "window")

    @classmethod
    def protected_sinks(cls, options: Mapping[str, Any] | None = None) -> int:
        return cls.option(options, "sink")

    @classmethod
    def one_pass(cls, n_tokens: int, options: Mapping[str, Any] | None, device: torch.device | str) -> OnePass:
        """The sink-window mask; with positions="cache", the sinks scored at each query's position within the
        cache (min(i, sink + window - 1))."""
        sink, window = cls.option(options, "sink"), cls.option(options, "window")
        sink_positions = None
        if cls.option(options, "positions") == "cache":
            sink_positions = torch.arange(n_tokens, device=device).clamp(max=min(sink + window, n_tokens) - 1)
        return OnePass(sink_window_mask(n_tokens, sink, window, device), sink_positions, sink)

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        sink: int = 4,
        window: int = 64,
        positions: str = "original",
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype)
        sink = checks.whole("sink", sink, minimum=0, where="window cache:")
        window = checks.whole("window", window, minimum=1, where="window cache:")
        positions = checks.one_of("positions", positions, POSITIONS, where="window cache:")
        if positions == "cache" and cfg.arch != "llama":
            raise KvlibError(
                f"window cache: positions='cache' re-rotates keys (RoPE); {cfg.name} ({cfg.arch}) adds learned "
                "position embeddings to its input, which cannot be moved once a key is computed"
            )
        self.sink, self.window, self.positions = sink, window, positions
        self.inv_freq = None
        if positions == "cache":
            self.inv_freq = rope_inv_freq(cfg).to(self.device)
        self.capacity = min(sink + window, max_len)  # slots ever needed
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.capacity, cfg.head_dim)  # (L, B, nkv, sink+window, hd)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Buffer slot of each absolute position: sinks in place, the rest round the ring."""
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if start > 0 and T > 1:
            raise KvlibError(
                f"window cache: a {T}-token write at slot {start} (chunked prefill) is not supported; "
                "write the prompt in one call, then one token per step"
            )
        end = self._check_write(layer, k, start, capacity=self.max_len)
        if T == 1:  # a decode step: one slot, computed in Python (no index tensors on the hot path)
            slot = start if start < self.sink else self.sink + (start - self.sink) % self.window
            self.k[layer, :, :, slot] = k[:, :, 0]
            self.v[layer, :, :, slot] = v[:, :, 0]
            n = min(end, self.capacity)
            keys = self.k[layer, :, :, :n]
            shift = start - (self.capacity - 1)  # > 0 once the query's position within the cache stops growing
            if self.positions == "cache" and self.sink and shift > 0:
                keys = keys.clone()
                keys[:, :, : self.sink] = self._rotate_forward(keys[:, :, : self.sink], shift)
            return keys, self.v[layer, :, :, :n]
        # Several tokens (the prompt): keep the sinks among them and the last `window` of the rest.
        sinks = torch.arange(start, min(end, self.sink), device=self.device)
        rest = torch.arange(min(max(start, self.sink, end - self.window), end), end, device=self.device)
        positions = torch.cat([sinks, rest])
        slots = self._slots(positions)
        self.k[layer][:, :, slots] = k[:, :, positions - start]
        self.v[layer][:, :, slots] = v[:, :, positions - start]
        return k, v  # prefill: the prompt attends to all of itself

    def _rotate_forward(self, k: torch.Tensor, shift: int) -> torch.Tensor:
        """Keys (B, nkv, s, hd) rotated by `shift` more positions (HF's RoPE layout), computed in float32."""
        angles = shift * self.inv_freq  # (hd/2,)
        emb = torch.cat((angles, angles))  # (hd,)
        return rotate(k.float(), emb.cos(), emb.sin()).to(k.dtype)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.lengths[layer], self.capacity)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def lossy_tokens(self) -> int:
        """Tokens per sequence not held exactly: `evicted_tokens`."""
        return self.evicted_tokens

    @property
    def evicted_tokens(self) -> int:
        """Positions per sequence written but no longer kept; 0 while everything fits (the cache is then exact)."""
        return max(self.seq_len - self.capacity, 0)

    def used_bytes(self) -> int:
        """Bytes of the slots holding kept tokens."""
        return min(self.seq_len, self.capacity) * self.batch_size * self.cfg.kv_bytes_per_token(self.k.element_size())

    @classmethod
    def used_bytes_after(
        cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, batch_size: int = 1, **options: Any
    ) -> int:
        """After n tokens: min(n, sink + window) slots on every layer (the base class's contract)."""
        o = formula_options(cls, cfg, n_tokens, dtype, batch_size, options)
        kept = min(n_tokens, o["sink"] + o["window"])
        return kept * batch_size * cfg.kv_bytes_per_token(dtype.itemsize)
