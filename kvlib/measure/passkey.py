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

from typing import Any

from kvlib.caches.base import evicts, layout_class
from kvlib.core import checks
from kvlib.core.stats import wilson
from kvlib.measure.perplexity import FLAG_OPTIONS, PROVENANCE

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
