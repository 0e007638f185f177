"""`python -m kvlib passkey`: does the model still remember a fact stated earlier, through a given cache?

The pass-key probe (Mohtashami & Jaggi 2023): an instruction line, filler text, the sentence "The pass key is
NNNNN. Remember it. NNNNN is the pass key." hidden at a depth of the filler, and the question "What is the pass
key? The pass key is" (kvlib.models.prompts.PasskeyPrompts builds them, exactly --tokens tokens each). The model
continues greedily for --new-tokens tokens (8) through the named cache layout.

Retrieval rule: a key is retrieved when its five digits appear, in order and together, in the decoded continuation
(`str(key) in text`, the rule of the pass-key evaluations of LongLoRA and kvpress). Accuracy is reported per depth
and overall with a 95% Wilson score interval.

Question settings (layouts that evict: "window" and the eviction policies of kvlib.caches.eviction):
- question-after (the default; kvpress's setting, the multi-turn case): the context (instruction, filler, key) is
  prefilled and compressed to the budget before the question arrives as a second chunk. The "window" layout takes
  no multi-token write after the prompt, so it reads the question one token per step (what a window does anyway).
- question-aware (the papers' setting): context and question are one prefill, so the policy's scores see the
  question.
In both, the prefill itself attends to the whole of its chunk (the layouts' contract), so the first answer token of
question-aware is computed with the full context; the later ones through what the cache kept. Layouts that do not
evict (static, dynamic, paged, quantized) ignore the setting (one prefill; recorded as "no eviction").
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch

from kvlib.caches.base import REFERENCE, evicts, layout_class, make_cache
from kvlib.caches.eviction import EvictionCache
from kvlib.core import checks
from kvlib.core.stats import wilson
from kvlib.decoding.questions import Answers, decode_answer
from kvlib.decoding.replay import record_prefill, replayed_answer, replayed_answers
from kvlib.measure.perplexity import FLAG_OPTIONS, PROVENANCE
from kvlib.models.prompts import PasskeyPrompt

SETTINGS = ("question-after", "question-aware")
NO_SETTING = "no eviction"  # layouts that do not evict: one prefill, the setting changes nothing
RULE = "retrieved: the key's five digits appear together in the greedy continuation"
# command-line flag -> layout option: the perplexity command's, and the eviction policies'
FLAGS = {**FLAG_OPTIONS, "recent": "recent", "observation": "observation", "kernel": "kernel", "pooling": "pooling"}
RANDOM_NOTE = "RANDOM WEIGHTS: a stand-in word tokenizer and a random model; this accuracy is meaningless"
CSV_COLUMNS = (
    "model",
    "weights",
    "weights_source",
    "filler",
    "tokens",
    "depth",
    "actual_depth",
    "key",
    "key_start",
    "cache",
    "options",
    "budget",
    "setting",
    "new_tokens",
    "continuation",
    "retrieved",
    "kv_bytes_held",
    "time_s",
    "seed",
    "device",
    "dtype",
    *PROVENANCE,
)


# ---- scoring -------------------------------------------------------------------------------------------------------


def retrieved(continuation: str, key: int) -> bool:
    """The retrieval rule: the key's digits appear together in the decoded continuation."""
    return str(key) in continuation


# ---- layouts, budgets and settings ---------------------------------------------------------------------------------


def budget_options(cache: str, options: dict[str, Any], budget: int | None) -> dict[str, Any]:
    """The layout's options with --budget applied, as the layout maps a budget onto its options
    (KVCache.with_budget: an eviction policy's `budget`; the window's sink + window). Raises KvlibError for a budget
    on a layout that does not evict, or one the layout refuses (given twice, filled by its sinks alone)."""
    if budget is None:
        return options
    checks.whole("budget", budget)
    return layout_class(cache).with_budget(options, budget)


def held_budget(cache: str, options: dict[str, Any]) -> int | None:
    """Tokens per sequence the layout keeps at most (None: it does not evict)."""
    return layout_class(cache).held_budget(options)


def setting_of(cache: str, question_aware: bool) -> str:
    """The question setting as recorded: "no eviction" for a layout that does not evict."""
    return SETTINGS[question_aware] if evicts(cache) else NO_SETTING


def protected_positions(cache: str, options: dict[str, Any], end: int) -> tuple[int, int]:
    """(sinks, first recent): once `end` positions were written, the layout keeps every position < sinks and
    every position >= first recent whatever it scores (its `protected_sinks` and `protected_recent`,
    kvlib.caches.eviction); what lies between is kept only if the policy selects it. A layout that evicts but is
    not an eviction policy (the window) holds nothing but its sinks and its newest tokens, so the whole of its
    budget is protected there; a layout that does not evict protects every position: (end, 0)."""
    cls = layout_class(cache)
    budget = cls.held_budget(options)
    if not cls.evicts or budget is None:
        return end, 0
    sinks = cls.protected_sinks(options)
    recent = cls.protected_recent(options) if issubclass(cls, EvictionCache) else budget - sinks
    return sinks, end - recent


def key_in_protected(prompt: PasskeyPrompt, cache: str, options: dict[str, Any], question_aware: bool) -> bool:
    """Whether any token of the key sentence (both copies of the key, `key_start`..`key_end`) lay in the positions
    the layout keeps unconditionally (`protected_positions`) when the answer began: question-after, once the
    context was written and compressed (end = the context's length: the question's queries see what was kept
    then); question-aware, once the whole prompt was (end = its length: the first answer token attends to the
    whole prompt, the later ones to what was kept). A key outside them that was retrieved was kept by the
    policy's selection, not by recency; one inside them tells nothing about the policy's scores. The window
    moves on during the answer, so this is the generous side of "protected" (a success is called selected only
    if its key sentence lay wholly outside the protected positions at the start of the answer)."""
    end = len(prompt.ids) if question_aware else prompt.context_len
    sinks, first_recent = protected_positions(cache, options, end)
    return prompt.key_start < sinks or prompt.key_end - 1 >= first_recent


def accuracy_table(rows: list[dict[str, Any]], by: str = "depth") -> list[tuple[Any, int, int, float, float]]:
    """(group, retrieved, n, wilson low, wilson high) per value of `by`, then ("all", ...) over every row."""
    groups: dict[Any, list[int]] = {}
    for r in rows:
        groups.setdefault(r[by], []).append(int(r["retrieved"]))
    table = []
    for g, hits in [*sorted(groups.items()), ("all", [int(r["retrieved"]) for r in rows])]:
        lo, hi = wilson(sum(hits), len(hits))
        table.append((g, sum(hits), len(hits), lo, hi))
    return table


# ---- the grid: every policy and budget on the same prompts, one shared prefill ----------------------------------

FULL = "full (static)"  # how rows and figures name the full (reference) cache


def policy_label(cache: str, options: dict[str, Any] | None = None) -> str:
    """How figures name a policy; the names keep the study's colours (kvlib.study.plotting): the full cache is the
    reference layout's colour, a layout with sinks says how many."""
    cls = layout_class(cache)
    if not cls.evicts:
        return FULL if cache == REFERENCE else f"full ({cache})"
    sinks = cls.protected_sinks(options)
    return f"{cache} ({sinks} sinks + window)" if sinks else cache


def _rows(
    chunk: list[PasskeyPrompt], tokenizer: Any, n_tokens: int, prefill_s: float, cache: str, options: dict[str, Any],
    frac: float, setting: str, ans: Answers,
) -> list[dict[str, Any]]:  # fmt: skip
    """retrieval_grid's rows for one batch of prompts through one layout, budget and setting."""
    budget = held_budget(cache, options)
    rows = []
    for p, t in zip(chunk, ans.tokens.tolist(), strict=True):
        text = tokenizer.decode(t, skip_special_tokens=True)
        rows.append(
            {
                "depth": p.depth,
                "actual_depth": round(p.actual_depth, 4),
                "key": p.key,
                "cache": cache,
                "policy": policy_label(cache, options),
                "options": " ".join(f"{k}={v}" for k, v in options.items()),
                "budget": budget if budget is not None else n_tokens,
                "budget_fraction": frac,
                "setting": setting,
                "continuation": text,
                "retrieved": int(retrieved(text, p.key)),
                "in_protected": key_in_protected(p, cache, options, setting == SETTINGS[1]),
                "kv_bytes_held": ans.kv_bytes_held // len(chunk),
                "time_s": ans.time_s / len(chunk),
                "prefill_s": prefill_s / len(chunk),
            }
        )
    return rows


@torch.inference_mode()
def retrieval_grid(
    model: Any,
    tokenizer: Any,
    builder: Any,
    depths: list[float],
    keys: list[int],
    policies: list[tuple[str, dict[str, Any]]],
    budget_fractions: list[float],
    settings: list[str] = SETTINGS,
    new_tokens: int = 8,
    batch: int = 3,
    progress: Any = None,
) -> pd.DataFrame:
    """One row per (depth, key, policy, budget, setting): the continuation and whether the key was retrieved.

    `policies`: (layout, options without the budget); a layout that does not evict is a full-cache reference
    (one row per prompt, setting "no eviction", budget = the prompt's length). Budgets are fractions of the prompt's
    tokens. `in_protected`: whether the key sentence lay in the positions the layout keeps whatever it scores
    (`key_in_protected`; always True for a layout that does not evict). Prompts (of every depth and key: they all
    have the same length and question) go `batch` at a time; each batch is prefilled once (`record_prefill`) and
    replayed into every layout (every budget of one policy and setting sharing one replay:
    kvlib.decoding.replay.replayed_answers), the static cache's own answers decoded from the recording cache
    itself. time_s is the replay (its share), question and decoding per prompt (the shared prefill: prefill_s)."""
    n_tokens = builder.n_tokens
    rows = []
    prompts = [builder.prompt(depth, k) for depth in depths for k in keys]
    for b in range(0, len(prompts), batch):
        chunk = prompts[b : b + batch]  # every prompt has n_tokens tokens and the same question: one batch
        ids = torch.tensor([p.ids for p in chunk], dtype=torch.long, device=next(model.parameters()).device)
        rec = record_prefill(model, ids, new_tokens)
        n_runs = 0
        rows_of = (chunk, tokenizer, n_tokens, rec.time_s)  # what every row of this batch shares
        for cache, opts in policies:
            if evicts(cache):  # every budget of one setting shares one replay (one attention pass)
                for setting in settings:
                    options = [budget_options(cache, dict(opts), max(1, round(f * n_tokens))) for f in budget_fractions]
                    answers = replayed_answers(
                        model, rec, chunk[0].context_len, cache, options, setting == SETTINGS[1], new_tokens
                    )
                    for o, f, a in zip(options, budget_fractions, answers, strict=True):
                        rows += _rows(*rows_of, cache, o, f, setting, a)
                    n_runs += len(answers)
                    del answers  # their caches: up to the whole budget of keys per layer each
            elif cache == REFERENCE:  # the recording cache is the full cache: decode from it
                t0 = time.perf_counter()
                out = decode_answer(model, rec.cache, rec.logits, n_tokens, new_tokens)
                ans = Answers(out, rec.cache.used_bytes(), time.perf_counter() - t0)
                rows += _rows(*rows_of, cache, dict(opts), 1.0, NO_SETTING, ans)
                n_runs += 1
            else:
                ans = replayed_answer(model, rec, chunk[0].context_len, cache, dict(opts), True, new_tokens)
                rows += _rows(*rows_of, cache, dict(opts), 1.0, NO_SETTING, ans)
                n_runs += 1
        if progress is not None:
            progress(f"prompts {b + 1}-{b + len(chunk)} of {len(prompts)}: prefilled once, {n_runs} layouts")
        del rec
    return pd.DataFrame(rows)


def accuracy(
    grid: pd.DataFrame, by: tuple[str, ...] = ("policy", "cache", "budget", "budget_fraction", "setting")
) -> pd.DataFrame:
    """Retrieval accuracy per group of `grid` (retrieval_grid's rows) with its 95% Wilson interval: retrieved, n,
    accuracy_pct, low_pct, high_pct; and `selectable`, the group's keys that lay outside the positions their
    layout keeps unconditionally (not `in_protected`), `selected`, those of them retrieved: retrieved - selected
    successes were keys the layout keeps whatever it scores (its sinks or its recent window)."""
    outside = grid.assign(selectable=~grid["in_protected"].astype(bool))
    outside["selected"] = outside["selectable"] & outside["retrieved"].astype(bool)
    g = (
        outside.groupby(list(by), sort=False, dropna=False)
        .agg(retrieved=("retrieved", "sum"), n=("retrieved", "count"), selected=("selected", "sum"),
             selectable=("selectable", "sum"))
        .reset_index()
    )  # fmt: skip
    lo_hi = [wilson(int(k), int(n)) for k, n in zip(g["retrieved"], g["n"], strict=True)]
    g["accuracy_pct"] = 100 * g["retrieved"] / g["n"]
    g["low_pct"] = [100 * lo for lo, _ in lo_hi]
    g["high_pct"] = [100 * hi for _, hi in lo_hi]
    g[["selected", "selectable"]] = g[["selected", "selectable"]].astype(int)
    return g


def check_grid(
    cfg: Any, policies: list[tuple[str, dict[str, Any]]], fractions: list[float], lengths: list[int]
) -> None:
    """Refuse, before any work, a policy and budget a layout cannot serve at one of the prompt `lengths`
    (SnapKV's observation window above the budget, sinks filling it): the layout's own one-line KvlibError."""
    for cache, opts in policies:
        for n in lengths:
            for frac in fractions if evicts(cache) else [1.0]:
                options = budget_options(cache, dict(opts), max(1, round(frac * n))) if evicts(cache) else dict(opts)
                try:
                    make_cache(cache, cfg, 1, 2, "cpu", torch.float32, **options)
                except Exception as e:
                    raise type(e)(f"{e} (policy {cache}, budget {frac:g} of {n} tokens)") from None
