"""Notebook 09's retention, scored honestly: which positions each eviction policy keeps whatever it scores (its
sinks and recent window), so that a retrieved key outside them is counted as the policy's selection and not as
recency; the rank rule (a ranking of policies is a finding only over >= 5 distinct values without ties); the quality
side read from notebook 08's table at the same cache budget in tokens; the verdict that states both settings; the
published counts beside ours; and the figure. Tiny random Llama weights and the stand-in word tokenizer."""

from __future__ import annotations

import inspect

import matplotlib
import pandas as pd
import pytest
import torch

from kvlib.caches.base import layout_class, make_cache
from kvlib.caches.eviction import POLICIES
from kvlib.core import stats
from kvlib.core.errors import KvlibError
from kvlib.decoding.replay import record_prefill, replay
from kvlib.measure.passkey import (
    SETTINGS,
    accuracy,
    budget_options,
    key_in_protected,
    protected_positions,
    retrieval_grid,
)
from kvlib.models.loading import load
from kvlib.models.prompts import PasskeyPrompts, WordTokenizer, passkey_keys
from kvlib.report import findings as fnd
from kvlib.study import passkey as page
from kvlib.study import plotting

matplotlib.use("Agg")
AFTER, AWARE = SETTINGS


@pytest.fixture(scope="module")
def llama():
    torch.set_num_threads(1)
    return load("tiny-llama", weights="random", seed=0, with_hf=False).model


# ---- what each policy protects -------------------------------------------------------------------------------------

OPTIONS = [{"budget": 48}, {"budget": 40, "sink": 2}, {"budget": 48, "recent": 10}, {"budget": 48, "observation": 8}]


@pytest.mark.parametrize("cache", POLICIES)
def test_each_policy_states_the_sinks_and_recent_window_its_cache_protects(llama, cache):
    """The class facts (asked before any cache exists) equal what an instance protects in `_evict`."""
    cls = layout_class(cache)
    for opts in OPTIONS:
        opts = {k: v for k, v in opts.items() if k in inspect.signature(cls.__init__).parameters}
        kv = make_cache(cache, llama.cfg, 1, 128, "cpu", torch.float32, **opts)
        assert (cls.protected_sinks(opts), cls.protected_recent(opts)) == (kv.sink, kv.recent), (cache, opts)


@pytest.mark.parametrize("cache", POLICIES)
def test_every_protected_position_is_kept_after_a_compressed_prefill(llama, cache):
    """Behaviour, not bookkeeping: after a 96-token prefill compressed to 40 tokens, every position the facts call
    protected is held in every layer and head; the positions between are not all held."""
    ids = torch.randint(0, llama.cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(3))
    rec = record_prefill(llama, ids, new_tokens=1)
    options = budget_options(cache, {}, 40)
    kv = make_cache(cache, llama.cfg, 1, 97, "cpu", torch.float32, **options)
    replay(rec, kv)
    sinks, first = protected_positions(cache, options, 96)
    protected = set(range(sinks)) | set(range(first, 96))
    for layer in range(llama.cfg.n_layer):
        for head in kv.layer_positions(layer)[0]:
            kept = set(head.tolist())
            assert protected <= kept, (cache, layer)
            assert len(kept) == 40 and not set(range(sinks, first)) <= kept


def test_a_layout_that_does_not_evict_protects_everything_and_the_window_all_it_holds():
    assert protected_positions("static", {}, 100) == (100, 0)
    assert protected_positions("window", {"sink": 4, "window": 20}, 100) == (4, 80)


def _prompt(depth: float, n: int = 200):
    return PasskeyPrompts(WordTokenizer(512), n, "novel").prompt(depth, 12345)


def test_a_key_is_protected_by_the_window_at_the_start_of_the_answer():
    late, early = _prompt(0.95), _prompt(0.05)
    streaming = budget_options("streaming", {}, 100)  # 4 sinks + 96 recent
    assert key_in_protected(late, "streaming", streaming, False) and key_in_protected(
        late, "streaming", streaming, True
    )
    assert not key_in_protected(early, "streaming", streaming, False)
    # TOVA protects the newest token only: a key sentence that ends the context is protected when the context is
    # compressed before the question (question-after), not once the question was written too (question-aware)
    last = _prompt(1.0)
    assert last.key_end == last.context_len
    tova = budget_options("tova", {}, 100)
    assert key_in_protected(last, "tova", tova, False) and not key_in_protected(last, "tova", tova, True)
    assert key_in_protected(early, "static", {}, True)  # nothing is evicted: nothing to select


def test_the_grid_records_in_protected_and_accuracy_counts_the_selected(llama):
    builder = PasskeyPrompts(WordTokenizer(llama.cfg.vocab_size), 96, "novel")
    keys = passkey_keys(1, 0)
    grid = retrieval_grid(llama, WordTokenizer(llama.cfg.vocab_size), builder, [0.1, 0.95], keys,
                          [("static", {}), ("streaming", {}), ("tova", {})], [0.5], new_tokens=2)  # fmt: skip
    for _, r in grid.iterrows():
        p = builder.prompt(r["depth"], r["key"])
        opts = dict(kv.split("=") for kv in r["options"].split()) if r["options"] else {}
        opts = {k: int(v) for k, v in opts.items()}
        assert r["in_protected"] == key_in_protected(p, r["cache"], opts, r["setting"] == AWARE)
    assert grid.loc[grid["cache"] == "static", "in_protected"].all()
    assert not grid.loc[grid["cache"] == "tova", "in_protected"].all()
    # counts from a grid with known successes
    fake = grid.assign(retrieved=1)
    acc = accuracy(fake)
    for _, a in acc.iterrows():
        rows = fake[(fake["policy"] == a["policy"]) & (fake["setting"] == a["setting"])]
        assert a["selectable"] == int((~rows["in_protected"]).sum()) == a["selected"]
    none = accuracy(grid.assign(retrieved=0))
    assert (none["selected"] == 0).all() and (none["selectable"] == acc["selectable"]).all()


# ---- the rank rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "ok", "says"),
    [
        ([1, 2, 3, 4, 5], True, ""),
        ([0.1, 0.5, 0.2, 0.9, 0.3, 0.7], True, ""),
        ([4, 4, 3, 2, 1], False, "4 distinct values of keys retrieved among 5 (ties)"),
        ([0, 0, 0, 0, 9], False, "2 distinct values"),
        ([1, 2, 3, 4], False, "only 4 values of keys retrieved (at least 5 needed)"),
    ],
)
def test_a_ranking_needs_five_distinct_values_without_ties(values, ok, says):
    why = stats.ranks_apart(values, "keys retrieved")
    assert (why == "") is ok and says in why


# ---- the quality side: notebook 08's table ------------------------------------------------------------------------

POLICY_NAMES = ["streaming (4 sinks + window)", "h2o", "tova", "snapkv", "knorm"]
CACHES = ["streaming", "h2o", "tova", "snapkv", "knorm"]


def _acc(after: list[int], aware: list[int], budget: int = 256, n: int = 9, model: str = "m") -> pd.DataFrame:
    rows = [dict(policy="full (static)", cache="static", budget=1024, budget_fraction=1.0, setting="no eviction",
                 retrieved=9, n=n, selected=0, selectable=0)]  # fmt: skip
    for setting, ks in ((AFTER, after), (AWARE, aware)):
        for p, c, k in zip(POLICY_NAMES, CACHES, ks, strict=True):
            rows.append(dict(policy=p, cache=c, budget=budget, budget_fraction=budget / 1024, setting=setting,
                             retrieved=k, n=n, selected=min(k, 1), selectable=3))  # fmt: skip
    acc = pd.DataFrame(rows).assign(model=model, tokens=1024)
    acc["accuracy_pct"] = 100 * acc["retrieved"] / acc["n"]
    lo_hi = [stats.wilson(k, n) for k, n in zip(acc["retrieved"], acc["n"], strict=True)]
    acc["low_pct"], acc["high_pct"] = [100 * lo for lo, _ in lo_hi], [100 * hi for _, hi in lo_hi]
    return acc


def _quality(model: str = "m", kld=(0.5, 0.1, 0.2, 0.3, 0.4)) -> pd.DataFrame:
    rows = [dict(model=model, cache="static", variant="static", budget_tokens=None)]
    rows += [dict(model=model, cache=c, variant=layout_class(c).label(budget_options(c, {}, 256)), budget_tokens=256,
                  kld_mean=k) for c, k in zip(CACHES, kld, strict=True)]  # fmt: skip
    rows += [dict(model=model, cache="streaming", variant="streaming 0+256", budget_tokens=256, kld_mean=9.0),
             dict(model=model, cache="h2o", variant="h2o", budget_tokens=512, kld_mean=0.01),
             dict(model="other", cache="h2o", variant="h2o", budget_tokens=256, kld_mean=0.02)]  # fmt: skip
    q = pd.DataFrame(rows)
    q = q.assign(passage_tokens=1024, passages=4, kld_lo=q["kld_mean"] * 0.9, kld_hi=q["kld_mean"] * 1.1,
                 top1_pct=100 - 10 * q["kld_mean"], perplexity=10.0, ppl_ratio=1 + q["kld_mean"])  # fmt: skip
    return q


def test_quality_is_matched_by_model_layout_and_budget_in_tokens(tmp_path):
    path = tmp_path / "08_agreement.csv"
    _quality().to_csv(path, index=False)
    both = page.beside_quality(_acc([0] * 5, [0] * 5), page.read_quality(path))
    assert len(both) == 10 and set(both["budget"]) == {256}  # the 512-token row and the other model left out
    streaming = both[both["cache"] == "streaming"]
    assert set(streaming["variant"]) == {"streaming 4+252"} and set(streaming["kld_mean"]) == {0.5}
    pd.DataFrame({"model": ["m"], "cache": ["h2o"]}).to_csv(path, index=False)
    with pytest.raises(KvlibError, match="no column variant") as e:
        page.read_quality(path)
    assert "\n" not in str(e.value)


def test_quality_file_is_found_beside_the_page_or_in_the_report_above_its_stage(tmp_path):
    report = tmp_path / "report"
    stage = report / ".build" / "09_what_a_cache_forgets.abc"
    (stage / "data").mkdir(parents=True)
    assert page.quality_file(stage) is None
    (report / "data").mkdir()
    (report / "data" / "08_agreement.csv").write_text("x\n")
    assert page.quality_file(stage) == report / "data" / "08_agreement.csv"
    (stage / "data" / "08_agreement.csv").write_text("x\n")
    assert page.quality_file(stage) == stage / "data" / "08_agreement.csv"
    assert page.quality_file(tmp_path / "elsewhere") is None


def test_a_quality_ranking_is_a_finding_only_without_ties():
    q = _quality()
    tied = page.beside_quality(_acc([0, 0, 1, 0, 9], [9, 7, 5, 2, 0]), q)
    text, rho, predicted = page.quality_verdict(tied, AFTER)
    assert predicted is None and "cannot rank" in text and "3 distinct values of keys retrieved among 5 (ties)" in text
    # question-aware: 9, 7, 5, 2, 0 against KLD 0.5, 0.1, 0.2, 0.3, 0.4: streaming has the most KLD and the most keys
    text, rho, predicted = page.quality_verdict(tied, AWARE)
    assert predicted is False and "<b>did not predict</b>" in text and rho == pytest.approx(0.0)
    ordered = page.beside_quality(_acc([0] * 5, [0, 9, 7, 5, 2]), q)
    text, rho, predicted = page.quality_verdict(ordered, AWARE)
    assert predicted is True and rho == pytest.approx(-1.0) and "h2o (0.1), retrieved 9/9" in text
    text, rho, predicted = page.quality_verdict(ordered, AWARE, "top1_pct")
    assert predicted is True and rho == pytest.approx(1.0)


# ---- the verdict ------------------------------------------------------------------------------------------------


def test_the_verdict_states_both_settings_and_how_many_successes_were_selected():
    acc = _acc([0, 0, 1, 0, 3], [9, 7, 5, 2, 0])
    text = page.verdict(acc, None)
    assert f"{AFTER}: 4 of 45 keys retrieved over 5 policies × 1 budget (25%)" in text
    assert (
        "of these 4 successes, <b>2 were selected</b>" in text and "the other 2 lay in the sinks or the recent" in text
    )
    assert f"{AWARE}: 23 of 45" in text and "of these 23 successes, <b>4 were selected</b>" in text
    assert page.QUALITY_MISSING in text
    none = page.verdict(_acc([0] * 5, [0] * 5), None)
    assert f"{AFTER}: no key retrieved" in none and f"{AWARE}: no key retrieved" in none
    both = page.beside_quality(acc, _quality())
    text = page.verdict(acc, both)
    assert "Against notebook 08 at the same cache budget in tokens" in text and AFTER in text.split("Against")[1]
    assert AWARE in text.split("Against")[1]
    assert "no comparison" in page.verdict(acc, both.iloc[0:0])


def test_the_passkey_finding_states_both_settings_the_selected_counts_and_the_rank_rule(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    acc = _acc([0, 0, 1, 0, 3], [9, 7, 5, 2, 0], model="smollm2-135m")
    acc.to_csv(data / "09_accuracy.csv", index=False)
    head = pd.DataFrame([dict(metric="full_cache_retrieval", value=100.0, headline=True, n=1)])
    head.to_csv(data / "09_headline.csv", index=False)
    f = fnd.passkey_retrieval(tmp_path)
    assert f is not None and "08" not in f.html  # no 09_quality.csv: 08 did not run, nothing said of it
    assert "of these 4 successes, <b>2 were selected</b>" in f.html and "of these 23 successes" in f.html
    page.beside_quality(acc, _quality("smollm2-135m")).to_csv(data / "09_quality.csv", index=False)
    f = fnd.passkey_retrieval(tmp_path)
    assert f"{AFTER}: the data cannot rank the policies (3 distinct values of keys retrieved among 5 (ties))" in f.html
    assert f"{AWARE}: KLD against the full cache <b>did not predict</b>" in f.html


# ---- theirs beside ours, and the figure --------------------------------------------------------------------------


def test_published_counts_sit_beside_ours_with_what_differs_and_a_warning_when_apart():
    acc = _acc([0] * 5, [0] * 5, budget=768).assign(tokens=1024)
    beside = page.theirs_beside(acc, "smollm2-135m").set_index("theirs")
    assert beside.loc["knorm", "theirs (k/n)"] == "6/9" and beside.loc["knorm", "ours (k/n)"] == "0/9"
    assert beside.loc["knorm", "judged"].startswith("⚠")  # 0/9 against 6/9: the Wilson intervals do not overlap
    assert beside.loc["streaming", "judged"] == "within the intervals"  # 0/9 and 0/9
    assert beside.loc["expected attention", "ours (k/n)"] == "not run"
    assert "ours 1024-token prompts" in beside.loc["knorm", "what differs"]
    assert beside.loc["knorm", "kept"] == "75%" and "kept" not in beside.loc["knorm", "what differs"]  # same budget
    assert beside.loc["full cache", "judged"] == "within the intervals"  # 9/9 here, 7/9 theirs
    text = page.theirs_text(beside.reset_index())
    assert "⚠" in text and "knorm (question-after, 75% kept): ours 0/9, theirs 6/9" in text
    assert page.theirs_beside(acc, "tiny-llama").empty and page.theirs_text(page.theirs_beside(acc, "x")) == ""
    assert len(page.theirs_beside(acc, "smollm2-135m").columns) <= 8


def test_the_figure_has_a_panel_per_setting_and_model_every_policy_in_its_colour_and_no_point_hidden():
    runs = [("smollm2-135m", 1024, _acc([0] * 5, [0] * 5)), ("m2", 2048, _acc([1] * 5, [2] * 5, budget=512))]
    fig = page.retention_figure(runs, list(SETTINGS), "t")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert set(POLICY_NAMES) <= legend and "theirs (published)" in legend
    palette, _ = plotting.colors([*POLICY_NAMES, "full (static)"])
    lines = [line for line in panels[0].get_lines() if line.get_marker() not in (None, "None", "", "_")]
    xs = [tuple(line.get_xdata()) for line in lines]
    assert len(set(xs)) == len(xs) == 5  # equal accuracies, set side by side: five distinct x positions
    assert {matplotlib.colors.to_hex(line.get_color()) for line in lines} == {
        matplotlib.colors.to_hex(palette[p]) for p in POLICY_NAMES
    }
    assert [matplotlib.colors.to_hex(palette[p]) for p in POLICY_NAMES[:1]] == [layout_class("streaming").colour]
