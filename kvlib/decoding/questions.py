"""A context, then a question: the decoding procedures of the pass-key probe, for any layout.

- `prefill_then`: fill a fresh cache with a context and then a question, in one of two settings (question-after:
  the context is a write of its own, so an evicting layout compresses it before the question arrives;
  question-aware: one write); `answer_greedily` continues greedily after it.
- `answer`: the probe's greedy answers to prompts whose first tokens are the context, through a fresh cache of a
  named layout (a layout that takes no multi-token write after the prompt reads the question one token per step);
  `question_chunk` and `decode_answer` are its two halves, which kvlib.study.passkey's replay reuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlib.caches.base import KVCache, evicts, make_cache
from kvlib.core import checks
from kvlib.core.errors import KvlibError
from kvlib.models.decode import check_inputs, decode_step, greedy
from kvlib.models.fastpath import prepare_for_inference

NEW_TOKENS = 8  # greedy tokens per answer, by default


@torch.inference_mode()
def prefill_then(
    model: Any, cache: KVCache, context_ids: torch.Tensor, question_ids: torch.Tensor, question_aware: bool = False
) -> torch.Tensor:
    """Fill `cache` with a context and then a question; return the logits after the question's last token (B, V).

    context_ids (B, C) and question_ids (B, Q) are token ids without padding (positions 0 .. C + Q - 1); the
    cache is fresh and has room for C + Q + the tokens to generate (`max_len`). Two settings:
    - question_aware=False (`--question-after`, kvpress's setting: the question arrives after compression): the
      context is one write, so an eviction policy compresses it to its budget before seeing the question; the
      question is then a second multi-token write (chunked prefill) over the kept tokens, and is compressed
      after it in turn. A layout that refuses chunked writes (the "window" layout) raises a KvlibError; use
      "streaming" for StreamingLLM.
    - question_aware=True (the papers' setting): context and question are one write, so the policy's scores
      (SnapKV's observation window, TOVA's last query, H2O's accumulated attention) see the question.
    Greedy decoding then continues with `kvlib.models.decode.decode_step` at slot C + Q (see `answer_greedily`).
    Raises KvlibError for ids that are not (B, n) token tensors of one batch size, or a cache already written.
    """
    check_inputs(model, context_ids, name="context_ids")
    check_inputs(model, question_ids, name="question_ids")
    if question_ids.shape[0] != context_ids.shape[0]:
        raise KvlibError(
            f"question_ids has {question_ids.shape[0]} sequences, context_ids {context_ids.shape[0]}: give one "
            "question per context"
        )
    if cache.seq_len != 0:
        raise KvlibError(f"prefill_then needs a fresh cache; this {cache.name} cache holds {cache.seq_len} positions")
    B, C = context_ids.shape
    Q = question_ids.shape[1]
    positions = torch.arange(C + Q, device=context_ids.device).expand(B, C + Q)
    if question_aware:
        ids = torch.cat([context_ids, question_ids], dim=1)
        return model(ids, positions, cache, 0)[:, -1]
    model(context_ids, positions[:, :C], cache, 0)  # compressed to the budget here, before the question
    return model(question_ids, positions[:, C:], cache, C)[:, -1]


@torch.inference_mode()
def answer_greedily(
    model: Any,
    cache: KVCache,
    context_ids: torch.Tensor,
    question_ids: torch.Tensor,
    max_new_tokens: int,
    question_aware: bool = False,
) -> torch.Tensor:
    """`prefill_then`, then greedy decoding of `max_new_tokens` tokens through `cache`; returns them (B, N).
    The cache needs `max_len` >= C + Q + max_new_tokens - 1 (the last token is never fed back)."""
    N = checks.whole("max_new_tokens", max_new_tokens)
    logits = prefill_then(model, cache, context_ids, question_ids, question_aware)
    B, P = context_ids.shape[0], context_ids.shape[1] + question_ids.shape[1]
    positions = torch.arange(P + N, device=context_ids.device).expand(B, P + N)
    out = torch.empty(B, N, dtype=torch.long, device=context_ids.device)
    out[:, 0] = greedy(logits)
    for i in range(1, N):
        out[:, i] = greedy(decode_step(model, out[:, i - 1 : i], P + i - 1, positions, cache, None))
    return out


@dataclass
class Answers:
    tokens: torch.Tensor  # (B, new_tokens) greedy continuations
    kv_bytes_held: int  # bytes of keys and values the cache holds at the end (all B sequences)
    time_s: float  # prefill(s) and decoding, cache creation included
    cache: KVCache | None = field(default=None, repr=False)  # the cache after the last token


def model_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in (its parameters'), for the caches made for it."""
    return next(model.parameters()).dtype


@torch.inference_mode()
def answer(
    model: Any,
    ids: torch.Tensor,
    context_len: int,
    cache: str,
    options: dict[str, Any],
    question_aware: bool,
    new_tokens: int = NEW_TOKENS,
) -> Answers:
    """Greedy continuations of prompts `ids` (B, N) whose first `context_len` tokens are the context, through a
    fresh cache of the named layout, in the question setting asked (ignored by layouts that do not evict)."""

    B, N = ids.shape
    prepare_for_inference(model, B)
    t0 = time.perf_counter()
    kv = make_cache(cache, model.cfg, B, N + new_tokens, ids.device, model_dtype(model), **options)
    if not evicts(cache) or question_aware:
        logits = model(ids, torch.arange(N, device=ids.device).expand(B, N), kv, 0)[:, -1]
    elif not kv.chunked_writes:  # the question one token per step
        model(ids[:, :context_len], torch.arange(context_len, device=ids.device).expand(B, context_len), kv, 0)
        logits = question_chunk(model, kv, ids, context_len)
    else:  # the two-chunk prefill
        logits = prefill_then(model, kv, ids[:, :context_len], ids[:, context_len:], question_aware=False)
    out = decode_answer(model, kv, logits, N, new_tokens)
    return Answers(out, kv.used_bytes(), time.perf_counter() - t0, kv)


def question_chunk(model: Any, cache: KVCache, ids: torch.Tensor, context_len: int) -> torch.Tensor:
    """The question (ids[:, context_len:]) after a context already in `cache`: one multi-token write, or, for a
    layout that takes none after the prompt (`chunked_writes` False: the window), one token per step. Returns the
    last logits (B, V)."""
    B, N = ids.shape
    positions = torch.arange(N, device=ids.device).expand(B, N)
    if cache.chunked_writes:
        return model(ids[:, context_len:], positions[:, context_len:], cache, context_len)[:, -1]
    for i in range(context_len, N):
        logits = decode_step(model, ids[:, i : i + 1], i, positions, cache, None)
    return logits


@torch.inference_mode()
def decode_answer(model: Any, cache: KVCache, logits: torch.Tensor, n_prompt: int, new_tokens: int) -> torch.Tensor:
    """Greedy decoding after a prompt of `n_prompt` tokens whose last logits (B, V) are given: (B, new_tokens)."""
    B = logits.shape[0]
    positions = torch.arange(n_prompt + new_tokens, device=logits.device).expand(B, n_prompt + new_tokens)
    out = torch.empty(B, new_tokens, dtype=torch.long, device=logits.device)
    out[:, 0] = greedy(logits)
    for i in range(1, new_tokens):
        out[:, i] = greedy(decode_step(model, out[:, i - 1 : i], n_prompt + i - 1, positions, cache, None))
    return out
