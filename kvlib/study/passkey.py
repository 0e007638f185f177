"""Notebook 09's grid: pass-key retrieval under every eviction policy and budget, in both question settings, beside
the perplexity of the same policies at the same budget, and the published figures (marked as theirs).

Sharing the prefill. Every layout prefills a prompt attending to all of it (the layouts' contract: the prompt's own
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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from matplotlib.lines import Line2D

from kvlib import study
from kvlib.caches.base import REFERENCE, KVCache, evicting_layouts, evicts, layout_class, make_cache
from kvlib.caches.eviction import policies as eviction_policies
from kvlib.core import stats
from kvlib.core.errors import KvlibError
from kvlib.core.stats import wilson
from kvlib.decoding.questions import Answers, decode_answer, model_dtype, question_chunk
from kvlib.measure.passkey import NO_SETTING, SETTINGS, budget_options, held_budget, retrieved
from kvlib.measure.perplexity import fast_applies, perplexity, read_text, text_token_ids
from kvlib.models.attention import outputs_unused
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.prompts import PasskeyPrompts, WordTokenizer, passkey_keys, synthetic_prompts
from kvlib.study import plotting, published

FULL = "full (static)"


def theirs_for(model: str) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """The published figures beside `model` (a preset name): (retrieval, perplexity, notes); empty for a model
    none was published for (the tiny test models among them)."""
    return (
        (theirs := published.passkey_retrieval())[theirs["model"] == model].reset_index(drop=True),
        (ppl := published.passkey_perplexity())[ppl["model"] == model].reset_index(drop=True),
        published.passkey_notes(model),
    )


def policy_names(policies: str | list[str]) -> list[str]:
    """The eviction layouts a page runs: "all" asks the registry (every registered eviction policy, so a new one is
    listed by registering it); a list is checked against every layout that evicts. KvlibError, one line, for
    anything else."""
    known = list(evicting_layouts())
    if policies == "all":
        return list(eviction_policies())
    if not isinstance(policies, (list, tuple)) or not policies or not all(isinstance(p, str) for p in policies):
        raise KvlibError(
            f'parameter policies: "all" or a list of layouts that evict ({", ".join(known)}), got {policies!r}'
        )
    unknown = [p for p in policies if p not in known]
    if unknown:
        raise KvlibError(
            f"parameter policies: {', '.join(map(repr, unknown))} not a layout that evicts; "
            f"choose from {', '.join(known)}"
        )
    return list(policies)


def policy_label(cache: str, options: dict[str, Any] | None = None) -> str:
    """How figures name a policy; the names keep the study's colours (kvlib.study.plotting): the full cache is the
    reference layout's colour, a layout with sinks says how many."""
    cls = layout_class(cache)
    if not cls.evicts:
        return FULL if cache == REFERENCE else f"full ({cache})"
    sinks = cls.protected_sinks(options)
    return f"{cache} ({sinks} sinks + window)" if sinks else cache


# ---- one prefill, replayed into every layout -----------------------------------------------------------------------


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


@torch.inference_mode()
def replayed_answer(
    model: Any, rec: Recorded, context_len: int, cache: str, options: dict[str, Any], question_aware: bool,
    new_tokens: int,
) -> Answers:  # fmt: skip
    """The greedy continuations of the recorded prompts through a fresh cache of the named layout:
    `kvlib.measure.passkey.answer` without running the prefill again (its time excludes the prefill)."""
    B, N = rec.ids.shape
    t0 = time.perf_counter()
    kv = make_cache(cache, model.cfg, B, N + new_tokens, rec.ids.device, model_dtype(model), **options)
    if question_aware or not evicts(cache):
        replay(rec, kv)
        logits = rec.logits
    else:
        replay(rec, kv, context_len)
        logits = question_chunk(model, kv, rec.ids, context_len)
    out = decode_answer(model, kv, logits, N, new_tokens)
    return Answers(out, kv.used_bytes(), time.perf_counter() - t0, kv)


# ---- the grid ------------------------------------------------------------------------------------------------------


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
    tokens. Prompts (of every depth and key: they all have the same length and question) go `batch` at a time;
    each batch is prefilled once (`record_prefill`) and replayed into every layout, the static cache's own answers
    decoded from the recording cache itself. time_s is the replay, question and decoding per prompt (the shared
    prefill: prefill_s)."""
    n_tokens = builder.n_tokens
    rows = []
    prompts = [builder.prompt(depth, k) for depth in depths for k in keys]
    for b in range(0, len(prompts), batch):
        chunk = prompts[b : b + batch]  # every prompt has n_tokens tokens and the same question: one batch
        ids = torch.tensor([p.ids for p in chunk], dtype=torch.long, device=next(model.parameters()).device)
        rec = record_prefill(model, ids, new_tokens)
        runs = []
        for cache, opts in policies:
            if not evicts(cache):
                runs.append((cache, opts, 1.0, NO_SETTING))
                continue
            runs += [(cache, opts, f, s) for f in budget_fractions for s in settings]
        for cache, opts, frac, setting in runs:
            if evicts(cache):
                options = budget_options(cache, dict(opts), max(1, round(frac * n_tokens)))
                ans = replayed_answer(
                    model, rec, chunk[0].context_len, cache, options, setting == SETTINGS[1], new_tokens
                )
            elif cache == REFERENCE:  # the recording cache is the full cache: decode from it
                options, t0 = dict(opts), time.perf_counter()
                out = decode_answer(model, rec.cache, rec.logits, n_tokens, new_tokens)
                ans = Answers(out, rec.cache.used_bytes(), time.perf_counter() - t0, rec.cache)
            else:
                options = dict(opts)
                ans = replayed_answer(model, rec, chunk[0].context_len, cache, options, True, new_tokens)
            budget = held_budget(cache, options)
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
                        "kv_bytes_held": ans.kv_bytes_held // len(chunk),
                        "time_s": ans.time_s / len(chunk),
                        "prefill_s": rec.time_s / len(chunk),
                    }
                )
        if progress is not None:
            progress(f"prompts {b + 1}-{b + len(chunk)} of {len(prompts)}: prefilled once, {len(runs)} layouts")
        del rec
    return pd.DataFrame(rows)


def accuracy(
    grid: pd.DataFrame, by: tuple[str, ...] = ("policy", "cache", "budget_fraction", "setting")
) -> pd.DataFrame:
    """Retrieval accuracy per group with its 95% Wilson interval: retrieved, n, accuracy_pct, low_pct, high_pct."""
    g = grid.groupby(list(by), sort=False, dropna=False)["retrieved"].agg(retrieved="sum", n="count").reset_index()
    lo_hi = [wilson(int(k), int(n)) for k, n in zip(g["retrieved"], g["n"], strict=True)]
    g["accuracy_pct"] = 100 * g["retrieved"] / g["n"]
    g["low_pct"] = [100 * lo for lo, _ in lo_hi]
    g["high_pct"] = [100 * hi for _, hi in lo_hi]
    return g


# ---- one model's part of the page ---------------------------------------------------------------------------------

RUN_KEYS = ("model", "tokens")  # what each of notebook 09's further models must set
RUN_OPTIONAL = ("keys",)  # and may set (else the page's own); the other settings are shared


def page_runs(model: str, tokens: int, keys: int, more_models: Any) -> list[tuple[str, int, int]]:
    """Notebook 09's models, in order: (preset, prompt tokens, keys per depth) for the page's `model` and each entry
    of `more_models`, a list of {"model": preset, "tokens": prompt length[, "keys": keys per depth]} (keys: the
    page's when not given). Raises KvlibError (one line) for an entry that is not such a mapping, an unknown
    preset, a length below 2, keys below 1 or a model named twice."""
    if more_models is None:
        more_models = []
    if not isinstance(more_models, list):
        raise KvlibError(f"parameter more_models: a list of {{model, tokens[, keys]}} mappings, got {more_models!r}")
    runs = [(model, tokens, keys)]
    for i, entry in enumerate(more_models):
        if not isinstance(entry, dict) or not set(RUN_KEYS) <= set(entry) <= {*RUN_KEYS, *RUN_OPTIONAL}:
            raise KvlibError(
                f"parameter more_models[{i}]: a mapping with the keys model and tokens (and optionally keys), "
                f"got {entry!r}"
            )
        try:
            study.model_config(entry["model"])
        except KvlibError as e:  # an unknown preset: its own one line, said where it came from
            raise KvlibError(f"parameter more_models[{i}].model: {e}") from None
        runs.append(
            (
                entry["model"],
                study.positive_int(f"more_models[{i}].tokens", entry["tokens"], minimum=2),
                study.positive_int(f"more_models[{i}].keys", entry.get("keys", keys)),
            )
        )
    names = [m for m, _, _ in runs]
    if len(set(names)) != len(names):
        raise KvlibError(f"parameter more_models: each model once on the page, got {names}")
    return runs


def metric_suffix(i: int, model: str) -> str:
    """What notebook 09 appends to a headline metric's name for its i-th model ("" for the page's own model, whose
    names predate the others: `full_cache_retrieval`, then `full_cache_retrieval_gemma3-270m`); the index's
    finding (kvlib.report.findings) reads them back by the same rule."""
    return "" if i == 0 else f"_{model}"


@dataclass
class ModelRun:
    """One model's measurements on notebook 09's page; every table carries `model` and `tokens` first."""

    model: str  # the preset's name
    tokens: int  # prompt length, question included
    keys: int  # keys per depth
    meaningful: bool  # pretrained weights and a real tokenizer (random weights: every number is meaningless)
    grid: pd.DataFrame  # retrieval_grid's rows
    acc: pd.DataFrame  # accuracy per (policy, budget, setting)
    by_depth: pd.DataFrame  # accuracy per (policy, budget, setting, depth)
    ppl: pd.DataFrame  # perplexity_rows
    text_name: str  # what the perplexity read
    grid_s: float  # seconds of the retrieval grid (prefills included)
    ppl_s: float  # seconds of the perplexity rows


def measure_model(
    lm: Any,
    tokens: int,
    depths: list[float],
    keys: int,
    filler: str,
    layouts: list[tuple[str, dict[str, Any]]],
    budgets: list[float],
    settings: list[str],
    new_tokens: int,
    batch: int,
    ppl_tokens: int,
    seed: int,
    progress: Any = None,
) -> ModelRun:
    """Notebook 09's measurements for one loaded model (kvlib.models.loading.load): the retrieval grid of
    `keys` seeded keys per depth in `tokens`-token prompts, its accuracies (95% Wilson intervals), and the
    perplexity of the first `ppl_tokens` tokens of the novel through the same layouts at the same budget fractions.
    Random weights or no tokenizer: a stand-in word tokenizer and synthetic text, and `meaningful` False."""
    cfg = lm.cfg
    meaningful = lm.tokenizer is not None and lm.weights == "pretrained"
    tokenizer = lm.tokenizer or WordTokenizer(cfg.vocab_size)
    builder = PasskeyPrompts(tokenizer, tokens, filler)
    t0 = time.perf_counter()
    grid = retrieval_grid(
        lm.model, tokenizer, builder, depths, passkey_keys(keys, seed), layouts, budgets, settings, new_tokens,
        batch, progress,
    )  # fmt: skip
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if meaningful:
        text, text_name = read_text(None)
        ppl_ids = text_token_ids(lm.tokenizer, text, ppl_tokens, text_name).to(lm.device)
    else:
        text_name = "synthetic token ids (random weights)"
        ppl_ids = synthetic_prompts(cfg.vocab_size, 1, ppl_tokens, seed, lm.device)
    ppl = perplexity_rows(lm.model, ppl_ids, layouts, budgets)
    ppl_s = time.perf_counter() - t0

    def tagged(df: pd.DataFrame) -> pd.DataFrame:  # model and prompt tokens first
        return df.assign(model=cfg.name, tokens=tokens)[["model", "tokens", *df.columns]]

    by_depth = accuracy(grid, ("policy", "budget_fraction", "setting", "depth"))
    ppl = ppl.rename(columns={"tokens": "ppl_tokens"})  # the text's tokens, not the prompts'
    return ModelRun(
        cfg.name, tokens, keys, meaningful, tagged(grid), tagged(accuracy(grid)), tagged(by_depth), tagged(ppl),
        text_name, grid_s, ppl_s,
    )  # fmt: skip


# ---- perplexity of the same policies -------------------------------------------------------------------------------


def perplexity_rows(
    model: Any, ids: torch.Tensor, policies: list[tuple[str, dict[str, Any]]], budget_fractions: list[float]
) -> pd.DataFrame:
    """Perplexity of `ids` (1, N) through the same policies at the same budget fractions of N, with
    kvlib.measure.perplexity, every policy on the same text so that their changes compare.

    Each policy goes through the one-pass method ("fast", proven equal to the token method) where it applies
    (`kvlib.measure.perplexity.fast_applies`: the full cache on any model; on a Llama-architecture model every
    layout with a one-pass pattern, KVCache.one_pass: the window, and StreamingLLM and SnapKV, which read token by
    token keep the window layout's tokens, so SnapKV's perplexity is its decode rule's, not its prompt selection's),
    else token by token through the layout itself (H2O, TOVA and K-norm, whose kept tokens depend on the attention
    or the keys; every lossy layout on another architecture). Returns one row per (policy, budget fraction): method,
    tokens, budget, perplexity, change against the full cache (%)."""
    n = ids.shape[1]
    full = perplexity(model, ids, REFERENCE, {}, "fast").perplexity  # an exact layout: one pass on any model
    rows = [
        {"policy": FULL, "cache": REFERENCE, "budget_fraction": 1.0, "method": "fast", "tokens": n, "budget": n,
         "perplexity": full, "ppl_change_pct": 0.0},
    ]  # fmt: skip
    for cache, opts in policies:
        if not evicts(cache):
            continue
        for frac in budget_fractions:
            options = budget_options(cache, dict(opts), max(1, round(frac * n)))
            method = "fast" if fast_applies(model.cfg, cache, options) else "token"
            ppl = perplexity(model, ids, cache, options, method).perplexity
            rows.append(
                {"policy": policy_label(cache, options), "cache": cache, "budget_fraction": frac, "method": method,
                 "tokens": n, "budget": held_budget(cache, options), "perplexity": ppl,
                 "ppl_change_pct": 100 * (ppl / full - 1)}
            )  # fmt: skip
    return pd.DataFrame(rows)


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


# ---- what the figure and the sentence say ------------------------------------------------------------------------


def leaders(rows: pd.DataFrame) -> tuple[pd.Series, list[str]]:
    """The row of `rows` (accuracy rows: policy, retrieved, n, accuracy_pct) with the most keys retrieved (ties: the
    policy first by name) and the policies whose counts are not apart from it (kvlib.core.stats.counts_apart: 95% Wilson
    intervals overlap), itself included. One name means the leader is apart from every other policy."""
    ranked = rows.sort_values(["accuracy_pct", "policy"], ascending=[False, True])
    top = ranked.iloc[0]
    tied = [
        str(r["policy"])
        for _, r in ranked.iterrows()
        if not stats.counts_apart(int(top["retrieved"]), int(top["n"]), int(r["retrieved"]), int(r["n"]))
    ]
    return top, tied


def leader_text(rows: pd.DataFrame) -> str:
    """'H2O 9/9 (TOVA 8/9 within its 95% interval)' or 'H2O 9/9, apart from every other policy': the best
    retrieval of `rows` and what the intervals allow one to say of it."""
    top, tied = leaders(rows)
    head = f"{top['policy']} {int(top['retrieved'])}/{int(top['n'])}"
    others = [p for p in tied if p != top["policy"]]
    if len(rows) == 1:
        return head
    if rows["retrieved"].nunique() == 1 and rows["n"].nunique() == 1:  # no leader to name: every policy tied
        return f"every policy {int(top['retrieved'])}/{int(top['n'])}"
    if not others:
        return f"{head}, apart from every other policy (95% Wilson intervals)"
    within = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    return f"{head}, not apart from {within} (95% Wilson intervals overlap)"


def verdict(acc: pd.DataFrame, ppl: pd.DataFrame, setting: str = SETTINGS[0]) -> tuple[str, float | None, bool | None]:
    """Whether perplexity predicted retrieval here: (one sentence computed from the data, the rank correlation
    behind it, whether it predicted; None: the data cannot tell). The correlation is Spearman's rho over every
    (policy, budget) pair measured both ways, judged by kvlib.core.stats.rank_correlation: it is a finding only over at
    least 3 pairs, 3 distinct values on each side, and the highest and lowest retrieval counts apart (95% Wilson
    intervals that do not overlap). A perfect predictor has rho = -1 (the smaller the perplexity change, the more
    keys retrieved); "predicted" needs a finding with rho <= -0.5 and the policy with the smallest perplexity change
    not apart below the best retriever; "did not predict" needs a finding that fails either."""
    ours = acc[(acc["setting"] == setting)][["policy", "budget_fraction", "accuracy_pct", "retrieved", "n"]]
    both = ours.merge(ppl[["policy", "budget_fraction", "ppl_change_pct"]], on=["policy", "budget_fraction"])
    both = both.dropna(subset=["ppl_change_pct"]).reset_index(drop=True)
    full = acc[acc["setting"] == NO_SETTING]
    full_text = f"{int(full['retrieved'].sum())}/{int(full['n'].sum())}" if len(full) else "n/a"
    if len(both) == 0:
        return f"No policy was measured both ways in the {setting} setting.", None, None
    best = both.sort_values(["ppl_change_pct", "policy"]).iloc[0]
    best_text = (
        f"the policy perplexity rates best, {best['policy']} at {100 * best['budget_fraction']:g}% "
        f"({best['ppl_change_pct']:+.1f}% perplexity), retrieved {int(best['retrieved'])}/{int(best['n'])} keys "
        f"against the full cache's {full_text}"
    )
    k, n = both["retrieved"].astype(int).tolist(), both["n"].astype(int).tolist()
    rc = stats.rank_correlation(
        both["ppl_change_pct"].tolist(),
        both["accuracy_pct"].tolist(),
        "perplexity change",
        "keys retrieved",
        y_apart=lambda i, j: stats.counts_apart(k[i], n[i], k[j], n[j]),
    )
    rho_text = "" if rc.rho is None else f" (rank correlation {rc.rho:+.2f} over {rc.n} policy-budget pairs)"
    if not rc.finding:
        return (
            f"Perplexity could not be tested as a predictor of retrieval here ({setting}): {rc.why}{rho_text}; "
            f"{best_text}. Each accuracy rests on {min(n)} prompts, so its 95% Wilson interval is wide.",
            rc.rho,
            None,
        )
    rho = float(rc.rho)  # a finding has a rho
    top = both.sort_values(["accuracy_pct", "ppl_change_pct"], ascending=[False, True]).iloc[0]
    below = stats.counts_apart(int(best["retrieved"]), int(best["n"]), int(top["retrieved"]), int(top["n"]))
    picked_best = not (below and best["accuracy_pct"] < top["accuracy_pct"])
    predicted = rho <= -0.5 and picked_best
    top_text = (
        ""
        if picked_best
        else f"; the best retriever, {top['policy']} at {100 * top['budget_fraction']:g}%, retrieved "
        f"{int(top['retrieved'])}/{int(top['n'])} at {top['ppl_change_pct']:+.1f}% perplexity, apart from it "
        "(95% Wilson intervals)"
    )
    return (
        f"Perplexity {'predicted' if predicted else '**did not predict**'} retrieval here ({setting}): "
        f"{best_text}{top_text}. Over {len(both)} policy-budget pairs the rank correlation between perplexity change "
        f"and keys retrieved is {rho:+.2f} (a perfect predictor gives −1; 'predicted' needs at most −0.5 and the "
        "policy perplexity rates best not apart below the best retriever). Each accuracy rests on "
        f"{min(n)} prompts, so its 95% Wilson interval is wide.",
        rho,
        predicted,
    )


def two_panel_figure(acc: pd.DataFrame, ppl: pd.DataFrame, title: str, model: str) -> Any:
    """Left: perplexity change against budget; right: retrieval accuracy (95% Wilson interval) against budget,
    solid question-aware, dashed question-after; the full cache a horizontal line; the figures published for
    `model` (`theirs_for`) as grey crosses labelled "theirs". One legend for both panels: colours are policies,
    line styles settings. `acc`, `ppl`: one model's rows of `accuracy` and `perplexity_rows`."""
    theirs, theirs_ppl, _ = theirs_for(model)

    fig, (left, right) = plotting.figure(ncols=2, width=5.5, height=4.5, title=title)
    palette, order = plotting.colors([*ppl["policy"].unique(), *acc["policy"].unique()])
    in_ppl = [p for p in order if p in set(ppl["policy"]) and p != FULL]
    for i, policy in enumerate(in_ppl):  # side by side around each budget, so that equal points stay visible
        d = ppl[ppl["policy"] == policy].sort_values("budget_fraction")
        x = 100 * d["budget_fraction"] + 1.2 * (i - (len(in_ppl) - 1) / 2)
        left.plot(x, d["ppl_change_pct"], marker="o", color=palette[policy])
    left.axhline(0, color=palette.get(FULL, "grey"), linewidth=1.5)
    left.scatter(100 * theirs_ppl["kept_fraction"], theirs_ppl["ppl_change_pct"], marker="x", color="grey")
    for r in theirs_ppl.itertuples():
        left.annotate(f"theirs: {r.policy}", (100 * r.kept_fraction, r.ppl_change_pct), fontsize=7, color="grey",
                      xytext=(4, 2), textcoords="offset points")  # fmt: skip
    plotting.label(left, "What perplexity says", "cache budget (% of the context)", "perplexity change vs full (%)")
    styles = {SETTINGS[1]: "-", SETTINGS[0]: "--"}
    # side by side around each budget (policies, then settings), so that equal points stay visible
    shown = [p for p in order if p in set(acc["policy"]) and p != FULL]
    offsets = {(p, s): 0.9 * (2 * i + j - len(shown) + 0.5) for i, p in enumerate(shown) for j, s in enumerate(styles)}
    for policy in shown:
        for setting, ls in styles.items():
            d = acc[(acc["policy"] == policy) & (acc["setting"] == setting)].sort_values("budget_fraction")
            if not len(d):
                continue
            yerr = [d["accuracy_pct"] - d["low_pct"], d["high_pct"] - d["accuracy_pct"]]
            right.errorbar(100 * d["budget_fraction"] + offsets[policy, setting], d["accuracy_pct"], yerr=yerr,
                           color=palette[policy], linestyle=ls, marker="o" if ls == "-" else "s", capsize=3,
                           alpha=0.85)  # fmt: skip
    full = acc[acc["setting"] == NO_SETTING]
    if len(full):
        right.axhline(full["accuracy_pct"].iloc[0], color=palette.get(full["policy"].iloc[0], "grey"), linewidth=1.5)
    theirs = theirs.assign(accuracy_pct=100 * theirs["retrieved"] / theirs["n"])
    right.scatter(100 * theirs["kept_fraction"], theirs["accuracy_pct"], marker="x", color="grey")
    for (x, y), g in theirs.groupby(["kept_fraction", "accuracy_pct"]):
        names = ", ".join(g["policy"])
        at_edge = x >= 0.9  # a full cache's cross sits at the axis' right end: its label goes left, inside
        right.annotate(
            f"theirs: {names} {g['retrieved'].iloc[0]}/{g['n'].iloc[0]}",
            (100 * x, y),
            fontsize=7,
            color="grey",
            xytext=((-4, -10) if y > 95 else (-4, 4)) if at_edge else (4, 4),  # under the top border, if at it
            textcoords="offset points",
            ha="right" if at_edge else "left",
            annotation_clip=False,
        )  # right of the other crosses: our points sit at budgets left of them
    right.set_ylim(-5, 105)
    plotting.label(right, "What retrieval says", "cache budget (% of the context)", "keys retrieved (%)")
    for ax in (left, right):
        ax.set_xlim(0, 105)
    handles = [Line2D([], [], color=palette[p], marker="o", label=p) for p in order if p != FULL]
    if len(full):
        f = full.iloc[0]
        label = f"{f['policy']} (retrieved {int(f['retrieved'])}/{int(f['n'])})"
        handles.append(Line2D([], [], color=palette.get(f["policy"], "grey"), linewidth=1.5, label=label))
    handles += [
        Line2D([], [], color="black", linestyle=ls, marker="o" if ls == "-" else "s", label=s)
        for s, ls in styles.items()
    ]
    if len(theirs) or len(theirs_ppl):
        handles.append(Line2D([], [], color="grey", marker="x", linestyle="none", label="theirs (published)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig
