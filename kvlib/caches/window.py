"""Sliding-window cache with attention sinks (StreamingLLM): keep the first `sink` tokens and the last `window`
tokens, so memory is bounded by sink + window slots however long the sequence grows. Lossy once the sequence no
longer fits (`exact = False`); exact, slot for slot, while it does.

- Prefill: the prompt attends to all of itself at full length (the keys returned are the prompt's own), so the
  first token is exact; only sink + window of the prompt's entries are then kept.
- Decode: the window is a ring buffer (slot sink + (j - sink) mod window for position j), so a step writes one
  slot and copies nothing. Once it has wrapped, attention sees the keys in ring order, which changes nothing but
  the order of a sum (attention is permutation invariant over keys when there is no mask).
- Positions: every token keeps its true absolute position. GPT-2 adds learned position embeddings to the input,
  and the Llama decoder rotates keys (RoPE) *before* they reach the cache, so either way a cached key already
  carries its original position and nothing here re-rotates it; a query at position p then sees kept keys at
  their true distances. StreamingLLM instead re-assigns positions inside the cache (keys cached unrotated and
  rotated by their slot at every step) so that distances never exceed the window; kvlib does not, so sequences
  stay limited to the model's n_positions (GPT-2 has no embedding beyond it; RoPE models were trained up to it).
- Not supported: left padding once the window has started to slide (the model cannot tell which kept slot is
  padding; it raises a KvlibError), and multi-token writes after the prompt (chunked prefill).
"""

from __future__ import annotations

import torch

from kvlib import checks
from kvlib.caches.base import KVCache, register_layout
from kvlib.errors import KvlibError
from kvlib.models.config import ModelConfig


@register_layout
class SinkWindowCache(KVCache):
    """Options: sink (4), window (64)."""

    name = "window"
    exact = False

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        sink: int = 4,
        window: int = 64,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype)
        sink = checks.whole("sink", sink, minimum=0, where="window cache:")
        window = checks.whole("window", window, minimum=1, where="window cache:")
        self.sink, self.window = sink, window
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
            return self.k[layer, :, :, :n], self.v[layer, :, :, :n]
        # Several tokens (the prompt): keep the sinks among them and the last `window` of the rest.
        sinks = torch.arange(start, min(end, self.sink), device=self.device)
        rest = torch.arange(min(max(start, self.sink, end - self.window), end), end, device=self.device)
        positions = torch.cat([sinks, rest])
        slots = self._slots(positions)
        self.k[layer][:, :, slots] = k[:, :, positions - start]
        self.v[layer][:, :, slots] = v[:, :, positions - start]
        return k, v  # prefill: the prompt attends to all of itself

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.lengths[layer], self.capacity)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    @property
    def evicted_tokens(self) -> int:
        """Positions per sequence written but no longer kept; 0 while everything fits (the cache is then exact)."""
        return max(self.seq_len - self.capacity, 0)

    def used_bytes(self) -> int:
        """Bytes of the slots holding kept tokens."""
        return min(self.seq_len, self.capacity) * self.batch_size * self.cfg.kv_bytes_per_token(self.k.element_size())
