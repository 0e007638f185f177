"""KV-cache layouts behind one small interface.

Every layout stores, per layer, keys and values of shape (B, n_kv_head, T, head_dim) and answers one call:

    keys, values = cache.update(layer, k_new, v_new, start)

which stores the new entries at slots [start, start + T) and returns the keys and values attention should use.
`start` is explicit (as in gpt-fast), never a hidden counter, and every layout checks it: writing anywhere but
the next free slot, or past the capacity, raises instead of silently attending to the wrong tokens.

Layouts register themselves by name, so callers (decoding, the harness, the notebooks) choose one with a string.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvlib.config import KvlibError, ModelConfig


class CacheOverflowError(KvlibError):
    """A write past a cache's capacity (the classic off-by-one of preallocated caches)."""


class KVCache(ABC):
    name: ClassVar[str]
    exact: ClassVar[bool] = True  # lossy layouts (quantized, windowed) set False and report their error instead

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_len = max_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.lengths = [0] * cfg.n_layer  # slots written so far, per layer

    @property
    def seq_len(self) -> int:
        """Positions stored (those of the last layer, which is written last in a forward pass)."""
        return self.lengths[-1]

    def _check_write(self, layer: int, k: torch.Tensor, start: int, capacity: int | None) -> int:
        if start != self.lengths[layer]:
            raise KvlibError(
                f"{self.name} cache, layer {layer}: write at slot {start}, but the next free slot is "
                f"{self.lengths[layer]}"
            )
        end = start + k.shape[2]
        if capacity is not None and end > capacity:
            raise CacheOverflowError(
                f"{self.name} cache, layer {layer}: writing slots [{start}, {end}) overflows its {capacity} slots"
            )
        self.lengths[layer] = end
        return end

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, so that its memory can be counted from the tensors themselves."""

    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds now (reserved, not only filled)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @abstractmethod
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of `layer`, filled slots only, as (B, n_kv_head, T, head_dim)."""


CACHE_LAYOUTS: dict[str, type[KVCache]] = {}


def register_layout(cls: type[KVCache]) -> type[KVCache]:
    CACHE_LAYOUTS[cls.name] = cls
    return cls


@register_layout
class DynamicCache(KVCache):
    """Grows by concatenation at every step, like Hugging Face's DynamicCache: simple, but each step copies the
    whole cache into a new tensor (O(length) work and allocator churn per step)."""

    name = "dynamic"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.k: list[torch.Tensor | None] = [None] * self.cfg.n_layer
        self.v: list[torch.Tensor | None] = [None] * self.cfg.n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_write(layer, k, start, capacity=None)
        old_k, old_v = self.k[layer], self.v[layer]
        # contiguous() on the first write: k arrives as a view into the fused qkv projection and would keep it alive.
        self.k[layer] = k.contiguous() if old_k is None else torch.cat([old_k, k], dim=2)
        self.v[layer] = v.contiguous() if old_v is None else torch.cat([old_v, v], dim=2)
        return self.k[layer], self.v[layer]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.k, *self.v) if t is not None]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


@register_layout
class StaticCache(KVCache):
    """Preallocated to the final sequence length and written in place at explicit slots (as in gpt-fast and
    Hugging Face's StaticCache): no allocation while decoding; attention reads a view of the filled slots."""

    name = "static"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.cfg
        shape = (c.n_layer, self.batch_size, c.n_kv_head, self.max_len, c.head_dim)  # (L, B, n_kv, S_max, hd)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # One view per layer, made once: a decode step then writes and reads with `narrow` (one cheap call)
        # instead of parsing a 4-part index into the 5-d tensor twice per layer.
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # each (B, n_kv, S_max, hd)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._check_write(layer, k, start, capacity=self.max_len)
        k_all, v_all = self._k_layers[layer], self._v_layers[layer]
        k_all.narrow(2, start, end - start).copy_(k)  # in place: no allocation while decoding
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.lengths[layer]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def make_cache(
    layout: str,
    cfg: ModelConfig,
    batch_size: int,
    max_len: int,
    device: torch.device | str,
    dtype: torch.dtype,
    **options: object,
) -> KVCache:
    """A cache of the named layout for `batch_size` sequences of at most `max_len` positions."""
    try:
        cls = CACHE_LAYOUTS[layout]
    except KeyError:
        raise KvlibError(f"unknown cache layout {layout!r}; choose one of {', '.join(CACHE_LAYOUTS)}") from None
    return cls(cfg, batch_size, max_len, device, dtype, **options)
