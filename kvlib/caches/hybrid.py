"""The hybrid cache of a model trained with sliding-window layers (Gemma 2/3): each layer's cache follows its
`layer_type`, so the sliding layers hold only their window, exactly.

- Full-attention layers: a static buffer of max_len slots, written in place (as "static").
- Sliding-attention layers: a ring buffer of R = min(sliding_window, max_len) slots; the key and value of
  position (slot) p live in ring slot p mod R. A query at slot i sees keys i - W < j <= i (W = sliding_window),
  so after writing its own key the ring holds exactly the keys the next decode step needs, and nothing older is
  ever needed again: the cache is exact, not an approximation (`exact = True`).
- Explicit positions: `update_with_slots` returns, with the keys, the absolute slot of each one (-1 for a ring
  slot not yet written), and kvlib.models.gemma3 builds its mask from those, so ring order and wrap-around change
  nothing, and left padding works (the padding keys are found by their slot in key_valid).
- A write of several tokens (the prompt, or a chunk after it) attends over the ring's keys so far plus the new
  ones (the model masks each query's window), then keeps the last R of them.

Bytes held, per sequence: 2 (K and V) x n_kv_head x head_dim x element size x (full layers x max_len + sliding
layers x min(sliding_window, max_len)); `nbytes()` counts the tensors themselves, and tests check it equals
`hybrid_bytes`. Hugging Face's DynamicCache does the same for Gemma 3 with a growing list that keeps the last
sliding_window - 1 keys between steps (transformers cache_utils.DynamicSlidingWindowLayer).
On a model without sliding layers this is the static cache.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlib.caches.base import KVCache, formula_options, register_layout, slot_bytes
from kvlib.core.config import ModelConfig


def hybrid_bytes(cfg: ModelConfig, batch_size: int, max_len: int, bytes_per_element: int) -> int:
    """Bytes the hybrid cache holds for `batch_size` sequences of up to `max_len` positions (see module docstring)."""
    per_slot = 2 * cfg.n_kv_head * cfg.head_dim * bytes_per_element
    slots = sum(max_len if w is None else min(w, max_len) for w in map(cfg.window_of, range(cfg.n_layer)))
    return batch_size * per_slot * slots


def ring_slots(length: int, ring: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Absolute slot held by each of the first min(length, ring) ring slots after positions [0, length) were
    written round a ring of `ring` slots: ring slot i holds the latest p < length with p mod ring == i. (n,) long."""
    i = torch.arange(min(length, ring), device=device)
    return i + ring * ((length - 1 - i) // ring)


@register_layout
class HybridCache(KVCache):
    """No options: the model's config says which layers slide and how far."""

    name = "hybrid"
    dense = True
    reserves_run_length = True  # on its full-attention layers
    for_sliding_models = True
    colour = "#a50026"

    @classmethod
    def layer_slots(cls, cfg: ModelConfig, n_tokens: int) -> list[int]:
        """Sliding layers hold at most their window; full layers every position."""
        return [n_tokens if w is None else min(n_tokens, w) for w in map(cfg.window_of, range(cfg.n_layer))]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.cfg
        self.windows = [c.window_of(i) for i in range(c.n_layer)]  # None: a full layer
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for w in self.windows:
            slots = self.max_len if w is None else min(w, self.max_len)
            shape = (self.batch_size, c.n_kv_head, slots, c.head_dim)  # (B, nkv, slots, hd)
            self.k.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
        self._slots: dict[tuple[int, int], torch.Tensor] = {}  # (length, ring) -> ring_slots, shared by layers

    def ring_size(self, layer: int) -> int | None:
        """Slots of `layer`'s ring, or None for a full layer."""
        return None if self.windows[layer] is None else self.k[layer].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The KVCache interface; on a sliding layer the keys come in ring order (use update_with_slots)."""
        k_all, v_all, _ = self.update_with_slots(layer, k, v, start)
        return k_all, v_all

    def update_with_slots(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, nkv, T, hd) at slots [start, start + T); return the keys and values to attend over and
        their slots: None on a full layer (slots [0, start + T)), else a (S,) long tensor."""
        end = self._check_write(layer, k, start, capacity=self.max_len)
        T = end - start
        k_buf, v_buf = self.k[layer], self.v[layer]
        R = self.ring_size(layer)
        if R is None:  # a full layer: the static cache
            k_buf.narrow(2, start, T).copy_(k)
            v_buf.narrow(2, start, T).copy_(v)
            return k_buf.narrow(2, 0, end), v_buf.narrow(2, 0, end), None
        if T == 1:  # a decode step: write, then the ring holds exactly this query's window
            slot = start % R
            k_buf[:, :, slot] = k[:, :, 0]
            v_buf[:, :, slot] = v[:, :, 0]
            n = min(end, R)
            return k_buf[:, :, :n], v_buf[:, :, :n], self._ring_slots(end, R)
        # Several tokens: attend over what the ring held before (its slots) and the new keys, then keep the last R.
        new_slots = torch.arange(start, end, device=self.device)
        if start == 0:
            k_all, v_all, slots = k, v, new_slots
        else:
            n = min(start, R)
            k_all = torch.cat([k_buf[:, :, :n], k], dim=2)
            v_all = torch.cat([v_buf[:, :, :n], v], dim=2)
            slots = torch.cat([self._ring_slots(start, R), new_slots])
        keep = min(T, R)
        where = new_slots[T - keep :] % R
        k_buf[:, :, where] = k[:, :, T - keep :]
        v_buf[:, :, where] = v[:, :, T - keep :]
        return k_all, v_all, slots

    def _ring_slots(self, length: int, ring: int) -> torch.Tensor:
        key = (length, ring)
        if key not in self._slots:
            if len(self._slots) > 8:
                self._slots.clear()
            self._slots[key] = ring_slots(length, ring, self.device)
        return self._slots[key]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of `layer`, in slot order (a ring is unrolled: oldest kept key first)."""
        end, R = self.lengths[layer], self.ring_size(layer)
        if R is None:
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        order = ring_slots(end, R, self.device).argsort()
        return self.k[layer][:, :, order], self.v[layer][:, :, order]

    def held_tokens(self, layer: int) -> int:
        """Positions per sequence `layer` holds now: all written on a full layer, at most the ring on a sliding one."""
        R = self.ring_size(layer)
        return self.lengths[layer] if R is None else min(self.lengths[layer], R)

    def used_bytes(self) -> int:
        """Bytes of the slots holding tokens: every position written on a full layer, at most the ring on a sliding
        one."""
        held = sum(self.held_tokens(layer) for layer in range(self.cfg.n_layer))
        return held * self.batch_size * slot_bytes(self.cfg, self.dtype)

    @classmethod
    def used_bytes_after(
        cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, batch_size: int = 1, **options: Any
    ) -> int:
        """After n tokens: n slots on a full layer, min(n, window) on a sliding one (the base class's contract)."""
        formula_options(cls, cfg, n_tokens, dtype, batch_size, options)
        slots = sum(n_tokens if w is None else min(n_tokens, w) for w in map(cfg.window_of, range(cfg.n_layer)))
        return slots * batch_size * slot_bytes(cfg, dtype)
