"""Eviction policies as cache layouts under one token budget: StreamingLLM, H2O, TOVA, SnapKV and K-norm.

One mechanism, many scores (kvpress's design: a "press" is a score function behind a shared pruning step).
`EvictionCache` keeps, per layer and per sequence, at most `budget` tokens (the newest token included). A policy
is a subclass whose content is its score (and its docstring: the rule, the paper, what we changed); the lowest-
scoring unprotected tokens are the ones dropped. Scores are per key-value head unless the policy says otherwise,
so different heads may keep different positions. When tokens are dropped:

- a decode step (a one-token write after the prompt) first makes room: if `budget` tokens are held, the lowest-
  scoring one is dropped (by the scores known then), and the new token is appended, so attention sees at most
  `budget` keys, its own included. This is StreamingLLM's convention and the "window" layout's (sink + window
  slots, the newest included), so "streaming" equals "window" token for token (tests). The papers' own code
  appends first, attends over budget + 1 keys and evicts after: the same rule, one step earlier; their cache
  size is our budget - 1.
- a multi-token write attends over [kept + chunk] with a causal mask inside the chunk, and is then reduced to the
  budget: the prompt attends to all of itself (exactly, as in the papers' implementations); a later chunk (a
  question that arrives after the context was compressed) sees only what was kept.

Also:
- Positions: keys are cached after their position is applied (GPT-2 adds it to the input, Llama rotates keys), so
  a kept key keeps its original position and evicting is only dropping slots; nothing is re-rotated.
- Attention weights: H2O, TOVA and SnapKV set `needs_attention`; `kvlib.models.attention.attend` then computes,
  after its usual attention, the attention each key *received* from this write's last `observed_queries(layer)`
  queries, softmax(q k^T * scale) with the same mask, summed over those queries and over the query heads that
  share the key's key-value head, (B, nkv, S) float32, and hands it to `observe`. Layouts without the flag are
  untouched (attend checks one class attribute).
- Padding: the attention mask (over cache slots) is mapped onto the kept keys by their positions (`visible_mask`),
  so left-padded batches run and each sequence is scored on its own; but pad slots count as tokens (they may be
  kept and use budget, and streaming's sinks are the first slots). Compare policies one sequence at a time.
- The question settings of the pass-key probe (a context, then a question) are decoding procedures:
  kvlib.decoding.questions (`prefill_then`, `answer_greedily`).

Shapes: B batch, nkv key-value heads, n kept tokens, T new tokens of a write, S = n + T keys attended, hd head_dim.

One concept in one file (over 400 lines): eviction under a token budget, its one mechanism and its policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvlib.caches.base import CACHE_LAYOUTS, KVCache, OnePass, formula_options, register_layout, sink_window_mask
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError

POOLINGS = ("avg", "max")


class EvictionCache(KVCache):
    """A token budget and one eviction rule: keep the `budget` highest-scoring tokens per sequence and key-value
    head (see the module docstring for when); tokens at positions < `sink` and the newest `recent` positions are
    protected (never evicted). Not registered itself."""

    name = "eviction"
    exact = False  # lossy once a sequence outgrows the budget; exact, token for token, while it fits (tests)
    loses = "evicted"
    keeps_positions = True  # each kept key's slot is known: composes with a model's own sliding windows (Gemma 3)
    needs_attention: ClassVar[bool] = False
    evicts = True

    @classmethod
    def with_budget(cls, options: Mapping[str, Any], budget: int) -> dict[str, Any]:
        """`options` with `budget`; KvlibError for a budget its protected sinks alone would fill."""
        sink = cls.protected_sinks(options)
        if budget <= sink:
            raise KvlibError(
                f"--budget {budget} must exceed the {sink} sink tokens of {cls.name} (at least one recent token)"
            )
        return {**options, "budget": budget}

    @classmethod
    def held_budget(cls, options: Mapping[str, Any] | None = None) -> int | None:
        return cls.option(options, "budget")

    @classmethod
    def protected_sinks(cls, options: Mapping[str, Any] | None = None) -> int:
        return cls.option(options, "sink") or 0

    @classmethod
    def protected_recent(cls, options: Mapping[str, Any] | None = None) -> int:
        """How many of the newest positions a write never evicts, whatever their score (the `recent` of
        `_evict`): with `protected_sinks`, what the policy keeps unconditionally, so that a key kept outside
        both was kept by the policy's selection. This default: the newest token (TOVA, K-norm)."""
        return 1

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int,
        sink: int = 0,
        recent: int = 1,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype)
        where = f"{self.name} cache:"
        self.budget = checks.whole("budget", budget, minimum=1, where=where)
        self.sink = checks.whole("sink", sink, minimum=0, where=where)
        self.recent = checks.whole("recent", recent, minimum=0, where=where)
        if self.sink + self.recent > self.budget:
            raise KvlibError(
                f"{where} budget must be >= sink + recent (the protected tokens: {self.sink} + {self.recent}), "
                f"got budget={self.budget}"
            )
        L = cfg.n_layer
        # kept keys (B, nkv, n, hd): in order of position after a prompt; a decode step on a full cache writes its
        # token into the slot of the one it evicts, so `pos` says which position each slot holds
        self.k: list[torch.Tensor | None] = [None] * L
        self.v: list[torch.Tensor | None] = [None] * L
        self.pos: list[torch.Tensor | None] = [None] * L  # (B, nkv, n) int64: each kept token's original slot
        self.scores: list[torch.Tensor | None] = [None] * L  # (B, nkv, n) float32: the policy's running score
        self._attended_pos: list[torch.Tensor | None] = [None] * L  # positions of the keys the last write saw
        self._write: list[tuple[int, int]] = [(0, 0)] * L  # (start, T) of the last write per layer
        self._pending: list[bool] = [False] * L  # an attention-needing policy waiting for `observe`

    # ---- the mechanism ---------------------------------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending[layer]:
            raise KvlibError(
                f"{self.name} cache scores keys by the attention they receive: run the model through "
                "kvlib.models.attention.attend (it calls observe after each write); a write came without it"
            )
        B, nkv, T, _ = k.shape
        self._check_write(layer, k, start, capacity=self.max_len)
        new_pos = torch.arange(start, start + T, device=k.device).expand(B, nkv, T)  # (B, nkv, T)
        decode = T == 1 and start > 0 and self.k[layer] is not None
        if decode and self.pos[layer].shape[2] >= self.budget:
            # A decode step on a full cache: the new token takes the slot of the one evicted to make room for it,
            # in place (no copy of the kept tokens: what a real cache does). Kept tokens are then no longer in
            # order of position; `pos` says where each one came from, and attention does not depend on order.
            if self.k[layer].is_inference() and not torch.is_inference_mode_enabled():  # written under inference
                for held in (self.k, self.v, self.pos, self.scores):  # mode: copies that may be written outside it
                    held[layer] = held[layer].clone()
            gone = self._lowest(layer)  # (B, nkv, 1)
            self.k[layer].scatter_(2, gone[..., None].expand(B, nkv, 1, k.shape[-1]), k)
            self.v[layer].scatter_(2, gone[..., None].expand(B, nkv, 1, v.shape[-1]), v)
            self.pos[layer].scatter_(2, gone, new_pos)
            self.scores[layer].scatter_(2, gone, self.new_scores(layer, k, new_pos))
            self._after_write(layer, start, T)
            return self.k[layer], self.v[layer]
        if decode:
            self._evict(layer, self.budget - 1)  # a decode step: make room for the new token before attention
        new_scores = self.new_scores(layer, k, new_pos)  # (B, nkv, T)
        if self.k[layer] is None:  # copies of their own: decode steps write into them in place
            keys, values = (
                k.clone(memory_format=torch.contiguous_format),
                v.clone(memory_format=torch.contiguous_format),
            )
            pos, scores = new_pos.contiguous(), new_scores.contiguous()
        else:
            keys, values = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
            pos, scores = torch.cat([self.pos[layer], new_pos], dim=2), torch.cat([self.scores[layer], new_scores], 2)
        self.k[layer], self.v[layer], self.pos[layer], self.scores[layer] = keys, values, pos, scores
        self._after_write(layer, start, T)
        return keys, values  # (B, nkv, n + T, hd)

    def _after_write(self, layer: int, start: int, T: int) -> None:
        self._attended_pos[layer], self._write[layer] = self.pos[layer], (start, T)
        if self.needs_attention:
            self._pending[layer] = True  # evict in observe, once attention has run
        else:
            self._evict(layer)  # makes new tensors: the keys and values returned stay valid for this step's attention

    def _ranked(self, layer: int) -> torch.Tensor:
        """The scores of `layer`'s kept tokens with the protected ones (positions < sink and the newest `recent`
        positions written: >= lengths[layer] - recent) at +inf: (B, nkv, S)."""
        pos = self.pos[layer]
        protected = (pos < self.sink) | (pos >= self.lengths[layer] - self.recent)  # (B, nkv, S)
        return self.scores[layer].masked_fill(protected, float("inf"))

    def _lowest(self, layer: int) -> torch.Tensor:
        """(B, nkv, 1): the slot of the token to drop for one more (the lowest ranked, as `_evict(layer, n - 1)`
        drops; on an exact tie, the earliest position, a rule of our own: topk, which `_evict` uses, leaves ties
        unspecified)."""
        ranked = self._ranked(layer)
        low = ranked == ranked.amin(dim=2, keepdim=True)
        first = self.pos[layer].masked_fill(~low, torch.iinfo(torch.int64).max)  # earliest position among ties
        return first.argmin(dim=2, keepdim=True)

    def observed_queries(self, layer: int) -> int:
        """How many of the last write's queries (its last ones) `observe` needs the attention of; 0: none."""
        return 0

    def observe(self, layer: int, received: torch.Tensor | None) -> None:
        """After attention of the last write to `layer`: `received` (B, nkv, S) float32 is the attention each
        attended key received from the last `observed_queries(layer)` queries, summed over those queries and
        over the query heads sharing its key-value head (None when 0 queries were asked for). Updates the
        scores and evicts down to the budget."""
        if received is not None:
            self.scores[layer] = self.add_attention(layer, self.scores[layer], received)
        self._pending[layer] = False
        self._evict(layer)

    def new_scores(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Scores of newly written tokens (B, nkv, T); the policy's own rule. Default: zero."""
        return torch.zeros(pos.shape, dtype=torch.float32, device=pos.device)

    def add_attention(self, layer: int, scores: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """New scores from the attention received (policies with `needs_attention`)."""
        raise NotImplementedError

    def _evict(self, layer: int, n_keep: int | None = None) -> None:
        """Keep the `n_keep` (default: `budget`) highest-scoring tokens, protected ones first, in slot order.
        Protected: positions < sink and the newest `recent` positions written (those >= lengths[layer] - recent)."""
        n_keep = self.budget if n_keep is None else n_keep
        pos = self.pos[layer]
        if pos.shape[2] <= n_keep:
            return
        keep = self._ranked(layer).topk(n_keep, dim=2).indices.sort(dim=2).values  # (B, nkv, n_keep)
        rows = keep[..., None].expand(-1, -1, -1, self.cfg.head_dim)  # (B, nkv, n_keep, hd)
        self.k[layer] = self.k[layer].gather(2, rows)
        self.v[layer] = self.v[layer].gather(2, rows)
        self.pos[layer] = pos.gather(2, keep)
        self.scores[layer] = self.scores[layer].gather(2, keep)

    def visible_mask(self, layer: int, mask: torch.Tensor, n_head: int) -> torch.Tensor:
        """The attention mask over the kept keys: `mask` (B or 1, 1, T, slots) is over cache slots; its columns
        at each kept token's position, per key-value head, repeated for the query heads of the group:
        (B, n_head, T, S) bool."""
        pos = self._attended_pos[layer]  # (B, nkv, S)
        B, nkv, S = pos.shape
        T = mask.shape[2]
        cols = pos[:, :, None, :].expand(B, nkv, T, S)
        m = mask.expand(B, nkv, T, mask.shape[-1]).gather(3, cols)  # (B, nkv, T, S)
        return m.repeat_interleave(n_head // nkv, dim=1)  # (B, nh, T, S)

    # ---- the KVCache interface -------------------------------------------------------------------------------

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def layer_positions(self, layer: int) -> torch.Tensor | None:
        """The original slot of every kept token of `layer`, (B, nkv, n) int64 (None before the first write)."""
        return self.pos[layer]

    def tensors(self) -> list[torch.Tensor]:
        """Keys, values and the bookkeeping (positions, scores): everything an eviction policy holds."""
        return [t for group in (self.k, self.v, self.pos, self.scores) for t in group if t is not None]

    def kept_tokens(self) -> int:
        """Tokens per sequence held now (the last layer's count)."""
        return 0 if self.pos[-1] is None else self.pos[-1].shape[2]

    def lossy_tokens(self) -> int:
        """Tokens per sequence not held exactly: `evicted_tokens`."""
        return self.evicted_tokens

    @property
    def evicted_tokens(self) -> int:
        """Positions per sequence written but no longer kept; 0 while everything fits (the cache is then exact)."""
        return self.seq_len - self.kept_tokens()

    def used_bytes(self) -> int:
        """Bytes of the kept keys and values (without the bookkeeping; comparable with other layouts')."""
        return self.kept_tokens() * self.batch_size * self.cfg.kv_bytes_per_token(self.dtype.itemsize)

    @classmethod
    def used_bytes_after(
        cls, cfg: ModelConfig, n_tokens: int, dtype: torch.dtype, batch_size: int = 1, **options: Any
    ) -> int:
        """After n tokens: min(n, budget) kept on every layer, the policy's rule deciding only which (the base
        class's contract)."""
        o = formula_options(cls, cfg, n_tokens, dtype, batch_size, options)
        return min(n_tokens, o["budget"]) * batch_size * cfg.kv_bytes_per_token(dtype.itemsize)


# ---- the policies ------------------------------------------------------------------------------------------------


@register_layout
class StreamingCache(EvictionCache):
    """StreamingLLM as a budgeted policy: keep the first `sink` tokens (attention sinks) and the most recent
    budget - sink tokens. Score = position (the oldest non-sink token goes first).

    Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks". The same tokens as the
    "window" layout with window = budget - sink and positions="original" (tests); what differs is the
    mechanism (gather instead of a ring buffer), so that it also accepts chunked writes. Options: budget (256),
    sink (4)."""

    name = "streaming"
    colour = "#999933"  # the window layout's: the same tokens (tests)

    @classmethod
    def label(cls, options: Mapping[str, Any] | None = None) -> str:
        return f"streaming {cls.option(options, 'sink')}+{cls.option(options, 'budget') - cls.option(options, 'sink')}"

    @classmethod
    def protected_recent(cls, options: Mapping[str, Any] | None = None) -> int:
        """Everything but the sinks: the budget - sink newest positions."""
        return cls.option(options, "budget") - cls.protected_sinks(options)

    @classmethod
    def one_pass(cls, n_tokens: int, options: Mapping[str, Any] | None, device: torch.device | str) -> OnePass:
        """Read token by token it keeps the window layout's tokens (sink + the budget - sink newest): its mask."""
        sink = cls.option(options, "sink")
        return OnePass(sink_window_mask(n_tokens, sink, cls.option(options, "budget") - sink, device), None, sink)

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int = 256,
        sink: int = 4,
    ) -> None:
        where = "streaming cache:"
        budget = checks.whole("budget", budget, minimum=1, where=where)
        sink = checks.whole("sink", sink, minimum=0, where=where)
        if sink >= budget:
            raise KvlibError(f"{where} budget must be > sink ({sink}: at least one recent token), got {budget}")
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=sink, recent=budget - sink)

    def new_scores(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return pos.float()


@register_layout
class H2OCache(EvictionCache):
    """H2O (Heavy-Hitter Oracle): keep the `recent` newest tokens and, in the rest of the budget, the "heavy
    hitters", the tokens with the largest attention accumulated over every query that has seen them.

    Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models".
    Score of a key = sum, over every query since it was written (the whole prompt at prefill, then each decode
    step), of the attention it received, per key-value head (summed over the query heads of a GQA group; the
    paper's models have one query head per key-value head). As in the authors' implementation, the prompt is
    prefilled exactly and then reduced to the budget; at a decode step the token dropped is chosen by the
    scores accumulated up to the previous step (the authors evict after the step's attention, with the same
    scores: their heavy + recent sizes add up to our budget - 1). Options: budget (256), recent (None: half the budget,
    the paper's equal split between heavy hitters and recent tokens)."""

    name = "h2o"
    colour = "#332288"
    needs_attention = True

    @classmethod
    def protected_recent(cls, options: Mapping[str, Any] | None = None) -> int:
        """`recent`, by default half the budget."""
        recent = cls.option(options, "recent")
        return cls.option(options, "budget") // 2 if recent is None else recent

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int = 256,
        recent: int | None = None,
    ) -> None:
        where = "h2o cache:"
        budget = checks.whole("budget", budget, minimum=1, where=where)
        recent = budget // 2 if recent is None else checks.optional_whole("recent", recent, minimum=0, where=where)
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=0, recent=recent)

    def observed_queries(self, layer: int) -> int:
        return self._write[layer][1]  # every query of the write

    def add_attention(self, layer: int, scores: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        return scores + received


@register_layout
class TOVACache(EvictionCache):
    """TOVA (Token Omission Via Attention): after each write, while over budget, drop the tokens the current
    (last) query attends to least, with the attention averaged over all heads of the layer, so every head of a
    layer keeps the same tokens.

    Oren et al. 2024, "Transformers are Multi-State RNNs". Score = the last query's attention, mean over the
    layer's query heads; it is replaced at every write (TOVA keeps no history). What we changed: the newest
    token is always kept (as kvpress does; the paper may drop it, which rarely happens since a token attends
    strongly to itself), and a decode step drops the token the *previous* query attended least before attending
    (the paper attends over budget + 1 states, then drops; the same choice). At prefill the last prompt
    token's attention chooses the kept prompt tokens, as in the authors' implementation. Option: budget (256)."""

    name = "tova"
    colour = "#aa1177"
    needs_attention = True

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int = 256,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=0, recent=1)

    def observed_queries(self, layer: int) -> int:
        return 1

    def add_attention(self, layer: int, scores: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        mean = received.sum(dim=1, keepdim=True) / self.cfg.n_head  # (B, 1, S): mean over every query head
        return mean.expand_as(received).contiguous()


@register_layout
class SnapKVCache(EvictionCache):
    """SnapKV: at the end of the prompt, keep the positions most attended by the prompt's last `observation`
    queries (the observation window), after pooling the scores over neighbouring positions, per key-value head;
    the observation window itself is always kept.

    Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation". Score of a prompt key
    outside the window = its attention from the window's queries, mean over those queries and over the query
    heads of its GQA group (as kvpress does, after a discussion in SnapKV's repository), then pooled along the
    kept keys with a `kernel`-wide `pooling` ("avg" or "max"), stride 1, zero padding (SnapKV's avg_pool1d /
    max_pool1d). What we changed:
    - compression happens at the end of every multi-token write (and of a one-token prompt), with that write's
      last min(observation, T) queries as the window: a question written after a compressed context re-scores
      the kept keys with the question's queries, but cannot bring back what the first compression dropped;
    - decode: SnapKV compresses the prompt only and lets generated tokens grow the cache; to hold the budget,
      a decode step instead drops the lowest-scoring prompt key; generated tokens and the window score above
      every prompt key (1 + position), so they are dropped last, oldest first.
    Options: budget (256), observation (32, SnapKV's default window), kernel (5, odd), pooling ("avg")."""

    name = "snapkv"
    needs_attention = True
    colour = "#56b4e9"

    @classmethod
    def protected_recent(cls, options: Mapping[str, Any] | None = None) -> int:
        """The observation window (the last `observation` positions of a write)."""
        return cls.option(options, "observation")

    @classmethod
    def one_pass(cls, n_tokens: int, options: Mapping[str, Any] | None, device: torch.device | str) -> OnePass:
        """Read token by token (a one-token prompt, then decode steps) it drops the oldest key at every step and
        keeps no sinks: the window layout's tokens with no sinks and window = budget."""
        return OnePass(sink_window_mask(n_tokens, 0, cls.option(options, "budget"), device))

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int = 256,
        observation: int = 32,
        kernel: int = 5,
        pooling: str = "avg",
    ) -> None:
        where = "snapkv cache:"
        budget = checks.whole("budget", budget, minimum=1, where=where)
        self.observation = checks.whole("observation", observation, minimum=1, where=where)
        self.kernel = checks.whole("kernel", kernel, minimum=1, where=where)
        if self.kernel % 2 == 0:
            raise checks.fail("kernel", kernel, "an odd whole number >= 1 (the pooled scores keep their length)", where)
        self.pooling = checks.one_of("pooling", pooling, POOLINGS, where=where)
        if self.observation > budget:
            raise KvlibError(f"{where} budget must be >= observation ({self.observation}), got {budget}")
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=0, recent=self.observation)

    def _is_chunk(self, layer: int) -> bool:
        start, T = self._write[layer]
        return T > 1 or start == 0

    def observed_queries(self, layer: int) -> int:
        return min(self.observation, self._write[layer][1]) if self._is_chunk(layer) else 0

    def new_scores(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return pos.float() + 1.0  # above any prompt key's score (a mean of probabilities: <= 1)

    def add_attention(self, layer: int, scores: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        m = self.observed_queries(layer)
        group = self.cfg.n_head // self.cfg.n_kv_head
        pos = self.pos[layer]
        in_window = pos >= self.lengths[layer] - self.observation  # (B, nkv, S)
        mean = (received / (m * group)).masked_fill(in_window, 0.0)  # window keys: pooled as SnapKV's zero padding
        pooled = pool_scores(mean, self.kernel, self.pooling)
        return torch.where(in_window, pos.float() + 1.0, pooled)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's smoothing: (B, h, S) scores pooled along S, `kernel` wide (odd), stride 1, zero padding of
    kernel // 2 on each side; "avg" divides by `kernel` at the borders too (count_include_pad)."""
    B, h, S = scores.shape
    x = scores.reshape(B * h, 1, S)
    if pooling == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:  # max: zero padding is the same as none, the scores being >= 0
        y = F.max_pool1d(F.pad(x, (kernel // 2, kernel // 2)), kernel, stride=1)
    return y.reshape(B, h, S)


@register_layout
class KnormCache(EvictionCache):
    """K-norm: keep the keys of smallest L2 norm (a low-norm key tends to receive much attention).

    Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"; kvpress's
    KnormPress. Score = -||k|| of the cached (position-applied) key, per key-value head; it needs no attention
    weights. What we changed: kvpress compresses the prompt once; here every write is compressed to the budget,
    and the newest token is always kept. Option: budget (256)."""

    name = "knorm"
    colour = "#01665e"

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        budget: int = 256,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype, budget=budget, sink=0, recent=1)

    def new_scores(self, layer: int, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return -k.float().norm(dim=-1)  # (B, nkv, T)


def policies() -> tuple[str, ...]:
    """Every registered eviction policy (a subclass of EvictionCache), in registration order: what pages and
    parameter files mean by "all" policies, so a new policy is listed by registering it."""
    return tuple(n for n, c in CACHE_LAYOUTS.items() if issubclass(c, EvictionCache))


POLICIES: tuple[str, ...] = policies()  # the policies of this module (tests sweep them)
