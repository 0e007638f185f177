"""Field fault, kind 3: claims from overlapping intervals. One rule for "different" (kvlib.core.stats) across the study:
fewer than three repeats a side is "n too small"; otherwise intervals of measured values (never interpolated) must
not overlap; counts are compared by their Wilson intervals; a rank correlation over tied or overlapping values is
not a finding. These tests feed the rule interleaved, tied and tiny samples, and sweep the code for the old kind."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from kvlib.core import stats
from kvlib.report import findings as fnd
from kvlib.study import passkey

ROOT = Path(__file__).resolve().parents[1]


# ---- timed values ----------------------------------------------------------------------------------------------


def test_the_field_case_two_repeats_is_n_too_small_not_a_difference():
    """The smoke report's 06_advantage rows: an interpolated IQR of [145.16, 1.83] is [37.7, 109.3], which holds
    neither measurement and lies clear of [2.10, 2.32]; that was called a difference."""
    a, b = stats.Spread.of([145.16, 1.83]), stats.Spread.of([2.32, 2.10])
    assert a.separated(b) is None and b.separated(a) is None
    assert a.excludes(1) is None
    assert "n too small" in stats.caveat(None)


def test_quartiles_are_measured_values_around_the_median_for_any_sample():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 12)
        v = [round(rng.lognormvariate(0, 1), rng.choice([0, 2, 6])) for _ in range(n)]  # rounding makes ties
        s = stats.Spread.of(v)
        assert s.q25 in v and s.q75 in v
        assert s.q25 <= s.median <= s.q75
        assert s.n == n
        if n <= 4:
            assert (s.q25, s.q75) == (min(v), max(v))


def test_separated_is_symmetric_needs_three_a_side_and_never_overlaps():
    rng = random.Random(1)
    for _ in range(3000):
        a = [rng.gauss(rng.choice([0, 1, 5]), rng.choice([0.01, 1])) for _ in range(rng.randint(1, 7))]
        b = [rng.gauss(rng.choice([0, 1, 5]), rng.choice([0.01, 1])) for _ in range(rng.randint(1, 7))]
        sa, sb = stats.Spread.of(a), stats.Spread.of(b)
        got = sa.separated(sb)
        assert got == sb.separated(sa)
        if min(len(a), len(b)) < stats.MIN_REPEATS:
            assert got is None
        elif got:  # apart: every value of the middle of one lies beyond the middle of the other
            lo, hi = (sa, sb) if sa.median < sb.median else (sb, sa)
            assert lo.q75 < hi.q25


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 3, 5], [2, 4, 6], False),  # interleaved
        ([1, 2, 3, 4, 5, 6], [1.5, 2.5, 3.5, 4.5, 5.5], False),  # interleaved, more repeats
        ([2, 2, 2], [2, 2, 2], False),  # tied
        ([1, 1.1, 0.9], [5, 5.2, 4.9], True),  # clear
        ([1, 1.1, 0.9, 40], [5, 5.2, 4.9], False),  # an outlier at n=4 widens the interval to the range
        ([1, 1.1], [5, 5.2, 4.9], None),  # tiny
        ([], [5, 5.2, 4.9], None),
    ],
)
def test_separated_on_interleaved_tied_and_tiny_samples(a, b, expected):
    assert stats.Spread.of(a).separated(stats.Spread.of(b)) is expected


def test_a_paired_ratio_excludes_one_only_with_three_pairs_and_one_outside():
    assert stats.Spread.of([2.0, 2.5]).excludes(1) is None
    assert stats.Spread.of([0.9, 1.0, 1.2]).excludes(1) is False
    assert stats.Spread.of([1.1, 1.2, 1.15]).excludes(1) is True
    assert stats.Spread.of([0.5, 1.2, 1.3, 1.4]).excludes(1) is False  # the range holds 1 at n=4


# ---- counts and rank correlations ------------------------------------------------------------------------------


def test_counts_are_apart_only_when_their_wilson_intervals_do_not_overlap():
    assert stats.counts_apart(4, 9, 2, 9) is False  # 19-73% against 6-55%
    assert stats.counts_apart(9, 9, 0, 9) is True
    assert stats.counts_apart(3, 9, 0, 9) is False
    assert stats.counts_apart(0, 0, 0, 4) is None
    rng = random.Random(2)
    for _ in range(500):
        n1, n2 = rng.randint(1, 30), rng.randint(1, 30)
        k1, k2 = rng.randint(0, n1), rng.randint(0, n2)
        got = stats.counts_apart(k1, n1, k2, n2)
        assert got == stats.counts_apart(k2, n2, k1, n1)
        (lo1, hi1), (lo2, hi2) = stats.wilson(k1, n1), stats.wilson(k2, n2)
        assert got == (hi1 < lo2 or hi2 < lo1)


def test_rank_correlation_matches_spearman_with_ties():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    rc = stats.rank_correlation(x, y)
    assert rc.rho == pytest.approx(pd.Series(x).rank().corr(pd.Series(y).rank()))
    tied = stats.rank_correlation([1, 2, 2, 3], [4, 4, 1, 0])
    assert tied.rho == pytest.approx(pd.Series([1, 2, 2, 3]).rank().corr(pd.Series([4, 4, 1, 0]).rank()))


def _counts_apart(k, n):
    return lambda i, j: stats.counts_apart(k[i], n[i], k[j], n[j])


@pytest.mark.parametrize(
    ("ppl", "k", "n", "finding"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], [4, 4, 3, 3, 2], [9] * 5, False),  # the field case: every interval overlaps
        ([1.0, 2.0, 3.0], [1, 0, 0], [4] * 3, False),  # two distinct counts, and they overlap
        ([1.0, 2.0], [9, 0], [9, 9], False),  # two pairs
        ([1.0, 1.0, 1.0, 2.0], [9, 5, 0, 0], [9] * 4, False),  # perplexity tied: one order only
        ([1.0, 2.0, 3.0, 4.0, 5.0], [9, 9, 3, 0, 0], [9] * 5, True),
    ],
)
def test_a_rank_correlation_over_tied_or_overlapping_values_is_not_a_finding(ppl, k, n, finding):
    acc = [100 * a / b for a, b in zip(k, n, strict=True)]
    rc = stats.rank_correlation(ppl, acc, "perplexity change", "keys retrieved", y_apart=_counts_apart(k, n))
    assert rc.finding is finding
    assert bool(rc.why) is not finding


# ---- the verdicts that use it ------------------------------------------------------------------------------------


def _acc(policies, k, n, setting="question-after", budget=0.25):
    rows = [
        dict(
            policy=p,
            cache="x",
            budget=256,
            budget_fraction=budget,
            setting=setting,
            retrieved=a,
            n=b,
            accuracy_pct=100 * a / b,
            selected=0,
            selectable=0,
        )
        for p, a, b in zip(policies, k, n, strict=True)
    ]
    rows.append(dict(policy="full (static)", cache="static", budget=1024, budget_fraction=1.0, setting="no eviction",
                     retrieved=9, n=9, accuracy_pct=100.0, selected=0, selectable=0))  # fmt: skip
    return pd.DataFrame(rows)


def test_passkey_verdict_field_case_is_not_a_prediction():
    """Counts 4, 4, 3, 3, 2 of 9, whose Wilson intervals all overlap, were read as 'perplexity predicted'. A ranking of
    policies is now a finding only over 5 distinct counts without ties (stats.ranks_apart): 9, 9, 3, 0, 0 is not."""
    pol = ["a", "b", "c", "d", "e"]
    kld = [1.0, 2.0, 3.0, 4.0, 5.0, 0.0]  # the last: the full cache's row
    sentence, rho, predicted = passkey.quality_verdict(_acc(pol, [4, 4, 3, 3, 2], [9] * 5).assign(kld_mean=kld),
                                                       "question-after")  # fmt: skip
    assert predicted is None and "cannot rank" in sentence and "(ties)" in sentence
    assert rho is not None and rho < -0.5  # computed, but no finding
    _, _, predicted = passkey.quality_verdict(
        _acc(pol, [9, 9, 3, 0, 0], [9] * 5).assign(kld_mean=kld), "question-after"
    )
    assert predicted is None
    _, _, predicted = passkey.quality_verdict(
        _acc(pol, [9, 7, 4, 1, 0], [9] * 5).assign(kld_mean=kld), "question-after"
    )
    assert predicted is True


def test_the_best_policy_is_named_apart_only_when_its_interval_is():
    tied = _acc(["h2o", "tova", "snapkv"], [4, 3, 2], [9] * 3)
    assert "not apart from tova, snapkv" in passkey.leader_text(tied[tied["setting"] != "no eviction"])
    clear = _acc(["h2o", "tova", "snapkv"], [9, 0, 0], [9] * 3)
    assert "apart from every other policy" in passkey.leader_text(clear[clear["setting"] != "no eviction"])


def test_the_prompt_finding_from_two_repeats_makes_no_claim(tmp_path):
    """The smoke report said '⚠ Contrary to the textbook, the cache's advantage per token shrank' from these rows."""
    (tmp_path / "data").mkdir()
    adv = pd.DataFrame(
        [dict(repeat=r, advantage=a, prompt_len=p) for p, vs in ((16, (145.16, 1.83)), (64, (2.32, 2.10)))
         for r, a in enumerate(vs)]
    )  # fmt: skip
    adv.to_csv(tmp_path / "data" / "06_advantage.csv", index=False)
    assert fnd.prompt_advantage(tmp_path) is None


def test_the_passkey_finding_names_no_best_policy_within_overlapping_intervals(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pol = ["h2o", "tova", "snapkv"]
    rows = []
    for setting in ("question-after", "question-aware"):
        a = _acc(pol, [4, 3, 2], [9] * 3, setting)
        rows.append(a[a["setting"] == setting])
    rows.append(_acc(pol, [4, 3, 2], [9] * 3).query("setting == 'no eviction'"))
    acc = pd.concat(rows).assign(model="m", tokens=1024)
    acc.to_csv(data / "09_accuracy.csv", index=False)
    acc[acc["setting"] != "no eviction"].assign(kld_mean=[1.0, 2.0, 3.0] * 2).to_csv(
        data / "09_quality.csv", index=False
    )
    head = pd.DataFrame([dict(notebook="09", metric="full_cache_retrieval", label="x", value=100, unit="%", q25=None,
                              q75=None, n=1, headline=True, note="")])  # fmt: skip
    head.to_csv(data / "09_headline.csv", index=False)
    f = fnd.passkey_retrieval(tmp_path)
    assert f is not None
    assert "not apart from tova, snapkv" in f.html
    assert "predict" not in f.html
    assert "question-after: the data cannot rank the policies (only 3 values of keys retrieved" in f.html


# ---- the kind, swept through the code ------------------------------------------------------------------------------


def _sources() -> dict[str, str]:
    files = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "kvlib").rglob("*.py")}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        files[str(nb.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return files


def test_no_interval_is_interpolated_and_no_comparison_bypasses_the_rule():
    """Every quantile, error bar, Wilson interval and rank correlation of the study comes from kvlib.core.stats: an
    interpolated quantile, seaborn's percentile interval or a hand-rolled correlation elsewhere would judge
    differences by another rule."""
    kinds = {
        "interpolated quantile": re.compile(r"\.quantile\("),
        "percentile error bar": re.compile(r"\(\s*[\"']pi[\"']\s*,"),
        "hand-made rank correlation": re.compile(r"\.rank\(\)\.corr\(|spearmanr"),
        "a Wilson interval of its own": re.compile(r"def wilson\("),
    }
    found = [
        f"{name}: {path}"
        for path, text in _sources().items()
        if path != "kvlib/core/stats.py"
        for name, pattern in kinds.items()
        if pattern.search(text)
    ]
    assert found == []


def test_every_notebook_comparison_goes_through_separated_or_excludes():
    """A sentence that calls one measurement faster or slower in bold, or says a result is contrary to expectation,
    must sit in code that asked the rule (a variable from separated/excludes) just before it."""
    judged = r"separated\(|excludes\(|\bapart\b|\bbeyond\b|\bgrew\b|\bfell\b|_apart\b"
    for path, text in _sources().items():
        if not path.startswith("notebooks/"):
            continue
        claims = r"\*\*[^*\n]*(faster|slower)[^*\n]*\*\*|[Cc]ontrary to (the usual )?expectation"
        for m in re.finditer(claims, text):
            window = text[max(0, m.start() - 800) : m.end() + 200]  # a conditional expression tests after
            assert re.search(judged, window), f"{path}: {m.group(0)!r} has no rule nearby"


def test_spread_text_and_scaled_keep_the_interval_ordered():
    s = stats.Spread.of([0.2, 0.3, 0.4]).scaled(-100)
    assert s.q25 <= s.median <= s.q75
    assert math.isnan(stats.Spread.of([]).median) and stats.Spread.of([]).separated(s) is None
