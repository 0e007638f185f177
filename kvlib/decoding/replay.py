"""One prefill, replayed into every layout: the pass-key grid's way of not prefilling the same prompts once per layout.

Every layout prefills a prompt attending to all of it (the layouts' contract: the prompt's own
keys at full length, compression after), so the prefill's computation is the same for every layout and budget;
only what the cache keeps differs. `record_prefill` therefore runs each batch of prompts once through a static
cache, recording the inputs of every module that wrote to the cache (the attention modules), and `replay` calls
those modules again, in order, with the same inputs and a fresh cache of another layout: the layout sees exactly
the writes (and, for the policies that score by attention, exactly the attention) of a real prefill, at a fraction
of its cost (no MLPs, no norms, no LM head, and no attention output: `outputs_unused`). For question-after, the
replay stops at the end of the context (attention is causal, so the context's part of the prompt's prefill is the
context's own prefill; everything a recorded call received along its positions is cut with them, `_swap`), and
the question runs through the model as a second chunk. tests/test_passkey.py checks that replayed answers equal
`kvlib.measure.passkey.answer`'s, token for token, with the same keys and values kept: bit for bit for a whole
prompt; for question-after up to float rounding (the context's rows of a longer prefill sum in another order than
the context's own prefill), so a near-tie between two tokens or two kept keys could, rarely, go the other way.

Several budgets of one policy share one replay (`replayed_answers`): a replay writes into an empty cache, so each
layer's write is the whole prompt (or context) and the attention its keys receive does not depend on how many the
cache will keep; one attention pass is computed for the first cache and its writes and observations are handed to
the others (`_Tee`), each of which then evicts to its own budget. Tests prove the kept keys equal separate replays'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvlib.caches.base import REFERENCE, KVCache, evicts, layout_class, make_cache
from kvlib.decoding.questions import Answers, decode_answer, model_dtype, question_chunk
from kvlib.models.attention import outputs_unused
from kvlib.models.fastpath import prepare_for_inference


@dataclass
class Recorded:
    """One prefill of `ids` (B, N) through a static cache: each cache-writing module's inputs, in call order."""

    ids: torch.Tensor  # (B, N)
    calls: list[tuple[torch.nn.Module, tuple, dict]]
    logits: torch.Tensor  # (B, V): the prefill's last-position logits (identical for every layout)
    cache: KVCache  # the static cache it filled (room for N + new_tokens)
    time_s: float


def _innermost(calls: list[tuple[torch.nn.Module, tuple, dict]]) -> list[tuple[torch.nn.Module, tuple, dict]]:
    """The calls of modules none of whose submodules also wrote to the cache (the attention modules, not the blocks
    or the model around them)."""
    mods = {id(m) for m, _, _ in calls}
    return [c for c in calls if not any(id(s) in mods for s in c[0].modules() if s is not c[0])]


@torch.inference_mode()
def record_prefill(model: Any, ids: torch.Tensor, new_tokens: int) -> Recorded:
    """Prefill `ids` (B, N) through a static cache, recording the inputs of every module called with the cache."""
    B, N = ids.shape
    prepare_for_inference(model, B)
    t0 = time.perf_counter()
    kv = make_cache(REFERENCE, model.cfg, B, N + new_tokens, ids.device, model_dtype(model))
    calls: list[tuple[torch.nn.Module, tuple, dict]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if any(a is kv for a in (*args, *kwargs.values())):
            calls.append((module, args, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        positions = torch.arange(N, device=ids.device).expand(B, N)
        logits = model(ids, positions, kv, 0)[:, -1]
    finally:
        for h in handles:
            h.remove()
    return Recorded(ids, _innermost(calls), logits, kv, time.perf_counter() - t0)


def _swap(value: Any, old: KVCache, new: KVCache, n: int, upto: int) -> Any:
    """A recorded input for the replay, for the first `upto` of its n positions: the cache swapped; everything
    that runs along the positions cut with them: a tensor along the sequence (dim 1 of length n), an attention
    mask over queries x keys (B or 1, 1, n, n), a model's per-call masks (Gemma 3's `Masks`, cut by `first`)."""
    if value is old:
        return new
    if upto >= n:
        return value
    if hasattr(value, "first") and getattr(value, "T", None) == n:
        return value.first(upto)
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] == 1 and value.shape[-2:] == (n, n):
        return value[..., :upto, :upto]
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n:
        return value[:, :upto]
    return value


@torch.inference_mode()
def replay(rec: Recorded, cache: KVCache, upto: int | None = None) -> None:
    """Write the recorded prefill of the first `upto` positions (all: None) into `cache`, as a real prefill would.

    A layout that scores by attention (`needs_attention`) gets the attention modules called again with their
    recorded inputs, so that `attend` hands it the same attention weights; any other layout only ever sees
    `update` during a prefill, so it is given the keys and values the static cache received, layer by layer."""
    n = rec.ids.shape[1]
    upto = n if upto is None else upto
    if not cache.needs_attention:
        for layer in range(rec.cache.cfg.n_layer):
            k, v = rec.cache.layer_kv(layer)  # (B, nkv, >= n, hd): what the prefill wrote
            cache.update(layer, k[:, :, :upto], v[:, :, :upto], 0)
        return
    with outputs_unused():  # only the cache's writes and observations count: no attention output is computed
        for module, args, kwargs in rec.calls:
            module(
                *(_swap(a, rec.cache, cache, n, upto) for a in args),
                **{k: _swap(v, rec.cache, cache, n, upto) for k, v in kwargs.items()},
            )


class _Tee:
    """A cache stand-in for one replay into several caches of one layout that differ only in budget: the model
    sees `lead` (its kept keys, masks and the queries it observes), and every write (`update`) and observation
    (`observe`) is also handed to each of `followers`, which evict to their own budgets. Valid only for a replay
    into empty caches, whose writes and received attention do not depend on the budget (`replay_all` checks)."""

    def __init__(self, lead: KVCache, followers: list[KVCache]) -> None:
        self._lead, self._followers = lead, followers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lead, name)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        for c in self._followers:
            c.update(layer, k, v, start)
        return self._lead.update(layer, k, v, start)

    def observe(self, layer: int, received: torch.Tensor | None) -> None:
        self._lead.observe(layer, received)
        for c in self._followers:
            c.observe(layer, received)


@torch.inference_mode()
def replay_all(rec: Recorded, caches: list[KVCache], upto: int | None = None) -> None:
    """`replay` into each of `caches` (fresh caches of one layout whose options differ only in the budget: the
    caller's promise, `replayed_answers` checks it): a layout that scores by attention gets one attention pass for
    all of them (`_Tee`), any other is given the recorded writes one cache after another. Raises ValueError for
    caches of different layouts or not empty (one already written to would receive attention over keys it does
    not hold)."""
    if not caches:
        return
    lead = caches[0]
    if len({type(c) for c in caches}) > 1 or any(any(c.lengths) for c in caches):
        raise ValueError("replay_all: fresh caches of one layout (only the budget may differ)")
    if not lead.needs_attention or len(caches) == 1:
        for c in caches:
            replay(rec, c, upto)
        return
    replay(rec, _Tee(lead, caches[1:]), upto)  # type: ignore[arg-type]  # the model only uses the cache's interface


@torch.inference_mode()
def replayed_answer(
    model: Any, rec: Recorded, context_len: int, cache: str, options: dict[str, Any], question_aware: bool,
    new_tokens: int,
) -> Answers:  # fmt: skip
    """The greedy continuations of the recorded prompts through a fresh cache of the named layout:
    `kvlib.measure.passkey.answer` without running the prefill again (its time excludes the prefill)."""
    return replayed_answers(model, rec, context_len, cache, [options], question_aware, new_tokens)[0]


@torch.inference_mode()
def replayed_answers(
    model: Any, rec: Recorded, context_len: int, cache: str, options: list[dict[str, Any]], question_aware: bool,
    new_tokens: int,
) -> list[Answers]:  # fmt: skip
    """`replayed_answer` for each of `options` (one layout's options at several budgets), the replay shared
    (`replay_all`: one attention pass for them all); each cache then takes the question (question-after) and
    decodes on its own. Each answer's time_s is its share of the replay plus its own question and decoding."""
    others = {tuple(sorted((k, repr(v)) for k, v in o.items() if k != "budget")) for o in options}
    if layout_class(cache).needs_attention and len(others) > 1:  # one attention pass serves only budgets apart
        raise ValueError(f"replayed_answers: options that differ in more than the budget: {options}")
    B, N = rec.ids.shape
    t0 = time.perf_counter()
    dtype = model_dtype(model)
    kvs = [make_cache(cache, model.cfg, B, N + new_tokens, rec.ids.device, dtype, **o) for o in options]
    upto = None if question_aware or not evicts(cache) else context_len
    replay_all(rec, kvs, upto)
    shared = (time.perf_counter() - t0) / len(kvs)
    answers = []
    for kv in kvs:
        t1 = time.perf_counter()
        logits = rec.logits if upto is None else question_chunk(model, kv, rec.ids, context_len)
        out = decode_answer(model, kv, logits, N, new_tokens)
        answers.append(Answers(out, kv.used_bytes(), shared + time.perf_counter() - t1, kv))
    return answers
