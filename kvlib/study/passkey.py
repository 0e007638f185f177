"""Notebook 09's page: pass-key retrieval under every eviction policy and budget, in both question settings, beside
the perplexity of the same policies at the same budget, and the published figures (marked as theirs): which policies
a page runs, one model's part of it, the leaders, the verdict and the figure. The grid itself is measured by
kvlib.measure.passkey, which shares one prefill across layouts (kvlib.decoding.replay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.lines import Line2D

from kvlib import study
from kvlib.caches.base import evicting_layouts
from kvlib.caches.eviction import policies as eviction_policies
from kvlib.core import stats
from kvlib.core.errors import KvlibError
from kvlib.measure.passkey import FULL, NO_SETTING, SETTINGS, accuracy, perplexity_rows, retrieval_grid
from kvlib.measure.perplexity import read_text, text_token_ids
from kvlib.models.prompts import PasskeyPrompts, WordTokenizer, passkey_keys, synthetic_prompts
from kvlib.study import plotting, published


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
