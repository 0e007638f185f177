"""Notebook 09's page: pass-key retrieval under every eviction policy and budget, in both question settings: which
policies a page runs, one model's part of it, how many of its successes were the policy's selection rather than
recency, the leaders, the published figures beside ours (marked as theirs), the agreement of the same policies at
the same cache budget in tokens as notebook 08 measured it (KLD, top-1, perplexity), the verdict and the figure.
The grid itself is measured by kvlib.measure.passkey, which shares one prefill across layouts
(kvlib.decoding.replay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from kvlib import study
from kvlib.caches.base import evicting_layouts, layout_class
from kvlib.caches.eviction import policies as eviction_policies
from kvlib.core import stats
from kvlib.core.errors import KvlibError
from kvlib.measure.passkey import FULL, NO_SETTING, SETTINGS, accuracy, budget_options, retrieval_grid
from kvlib.models.prompts import PasskeyPrompts, WordTokenizer, passkey_keys
from kvlib.study import plotting, published

# how sentences name the question settings
SETTING_WORDS = {
    SETTINGS[0]: "when the question came after compression",
    SETTINGS[1]: "when the policy saw the question",
}


def theirs_for(model: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The published retrieval counts beside `model` (a preset name) and the notes on them (the first describes
    the old figure's crosses; the others what was published without a count): empty for a model none was
    published for (the tiny test models among them)."""
    theirs = published.passkey_retrieval()
    return theirs[theirs["model"] == model].reset_index(drop=True), published.passkey_notes(model)


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
    grid: pd.DataFrame  # retrieval_grid's rows (in_protected per prompt)
    acc: pd.DataFrame  # accuracy per (policy, budget, setting), with selected and selectable
    by_depth: pd.DataFrame  # accuracy per (policy, budget, setting, depth), with selected and selectable
    grid_s: float  # seconds of the retrieval grid (prefills included)


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
    seed: int,
    progress: Any = None,
) -> ModelRun:
    """Notebook 09's measurements for one loaded model (kvlib.models.loading.load): the retrieval grid of
    `keys` seeded keys per depth in `tokens`-token prompts and its accuracies (95% Wilson intervals, and how many
    successes were selected: kvlib.measure.passkey.accuracy), overall and per depth. Random weights or no
    tokenizer: a stand-in word tokenizer, and `meaningful` False."""
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

    def tagged(df: pd.DataFrame) -> pd.DataFrame:  # model and prompt tokens first
        return df.assign(model=cfg.name, tokens=tokens)[["model", "tokens", *df.columns]]

    by_depth = accuracy(grid, ("policy", "cache", "budget", "budget_fraction", "setting", "depth"))
    return ModelRun(cfg.name, tokens, keys, meaningful, tagged(grid), tagged(accuracy(grid)), tagged(by_depth), grid_s)


# ---- the quality side: notebook 08's agreement at the same cache budget in tokens ----------------------------------

QUALITY_FILE = "08_agreement.csv"  # notebook 08's table, one row per cache variant
QUALITY_COLUMNS = ("model", "cache", "variant", "budget_tokens", "passage_tokens", "passages", "kld_mean", "kld_lo",
                   "kld_hi", "top1_pct", "perplexity", "ppl_ratio")  # fmt: skip
# measure -> (name in sentences, short name, the sign of a perfect predictor's rank correlation with keys retrieved)
QUALITY_MEASURES = {
    "kld_mean": ("KLD against the full cache", "KLD", -1),
    "top1_pct": ("top-1 agreement with the full cache", "top-1 agreement", 1),
    "ppl_ratio": ("perplexity ratio to the full cache", "the perplexity ratio", -1),
}
STAGE_FOLDER = ".build"  # kvlib.report.pipeline runs a notebook in <report>/.build/<stage>/ and moves its files up
QUALITY_MISSING = (
    "Notebook 08 provides the quality side (KLD, top-1 agreement and perplexity of the same policies at the same "
    f"cache budget in tokens); its {QUALITY_FILE} is not in this report's data, so this page compares nothing with it."
)


def quality_file(out_dir: str | Path) -> Path | None:
    """Where notebook 08's agreement table is for a page writing into `out_dir`: its data folder, or, when
    `out_dir` is the report's staging folder (<report>/.build/<stage>), the report's own data folder, where the
    report put 08's files before running 09. None when neither has it."""
    out_dir = Path(out_dir)
    candidates = [out_dir / "data" / QUALITY_FILE]
    if out_dir.parent.name == STAGE_FOLDER:
        candidates.append(out_dir.parent.parent / "data" / QUALITY_FILE)
    return next((c for c in candidates if c.is_file()), None)


def read_quality(path: str | Path) -> pd.DataFrame:
    """Notebook 08's agreement table (QUALITY_COLUMNS; budget_tokens blank for a layout that does not evict).
    Raises KvlibError (one line) for a file without those columns."""
    table = pd.read_csv(path)
    missing = [c for c in QUALITY_COLUMNS if c not in table.columns]
    if missing:
        raise KvlibError(f"{Path(path).name}: no column {', '.join(missing)} (notebook 08's agreement table)")
    return table


def beside_quality(acc: pd.DataFrame, quality: pd.DataFrame) -> pd.DataFrame:
    """Every evicting row of `acc` (accuracy rows with `model`) beside the row of notebook 08's `quality` table of
    the same model, layout and cache budget in tokens (`budget` = `budget_tokens`: the same absolute budget, not the
    same fraction). Where 08 ran several variants of a layout at that budget, the one with the options 09 runs
    (the layout's label at that budget); a row 08 has no single match for is left out. Columns: acc's, then
    variant, passage_tokens, passages, kld_mean, kld_lo, kld_hi, top1_pct, perplexity, ppl_ratio."""
    extra = [c for c in QUALITY_COLUMNS if c not in ("model", "cache", "budget_tokens")]
    q = quality.dropna(subset=["budget_tokens"])
    q = q.assign(budget_tokens=q["budget_tokens"].astype(int))
    rows = []
    for _, r in acc[acc["setting"] != NO_SETTING].iterrows():
        m = q[(q["model"] == r["model"]) & (q["cache"] == r["cache"]) & (q["budget_tokens"] == int(r["budget"]))]
        if len(m) > 1:
            m = m[m["variant"] == layout_class(r["cache"]).label(budget_options(r["cache"], {}, int(r["budget"])))]
        if len(m) == 1:
            rows.append({**r.to_dict(), **m.iloc[0][extra].to_dict()})
    return pd.DataFrame(rows, columns=[*acc.columns, *extra])


def quality_verdict(
    both: pd.DataFrame, setting: str, measure: str = "kld_mean"
) -> tuple[str, float | None, bool | None]:
    """Whether notebook 08's `measure` (QUALITY_MEASURES) ranked the policies as retrieval did in `setting`, over
    the rows of `both` (beside_quality: the same cache budget in tokens): (a clause computed from the data, Spearman's
    rho, whether it predicted; None: the data cannot rank them). A finding needs kvlib.core.stats.rank_correlation's
    rule (the highest and the lowest count apart, 95% Wilson intervals) and, on each side, at least
    stats.MIN_RANKED values without ties (stats.ranks_apart); "predicted" then needs rho at least 0.5 in the
    perfect predictor's direction."""
    name, short, sign = QUALITY_MEASURES[measure]
    d = both[both["setting"] == setting].dropna(subset=[measure]).reset_index(drop=True)
    if d.empty:
        return f"{setting}: no policy measured both ways", None, None
    budgets = ", ".join(f"{b}" for b in sorted(d["budget"].astype(int).unique()))
    closest = d.sort_values([measure, "policy"], ascending=[sign < 0, True]).iloc[0]
    best = (
        f"the policy {short} rates closest to the full cache, {closest['policy']} "
        f"({study.fmt(float(closest[measure]))}), "
        f"retrieved {int(closest['retrieved'])}/{int(closest['n'])}"
    )
    k, n = d["retrieved"].astype(int).tolist(), d["n"].astype(int).tolist()
    x, y = d[measure].astype(float).tolist(), d["accuracy_pct"].astype(float).tolist()
    rc = stats.rank_correlation(
        x, y, name, "keys retrieved", y_apart=lambda i, j: stats.counts_apart(k[i], n[i], k[j], n[j])
    )
    why = stats.ranks_apart(y, "keys retrieved") or stats.ranks_apart(x, name) or rc.why
    if why or rc.rho is None:
        return f"{setting}: the data cannot rank the policies ({why or rc.why}); {best}", rc.rho, None
    predicted = sign * rc.rho >= 0.5
    return (
        f"{setting}: {name} {'predicted' if predicted else '<b>did not predict</b>'} which policy retrieves (rank "
        f"correlation {rc.rho:+.2f} over {len(d)} policies at {budgets} tokens; a perfect predictor gives "
        f"{sign:+d}); {best}",
        rc.rho,
        predicted,
    )


# ---- retention: how many successes were selected ----------------------------------------------------------------


def selection_text(acc: pd.DataFrame, setting: str) -> str:
    """'question-after: 3 of 180 keys retrieved over 5 policies x 4 budgets; of these 3 successes, 0 were selected
    ...': what the policies retrieved in `setting` over every budget of `acc` (accuracy rows) and how many of those
    keys lay outside the positions their policy keeps whatever it scores (`selected`, `selectable`); '' for a
    setting not in `acc`."""
    d = acc[acc["setting"] == setting]
    if d.empty:
        return ""
    k, n, sel, able = (int(d[c].sum()) for c in ("retrieved", "n", "selected", "selectable"))
    fractions = sorted(d["budget_fraction"].unique())
    where = (
        f"over {d['policy'].nunique()} polic{'ies' if d['policy'].nunique() != 1 else 'y'} × {len(fractions)} "
        f"budget{'s' if len(fractions) != 1 else ''} ({', '.join(f'{100 * f:g}%' for f in fractions)})"
    )
    if k == 0:
        return f"{setting}: no key retrieved {where} (0 of {n}; {able} of them lay outside the protected positions)"
    rest = (
        f"; the other {k - sel} lay in the sinks or the recent window their policy keeps whatever it scores"
        if k > sel
        else ""
    )
    return (
        f"{setting}: {k} of {n} keys retrieved {where}; of these {k} successes, <b>{sel} were selected</b> (the key "
        f"sentence outside the positions its policy protects, as {able} of the {n} keys were){rest}"
    )


def verdict(acc: pd.DataFrame, both: pd.DataFrame | None, settings: tuple[str, ...] = SETTINGS) -> str:
    """The page's verdict for one model: in each question setting, how many keys the policies retrieved and how
    many of those successes were selected rather than kept by recency (`selection_text`); then, when notebook 08's
    agreement was there (`both`: beside_quality; None: it was not), whether its KLD ranked the policies as retrieval
    did at the same cache budget in tokens (`quality_verdict`), in both settings."""
    sentence = "Retention: " + "; ".join(t for s in settings if (t := selection_text(acc, s))) + "."
    if both is None:
        return f"{sentence} {QUALITY_MISSING}"
    if both.empty:
        budgets = sorted(acc.loc[acc["setting"] != NO_SETTING, "budget"].astype(int).unique())
        return (
            f"{sentence} Notebook 08's agreement table has no row for this model at these cache budgets "
            f"({', '.join(map(str, budgets))} tokens): no comparison."
        )
    clauses = "; ".join(quality_verdict(both, s)[0] for s in settings)
    return f"{sentence} Against notebook 08 at the same cache budget in tokens: {clauses}."


# ---- theirs beside ours -------------------------------------------------------------------------------------------

CONTRADICTS = "⚠"  # a count apart from the published one (95% Wilson intervals that do not overlap)


def theirs_beside(acc: pd.DataFrame, model: str) -> pd.DataFrame:
    """Each published count for `model` (theirs_for) beside ours: the same layout (a full cache: ours with no
    eviction) in the same question setting, at our budget nearest to their kept fraction. Columns: theirs (their
    policy), setting, kept (theirs), theirs (k/n), ours (k/n), what differs (one clause: prompt length, budget,
    setting; their text and setup are their source's, `published.passkey_sources`), source, judged ("⚠ apart"
    when the 95% Wilson intervals do not overlap: our count contradicts theirs)."""
    theirs, _ = theirs_for(model)
    rows = []
    for _, t in theirs.iterrows():
        full = t["kept_fraction"] >= 1.0
        mine = (
            acc[acc["setting"] == NO_SETTING]
            if full
            else acc[(acc["cache"] == t["policy"]) & (acc["setting"] == t["setting"])]
        )
        row = {"theirs": t["policy"], "setting": t["setting"], "kept": f"{100 * t['kept_fraction']:g}%",
               "theirs (k/n)": f"{t['retrieved']}/{t['n']}", "source": t["source"]}  # fmt: skip
        if mine.empty:
            rows.append({**row, "ours (k/n)": "not run", "what differs": "no such policy here", "judged": ""})
            continue
        m = mine.iloc[int((mine["budget_fraction"] - t["kept_fraction"]).abs().to_numpy().argmin())]
        differs = [f"ours {int(m['tokens'])}-token prompts"]
        if not full and m["budget_fraction"] != t["kept_fraction"]:
            differs.append(f"ours at {100 * m['budget_fraction']:g}% kept")
        if full and t["setting"] != NO_SETTING:
            differs.append(f"their full cache {t['setting']}, ours one prefill (no eviction: the same)")
        apart = stats.counts_apart(int(m["retrieved"]), int(m["n"]), int(t["retrieved"]), int(t["n"]))
        rows.append({**row, "ours (k/n)": f"{int(m['retrieved'])}/{int(m['n'])}", "what differs": "; ".join(differs),
                     "judged": f"{CONTRADICTS} apart" if apart else "within the intervals"})  # fmt: skip
    columns = ["theirs", "setting", "kept", "theirs (k/n)", "ours (k/n)", "what differs", "source", "judged"]
    return pd.DataFrame(rows, columns=columns)


def theirs_text(beside: pd.DataFrame) -> str:
    """One line under the table of `theirs_beside`: each source's setup in its own words, and the counts of ours
    apart from theirs (⚠) named; '' when nothing was published for the model."""
    if beside.empty:
        return ""
    sources = published.passkey_sources()
    setup = " ".join(f"Theirs, {s}: {sources.get(s, 'no description')}" for s in dict.fromkeys(beside["source"]))
    apart = beside[beside["judged"].str.startswith(CONTRADICTS)]
    if apart.empty:
        return f"{setup} No count of ours is apart from theirs (95% Wilson intervals overlap)."
    listed = "; ".join(
        f"{r['theirs']} ({r['setting']}, {r['kept']} kept): ours {r['ours (k/n)']}, theirs {r['theirs (k/n)']}"
        for _, r in apart.iterrows()
    )
    return f"{setup} {CONTRADICTS} Ours apart from theirs (95% Wilson intervals do not overlap): {listed}."


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


# ---- the page's tables (at most 8 columns each: the full tables are the CSVs) -------------------------------------


def _cell(r: pd.Series) -> str:
    """'3/9 · 1/6 sel.': retrieved of n, and selected of selectable."""
    return f"{int(r['retrieved'])}/{int(r['n'])} · {int(r['selected'])}/{int(r['selectable'])} sel."


def accuracy_view(acc: pd.DataFrame, setting: str, index: tuple[str, ...] = ("policy",)) -> pd.DataFrame:
    """Keys retrieved per `index` row (policies in the study's order) and budget column ("12.5%", ...) in
    `setting`, each cell "k/n · s/m sel." (s of the m keys outside the protected positions retrieved)."""
    d = acc[acc["setting"] == setting]
    cols = [f"{100 * f:g}%" for f in sorted(d["budget_fraction"].unique())]
    d = d.assign(budget_pct=[f"{100 * f:g}%" for f in d["budget_fraction"]], cell=d.apply(_cell, axis=1))
    view = d.pivot(index=list(index), columns="budget_pct", values="cell")[cols]
    rank = {p: i for i, p in enumerate(plotting.order(d["policy"].unique()))}
    view = view.sort_index(key=lambda v: v.map(rank) if v.name == "policy" else v)
    view.columns.name = f"{setting}: budget"
    return view


def quality_view(both: pd.DataFrame) -> pd.DataFrame:
    """One row per policy and budget of `both` (beside_quality): notebook 08's KLD (with its interval), top-1
    agreement and perplexity ratio beside the keys retrieved in each setting (k/n)."""
    keys = ["policy", "budget"]
    first = both.drop_duplicates(keys).set_index(keys)
    view = pd.DataFrame(
        {
            "KLD (95% interval)": [
                f"{study.fmt(m)} [{study.fmt(lo)}, {study.fmt(hi)}]"
                for m, lo, hi in zip(first["kld_mean"], first["kld_lo"], first["kld_hi"], strict=True)
            ],
            "top-1 (%)": [study.fmt(v) for v in first["top1_pct"]],
            "ppl ratio": [study.fmt(v) for v in first["ppl_ratio"]],
        },
        index=first.index,
    )
    for setting in SETTINGS:
        s = both[both["setting"] == setting].set_index(keys)
        if len(s):
            view[f"{setting} (k/n)"] = [f"{int(r['retrieved'])}/{int(r['n'])}" for _, r in s.iterrows()]
    return view


# ---- the figure ---------------------------------------------------------------------------------------------------

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
DODGE = 1.0  # percentage points of budget between neighbouring policies' points, so that equal values stay visible


def retention_figure(runs: list[tuple[str, int, pd.DataFrame]], settings: list[str], title: str) -> Any:
    """Keys retrieved (%, 95% Wilson interval) against the cache budget (% of the prompt), one line per policy in
    its layout's colour and its own marker, a panel per question setting (columns) and model (rows); the policies'
    points set side by side (DODGE points of budget apart) so that none hides another; the full cache a dotted
    line (its count in the panel's title); the published counts for the model (`theirs_for`) grey: a cross at
    their kept fraction, a dashed line for their full cache. `runs`: (model, prompt tokens, accuracy rows)."""
    fig, axes = plotting.figure(ncols=len(settings), nrows=len(runs), width=5.2, height=3.8, title=title)
    axes = np.atleast_1d(axes).reshape(len(runs), len(settings))
    labels = [p for _, _, acc in runs for p in acc["policy"].unique()]
    palette, order = plotting.colors(labels)
    shown = [
        p for p in order if p != FULL and any(p in set(a.loc[a["setting"] != NO_SETTING, "policy"]) for _, _, a in runs)
    ]
    marker = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(shown)}
    offset = {p: DODGE * (i - (len(shown) - 1) / 2) for i, p in enumerate(shown)}
    theirs_seen = False
    for row, (model, tokens, acc) in enumerate(runs):
        theirs, _ = theirs_for(model)
        full = acc[acc["setting"] == NO_SETTING]
        fractions = sorted(acc.loc[acc["setting"] != NO_SETTING, "budget_fraction"].unique())
        for col, setting in enumerate(settings):
            ax = axes[row, col]
            for policy in shown:
                d = acc[(acc["policy"] == policy) & (acc["setting"] == setting)].sort_values("budget_fraction")
                if d.empty:
                    continue
                yerr = [d["accuracy_pct"] - d["low_pct"], d["high_pct"] - d["accuracy_pct"]]
                ax.errorbar(100 * d["budget_fraction"] + offset[policy], d["accuracy_pct"], yerr=yerr,
                            color=palette[policy], marker=marker[policy], markersize=5, capsize=2.5, linewidth=1.4,
                            elinewidth=0.8, alpha=0.9)  # fmt: skip
            head = ""
            if len(full):
                f = full.iloc[0]
                ax.axhline(f["accuracy_pct"], color=palette.get(FULL, "grey"), linestyle=":", linewidth=1.5)
                head = f" (full cache {int(f['retrieved'])}/{int(f['n'])})"
            t = theirs[(theirs["setting"] == setting) & (theirs["kept_fraction"] < 1.0)]
            t = t.assign(pct=100 * t["retrieved"] / t["n"])
            x_theirs = 100 * t["kept_fraction"] + DODGE * (len(shown) + 1) / 2 + 1.5  # right of our points
            ax.scatter(x_theirs, t["pct"], marker="x", color="grey", s=36, zorder=5)
            for (x, y), g in t.assign(x=x_theirs).groupby(["x", "pct"]):
                ax.annotate(f"theirs: {', '.join(g['policy'])} {g['retrieved'].iloc[0]}/{g['n'].iloc[0]}", (x, y),
                            xytext=(4, 2), textcoords="offset points", fontsize=7, color="grey")  # fmt: skip
            for _, r in theirs[theirs["kept_fraction"] >= 1.0].iterrows():
                ax.axhline(100 * r["retrieved"] / r["n"], color="grey", linestyle="--", linewidth=1)
            theirs_seen = theirs_seen or len(t) > 0 or (theirs["kept_fraction"] >= 1.0).any()
            ax.set_xticks([100 * f for f in fractions])
            ax.set_xticklabels([f"{100 * f:g}" for f in fractions])
            ax.set_xlim(100 * min(fractions) - 6, 100 * max(fractions) + (22 if len(t) else 6))
            ax.set_ylim(-5, 105)
            plotting.label(ax, f"{model} ({tokens} tokens), {setting}\n{head.strip(' ()')}",
                           "cache budget (% of the prompt)", "keys retrieved (%)")  # fmt: skip
    handles = [Line2D([], [], color=palette[p], marker=marker[p], label=p) for p in shown] + [
        Line2D([], [], color=palette.get(FULL, "grey"), linestyle=":", linewidth=1.5, label="full cache (ours)")
    ]
    if theirs_seen:
        handles += [
            Line2D([], [], color="grey", marker="x", linestyle="none", label="theirs (published)"),
            Line2D([], [], color="grey", linestyle="--", label="theirs: full cache"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return fig
