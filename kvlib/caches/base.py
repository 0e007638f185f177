"""KV-cache layouts behind one small interface.

Every layout stores, per layer, keys and values of shape (B, n_kv_head, T, head_dim) and answers one call:

    keys, values = cache.update(layer, k_new, v_new, start)

which stores the new entries at slots [start, start + T) and returns the keys and values attention should use.
`start` is explicit (as in gpt-fast), never a hidden counter, and every layout checks it: writing anywhere but
the next free slot, or past the capacity, raises instead of silently attending to the wrong tokens.

Layouts register themselves by name, so callers (decoding, the harness, the notebooks) choose one with a string.
Each layout also says what it holds: `used_bytes()` on a cache, and `used_bytes_after(cfg, n_tokens, ...)`, the same
rule without a cache; callers ask, they never work bytes out from a layout's name.

One concept in one file (over 400 lines): the KVCache interface, the facts a layout declares, the registry, and the
two basic layouts.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError


class CacheOverflowError(KvlibError):
    """A write past a cache's capacity (the classic off-by-one of preallocated caches)."""


class KVCache(ABC):
    name: ClassVar[str]
    exact: ClassVar[bool] = True  # lossy layouts (quantized, windowed) set False and report their error instead
    # True for a layout that keeps an arbitrary subset of the slots written and knows each kept key's slot (the
    # eviction policies): a model masks by slot through `visible_mask`, so the layout composes with sliding windows
    keeps_positions: ClassVar[bool] = False
    # Eviction policies that score keys by the attention they receive (kvlib.caches.eviction) set True: attend then
    # hands them the attention weights after each write. False costs nothing (one attribute read per layer).
    needs_attention: ClassVar[bool] = False
    # True for a layout that drops tokens once a sequence outgrows what it holds (the window, the eviction policies):
    # it takes a token budget (`with_budget`, `held_budget`), and the pass-key probe asks it the question settings
    evicts: ClassVar[bool] = False
    # False for a layout that refuses a multi-token write after the prompt (chunked prefill): a question after the
    # context is then fed to it one token per step
    chunked_writes: ClassVar[bool] = True
    # True for a layout that holds exactly one full-precision slot per position it holds or reserves, so its bytes
    # equal the dense formula (kvlib.measure.memory); a block pool (whole blocks) or integer codes do not
    dense: ClassVar[bool] = False
    # True for a layout preallocated to the run's whole length (prompt + new tokens) on every full-attention layer
    reserves_run_length: ClassVar[bool] = False
    # True for a layout made for models with sliding-window layers of their own; on any other model it is the static
    # cache, so comparisons of layouts leave it out there
    for_sliding_models: ClassVar[bool] = False
    # What a lossy layout does to the tokens it does not hold exactly ("quantized", "evicted"); None when exact
    loses: ClassVar[str | None] = None
    # What a decode step pays for on top of the plain cache's attention ("gathering its blocks"); None: nothing
    step_overhead: ClassVar[str | None] = None
    # The layout's colour in every figure; None takes one from the palette rule (kvlib.study.plotting.color), so a
    # new layout has a colour of its own without editing a table
    colour: ClassVar[str | None] = None

    # ---- facts a caller asks instead of testing a layout's name ---------------------------------------------------

    @classmethod
    def label(cls, options: Mapping[str, Any] | None = None) -> str:
        """A short name for the layout with these options, as tables and figures show it ("window 4+252", "int4
        kivi r32 g32"); the layout's name unless it says more."""
        return cls.name

    @classmethod
    def option(cls, options: Mapping[str, Any] | None, key: str) -> Any:
        """The value of option `key` in `options`, or the layout's default for it (its constructor's, the one place
        a default is written); None when the layout has no such option."""
        options = options or {}
        return options[key] if key in options else dict(_options_of(cls)).get(key)

    @classmethod
    def with_budget(cls, options: Mapping[str, Any], budget: int) -> dict[str, Any]:
        """`options` with a token budget (tokens per sequence held at most) applied. This default: a layout that does
        not evict takes no budget (KvlibError); evicting layouts say how a budget maps onto their options."""
        evicting = ", ".join(n for n, c in CACHE_LAYOUTS.items() if c.evicts)
        raise KvlibError(f"cache {cls.name!r} does not evict, so it takes no --budget; layouts that do: {evicting}")

    @classmethod
    def held_budget(cls, options: Mapping[str, Any] | None = None) -> int | None:
        """Tokens per sequence the layout keeps at most with these options (None: it does not evict)."""
        return None

    @classmethod
    def protected_sinks(cls, options: Mapping[str, Any] | None = None) -> int:
        """The first tokens of a sequence the layout never evicts (attention sinks); 0 for none."""
        return 0

    @classmethod
    def one_pass(cls, n_tokens: int, options: Mapping[str, Any] | None, device: torch.device | str) -> OnePass | None:
        """What a cache of this layout shows each query when a text of `n_tokens` tokens is read token by token
        (teacher forcing: one prompt token, then one token per step), as one attention pattern over the whole
        text, so that a one-pass forward gives the same perplexity (kvlib.measure.perplexity, method "fast").
        None: no such pattern (the pass must go token by token). Exact layouts: the causal mask."""
        if not cls.exact:
            return None
        return OnePass(causal_mask(n_tokens, device))

    @classmethod
    def layer_slots(cls, cfg: ModelConfig, n_tokens: int) -> list[int]:
        """Slots each layer holds for one sequence once `n_tokens` positions were written (dense: all of them)."""
        return [n_tokens] * cfg.n_layer

    def release(self, row: int) -> None:
        """Sequence `row` of the batch has ended: free its slots where the layout can (paged), else keep them (this
        default: nothing to free)."""
        return None

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        where = f"{self.name} cache:"
        if not isinstance(cfg, ModelConfig):
            raise checks.fail("cfg", cfg, "a kvlib.core.config.ModelConfig", where)
        self.cfg = cfg
        self.batch_size = checks.whole("batch_size", batch_size, where=where)
        self.max_len = checks.whole("max_len", max_len, where=where)
        self.device = checks.torch_device("device", device, where=where)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise checks.fail("dtype", dtype, "a floating-point torch.dtype (torch.float32, ...)", where)
        self.dtype = dtype
        self.lengths = [0] * cfg.n_layer  # slots written so far, per layer
        refuse_on_hybrid(type(self), cfg)

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

    def decode_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor | None:
        """A decode step's write and attention in one, for a layout that attends over what it stores without
        handing back full-precision keys and values (the int8 cache: scores from its codes). q (B, nh, 1, hd), k
        and v (B, nkv, 1, hd), no mask, scale 1/sqrt(hd); returns (B, nh, 1, hd), or None *before writing
        anything* when it does not apply (then `attend` calls `update`). This default: None."""
        return None

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds, so that its memory can be counted from the tensors themselves."""

    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds now (reserved, not only filled)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def used_bytes(self) -> int:
        """Bytes of keys and values holding tokens now, every sequence of the batch: the slots written, without
        reserved-but-empty slots or bookkeeping. This default is the dense rule (every layer keeps every slot
        written); a layout that keeps fewer slots or stores them otherwise (a ring, integer codes, an eviction
        budget, a block pool) overrides it, and `used_bytes_after` with it."""
        return sum(self.lengths) * self.batch_size * slot_bytes(self.cfg, self.dtype)

    def lossy_tokens(self) -> int:
        """Tokens per sequence this cache does not hold exactly now (quantized or evicted); 0 for an exact layout,
        and for a lossy one that has lost nothing yet, which then behaved exactly in its run. Lossy layouts override
        it with their own count; this default counts every stored token of a lossy layout that has none."""
        return 0 if type(self).exact else self.seq_len

    @classmethod
    def used_bytes_after(
        cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, batch_size: int = 1, **options: Any
    ) -> int:
        """What `used_bytes()` reports once `n_tokens` positions of each of `batch_size` sequences are written (as a
        prompt or one at a time; no padding, a cache of at least n_tokens slots), from the layout's own rule and
        options, without making a cache. For a computation that never fills a cache but must say what the layout
        would hold (the perplexity command's one-pass method); tests/test_field_bytes_held.py checks it against
        `used_bytes()` for every registered layout. This default is the dense rule of `used_bytes`."""
        formula_options(cls, cfg, n_tokens, dtype, batch_size, options)
        return n_tokens * batch_size * cfg.kv_bytes_per_token(dtype.itemsize)

    @abstractmethod
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of `layer`, filled slots only, as (B, n_kv_head, T, head_dim)."""

    def visible_mask(self, layer: int, mask: torch.Tensor, n_head: int) -> torch.Tensor:
        """The attention mask over the keys the last `update` of `layer` returned, from `mask` (B or 1, 1, T,
        slots) over cache slots, for a layout that returns fewer keys than slots written. Layouts that cannot say
        which slot each returned key holds raise a KvlibError (this default)."""
        raise KvlibError(
            f"{self.name} cache returned fewer keys than the {mask.shape[-1]} slots written: it cannot be used "
            "with left padding (attention_mask) or a multi-token write after the prompt"
        )


@dataclass(frozen=True)
class OnePass:
    """The attention pattern of a cache over a whole text read token by token, for a one-pass forward.

    allowed: (T, T) bool, query i sees key j. sink_positions: (T,) long or None, the position each query's sinks
    are scored at when the layout moves them (the window with positions="cache"); sinks: how many keys are sinks.
    codes_where: (T, T) bool or None, where query i sees key j as the layout's integer codes rather than at full
    precision; fake_quantized(k, v) -> (k, v): keys and values (B, nkv, T, hd) as the layout would hold them as codes.
    """

    allowed: torch.Tensor
    sink_positions: torch.Tensor | None = None
    sinks: int = 0
    codes_where: torch.Tensor | None = None
    fake_quantized: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def sink_window_mask(T: int, sink: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool: query i sees key j when j <= i and (j < sink or j > i - window) (a sink-window cache's
    contract, read token by token; sink 0, window T is the causal mask)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & ((j < sink) | (j > i - window))


def causal_mask(T: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool: query i sees key j when j <= i (what an exact cache shows each query)."""
    return sink_window_mask(T, 0, T, device)


def slot_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one slot of one layer of one sequence: K and V, n_kv_head x head_dim each (the config's bytes per
    token of a full cache, ModelConfig.kv_bytes_per_token, over its layers)."""
    return cfg.kv_bytes_per_token(dtype.itemsize) // cfg.n_layer


def formula_options(
    cls: type[KVCache],
    cfg: ModelConfig,
    n_tokens: int,
    dtype: torch.dtype,
    batch_size: int,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The arguments of a `used_bytes_after` formula checked, and its options checked as the layout checks them (by
    making a one-slot cache of it: names, values and the compose/refuse rule, raising the layout's own
    KvlibError); returns the options with the layout's defaults for the rest."""
    checks.whole("n_tokens", n_tokens, minimum=0, where=f"{cls.name} cache:")
    make_cache(cls.name, cfg, batch_size, 1, "cpu", dtype, **options)
    return {**dict(_options_of(cls)), **options}


def refuse_on_hybrid(cls: type[KVCache], cfg: ModelConfig, options: Mapping[str, Any] | None = None) -> None:
    """The compose/refuse rule for models trained with sliding-window layers (Gemma 3): exact layouts work
    (they return every key at its slot, and the model masks each sliding layer's window itself); lossy ones
    (window, quantized) refuse with one line, because their kept keys are not at known slots (window) or they
    would approximate layers whose exact cache is already small (the hybrid layout keeps only the window).
    Eviction policies (`keeps_positions`) compose: each kept key's slot is known, so the model still hides keys
    outside a sliding layer's window. With `options`, a window layout larger than the model's own window says so."""
    if not cfg.is_hybrid or cls.exact or cls.keeps_positions:
        return
    n_sliding = sum(cfg.window_of(i) is not None for i in range(cfg.n_layer))
    why = ""
    defaults = dict(_options_of(cls))
    if options is not None and "window" in defaults:
        kept = options.get("window", defaults["window"]) + options.get("sink", defaults.get("sink", 0))
        if isinstance(kept, int) and kept > cfg.sliding_window:
            why = f"its {kept} kept keys (sink + window) are more than the model's own window; "
    raise KvlibError(
        f"{cls.name} cache: {cfg.name} already attends over a sliding window of {cfg.sliding_window} keys on "
        f"{n_sliding} of {cfg.n_layer} layers; {why}the lossy {cls.name} layout does not compose with it "
        "(use hybrid, exact and windowed, or dynamic/static/paged)"
    )


CACHE_LAYOUTS: dict[str, type[KVCache]] = {}
# The exact layout every other is judged against (its tokens, logits and bytes are the baseline of comparisons)
REFERENCE = "static"


def layout_class(name: str) -> type[KVCache]:
    """The registered layout class of this name (KvlibError naming the choices for an unknown one)."""
    check_layout(name)
    return CACHE_LAYOUTS[name]


def evicts(name: str) -> bool:
    """Whether `name` is a registered layout that drops tokens (its `evicts` fact); False for anything else (a cache
    mode such as "none", another engine's cache)."""
    return name in CACHE_LAYOUTS and CACHE_LAYOUTS[name].evicts


def evicting_layouts() -> tuple[str, ...]:
    """The registered layouts that drop tokens under a budget, in registration order (the window and the eviction
    policies): what the pass-key probe and the eviction pages sweep."""
    return tuple(n for n, c in CACHE_LAYOUTS.items() if c.evicts)


def register_layout(cls: type[KVCache]) -> type[KVCache]:
    CACHE_LAYOUTS[cls.name] = cls
    return cls


@register_layout
class DynamicCache(KVCache):
    """Grows by concatenation at every step, like Hugging Face's DynamicCache: simple, but each step copies the
    whole cache into a new tensor (O(length) work and allocator churn per step)."""

    name = "dynamic"
    dense = True
    colour = "#e69f00"

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
    dense = True
    reserves_run_length = True
    colour = "#0173b2"

    @classmethod
    def label(cls, options: Mapping[str, Any] | None = None) -> str:
        return "full (static)"

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


BASE_ARGUMENTS = ("self", "cfg", "batch_size", "max_len", "device", "dtype")  # every layout's; not options


def layout_options(layout: str | type[KVCache]) -> dict[str, Any]:
    """The options a layout takes (its constructor's keyword arguments after the common ones) and their defaults,
    read from the constructor itself, so a new layout is described without being listed anywhere."""
    if isinstance(layout, str):
        check_layout(layout)
        layout = CACHE_LAYOUTS[layout]
    return dict(_options_of(layout))


@functools.cache  # inspect.signature takes tens of microseconds, and make_cache runs inside the TTFT clock
def _options_of(cls: type[KVCache]) -> tuple[tuple[str, Any], ...]:
    found: dict[str, Any] = {}
    for klass in cls.__mro__:  # a constructor taking **kwargs passes them on to its parent's
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name not in BASE_ARGUMENTS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                found.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return tuple(found.items())


def check_layout(layout: Any, options: Mapping[str, Any] | None = None, name: str = "cache") -> dict[str, Any]:
    """Refuse an unknown layout, options that are not a mapping, or an option the layout does not have (before
    any work); returns the options as a dict. The layout checks the options' values when it is made."""
    if not isinstance(layout, str) or layout not in CACHE_LAYOUTS:
        raise KvlibError(f"unknown cache layout {layout!r}; choose one of {', '.join(CACHE_LAYOUTS)}")
    allowed = [k for k, _ in _options_of(CACHE_LAYOUTS[layout])]
    return checks.options(f"{name}_options", options, allowed, where=f"cache layout {layout!r}")


def make_cache(
    layout: str,
    cfg: ModelConfig,
    batch_size: int,
    max_len: int,
    device: torch.device | str,
    dtype: torch.dtype,
    **options: object,
) -> KVCache:
    """A cache of the named layout for `batch_size` sequences of at most `max_len` positions; `options` are the
    layout's own (`layout_options(layout)`), checked by name here and by value by the layout."""
    check_layout(layout, options)
    if isinstance(cfg, ModelConfig):
        refuse_on_hybrid(CACHE_LAYOUTS[layout], cfg, options)
    return CACHE_LAYOUTS[layout](cfg, batch_size, max_len, device, dtype, **options)
