"""KL divergence and top-1 agreement against the exact cache (kvlib.measure.divergence), the batched token-by-token
reading of several passages, `perplexity --baseline`, notebook 08's agreement table and the index's decision table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kvlib.cli import main
from kvlib.core.errors import KvlibError
from kvlib.measure.divergence import bootstrap_mean_ci, divergence, log_probs, per_token, within_floor
from kvlib.measure.perplexity import check_baseline, perplexity, perplexity_passages
from kvlib.models.loading import load
from kvlib.report.decision import decision_table
from kvlib.report.findings import findings
from kvlib.study import agreement

FLOOR = 1e-6  # the bar for an exact layout against the baseline in float32 (nats)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return load("tiny-llama", weights="random", seed=0, with_hf=False)


def test_kld_of_two_known_distributions_and_top1():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.7, 0.2]])
    kld, top1 = per_token(p.log(), q.log())
    expected = (p * (p / q).log()).sum(-1).double()
    assert torch.allclose(kld, expected, atol=1e-7)
    assert kld[0] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), abs=1e-7)
    assert top1.tolist() == [False, False]
    same, top1_same = per_token(p.log(), p.log())
    assert same.abs().max() == 0 and top1_same.all()


def test_per_token_refuses_tables_of_different_shapes():
    with pytest.raises(KvlibError, match="one shape"):
        per_token(torch.zeros(3, 4), torch.zeros(3, 5))


def test_block_bootstrap_interval_holds_the_mean_and_widens_with_spread():
    rng = np.random.default_rng(0)
    calm, wild = rng.normal(1.0, 0.01, 1024), rng.normal(1.0, 1.0, 1024)
    lo, hi = bootstrap_mean_ci(calm)
    assert lo < calm.mean() < hi and hi - lo < 0.01
    wlo, whi = bootstrap_mean_ci(wild)
    assert whi - wlo > 10 * (hi - lo)
    assert bootstrap_mean_ci(wild) == (wlo, whi)  # seeded: the same interval every time
    assert all(map(math.isnan, bootstrap_mean_ci(np.ones(10))))  # one block: no spread can be estimated


def test_blocks_widen_the_interval_of_correlated_values():
    """A slow drift along the text: resampling single tokens would understate the uncertainty of the mean."""
    x = np.repeat(np.random.default_rng(1).normal(0, 1, 16), 64)  # 16 runs of 64 equal values
    lo1, hi1 = bootstrap_mean_ci(x, block=1)
    lo64, hi64 = bootstrap_mean_ci(x, block=64)
    assert hi64 - lo64 > 4 * (hi1 - lo1)


def test_batched_passages_equal_each_passage_alone_regression(lm):
    """perplexity_passages' token-by-token path reads S passages side by side in one batch: each passage's NLL and
    log probabilities equal its own batch-1 run, for an exact and an evicting layout."""
    ids = torch.randint(0, lm.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    for cache, options in (("static", {}), ("h2o", {"budget": 16})):
        both = perplexity_passages(lm.model, ids, cache, options, "token", keep_logprobs=True)
        for s in range(3):
            alone = perplexity(lm.model, ids[s : s + 1], cache, options, "token", keep_logprobs=True)
            part = slice(s * 39, (s + 1) * 39)
            assert torch.allclose(both.nll[part], alone.nll, atol=1e-5), (cache, s)
            assert torch.allclose(both.logprobs[part], alone.logprobs, atol=1e-4), (cache, s)


@pytest.mark.parametrize("cache", ["static", "paged", "dynamic"])
def test_an_exact_layout_against_the_baseline_is_at_the_floor(lm, cache):
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    base = perplexity(lm.model, ids, "static", {}, "fast", keep_logprobs=True)
    r = perplexity(lm.model, ids, cache, {}, "token", keep_logprobs=True)
    d = divergence(base.logprobs, r.logprobs, base.nll, r.nll)
    assert d.kld_mean < FLOOR and d.top1_pct == 100.0 and abs(d.ppl_ratio - 1) < 1e-5


def test_a_lossy_layout_is_above_the_floor(lm):
    ids = torch.randint(0, lm.cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(3))
    base = perplexity(lm.model, ids, "static", {}, "fast", keep_logprobs=True)
    r = perplexity(lm.model, ids, "quantized", {"bits": 2, "group": 8}, "fast", keep_logprobs=True)
    d = divergence(base.logprobs, r.logprobs, base.nll, r.nll)
    assert d.kld_mean > 100 * FLOOR and not within_floor(d.kld_mean, FLOOR)


def test_log_probs_are_normalised():
    lp = log_probs(torch.randn(5, 11) * 10)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5), atol=1e-6)


def test_cli_baseline_prints_kld_top1_and_ratio(tmp_path, capsys):
    csv = tmp_path / "ppl.csv"
    base = ["perplexity", "--model", "tiny-llama", "--weights", "random", "--tokens", "40", "--csv", str(csv)]
    assert main([*base, "--cache", "quantized", "--bits", "4", "--method", "fast", "--baseline", "static"]) == 0
    assert main([*base, "--cache", "paged", "--baseline", "static"]) == 0
    assert main([*base, "--cache", "h2o", "--budget", "16", "--baseline", "static"]) == 0
    out = capsys.readouterr().out
    assert (
        out.count("against static") == 3
        and "cache h2o budget=16" in out
        and "mean KLD" in out
        and "top-1 agreement" in out
    )
    rows = pd.read_csv(csv)
    assert list(rows["baseline"]) == ["static"] * 3
    assert rows.loc[1, "kld_mean"] < FLOOR < rows.loc[0, "kld_mean"] and rows.loc[1, "top1_pct"] == 100.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--baseline", "quantized"], "itself lossy"),
        (["--baseline", "nonsense"], "unknown baseline"),
        (["--cache", "recompute", "--window", "8", "--baseline", "static"], "does not apply"),
        (["--cache", "static", "--budget", "16"], "does not evict"),
        (["--cache", "none", "--budget", "16"], "applies to an evicting layout"),
    ],
)
def test_bad_baseline_is_one_line_exit_2(capsys, extra, message):
    base = ["perplexity", "--model", "tiny-llama", "--weights", "random", "--tokens", "24"]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_check_baseline_accepts_exact_layouts_and_no_cache():
    assert check_baseline(None) is None and check_baseline("static") == "static" and check_baseline("none") == "none"


def test_agreement_table_has_the_baseline_the_floor_and_every_lossy_layout(lm):
    p = agreement.load_passages(lm, lm.cfg.vocab_size, 2, 48, 0)
    table = agreement.measure(lm.model, p, agreement.variants(36, 8, [8]), floor_tokens=16)
    assert list(table.columns) == list(agreement.COLUMNS)
    kinds = table["kind"].tolist()
    assert kinds[0] == "baseline" and kinds[1:3] == ["floor", "floor"] and set(kinds[3:]) == {"lossy"}
    floors = table[table["kind"] == "floor"]
    assert (floors["kld_mean"] < FLOOR).all() and floors["within_floor"].all()
    assert (floors["passage_tokens"] == 16).all() and (floors["scored"] == 2 * 15).all()
    lossy = table[table["kind"] == "lossy"]
    assert (lossy["scored"] == 2 * 47).all() and not lossy["within_floor"].any()
    assert table.loc[0, "vs_run_dtype_pct"] == pytest.approx(100) and table.loc[0, "vs_16bit_pct"] == pytest.approx(200)
    q = agreement.quantized_rows(table)
    assert q.iloc[0]["kind"] == "baseline" and (q.iloc[1:]["cache"] == "quantized").all()
    assert "meaningless" in agreement.sentence(table, p).lower() or "mean nothing" in agreement.sentence(table, p)


def _fixture(tmp_path, with_acc: bool = True):
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        dict(model="m", cache="static", variant="full (static)", kind="baseline", kld_mean=0, kld_lo=0, kld_hi=0),
        dict(model="m", cache="static", variant="static (token by token)", kind="floor", kld_mean=1e-9,
             kld_lo=5e-10, kld_hi=2e-9),
        dict(model="m", cache="paged", variant="paged (token by token)", kind="floor", kld_mean=1e-9, kld_lo=5e-10,
             kld_hi=3e-9),
        dict(model="m", cache="quantized", variant="int8 per-token", kind="lossy", kld_mean=2e-9, kld_lo=1e-9,
             kld_hi=4e-9),
        dict(model="m", cache="h2o", variant="h2o", kind="lossy", kld_mean=0.2, kld_lo=0.15, kld_hi=0.25),
    ]  # fmt: skip
    a = pd.DataFrame(rows).assign(
        budget_tokens=[None, None, None, None, 256], passage_tokens=1024, passages=4,
        top1_pct=[100, 100, 100, 99.9, 80],
        ppl_ratio=[1, 1, 1, 1.0001, 1.2], ppl_change_pct=[0, 0, 0, 0.01, 20], vs_16bit_pct=[200, 200, 200, 56, 50],
    )  # fmt: skip
    a.to_csv(data / "08_agreement.csv", index=False)
    meta = {"weights": ["pretrained"], "span": "text tokens 0-4095 of the novel (4 passages of 1024 tokens)"}
    (data / "08_meta.json").write_text(json.dumps(meta))
    if with_acc:
        acc = pd.DataFrame(
            dict(model="m", cache="h2o", budget_fraction=[0.25, 0.25, 0.5], retrieved=[3, 9, 9], n=9,
                 selected=[0, 6, 6], setting=["question-after", "question-aware", "question-after"])
        )  # fmt: skip
        acc.to_csv(data / "09_accuracy.csv", index=False)
    return data


def test_decision_table_joins_quality_and_retrieval_at_one_budget(tmp_path):
    _fixture(tmp_path)
    table, sentence = decision_table(tmp_path)
    assert table["layout"].tolist() == ["full (static)", "int8 per-token", "h2o"]
    h2o = table.set_index("layout").loc["h2o"]
    assert h2o["retrieval, question after"] == "3/9 (0 selected)"
    assert h2o["retrieval, question seen"] == "9/9 (6 selected)"
    int8 = table.set_index("layout").loc["int8 per-token"]
    assert "within the floor" in int8["note"] and int8["retrieval, question after"] == ""
    assert "3e-09" in sentence and "256" in sentence
    assert decision_table(tmp_path / "nothing") is None


def test_lossy_quality_finding_names_the_floor_and_both_ends(tmp_path):
    _fixture(tmp_path, with_acc=False)
    found = [f for f in findings(tmp_path, ["08_quality"]) if "exact cache" in f.html]
    assert len(found) == 1
    text = found[0].html
    assert "3e-09" in text and "within the floor: int8 per-token" in text and "highest: h2o" in text


def test_snapkv_examined_finding_carries_the_warning_when_snapkv_misses_what_the_full_cache_retrieves(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    common = dict(model="smollm2-135m", weights="pretrained", tokens=1024, budget=256, setting="question-aware",
                  options="", shared=False, n=2, digits_kept_frac=0.5, digit_tokens_kept_frac=0.5, continuations="",
                  time_s=1.0)  # fmt: skip
    rows = [
        {**common, "variant": v, "layout": lay, "depth": d, "retrieved": k}
        for v, lay, k in (("full cache", "static", 2), ("snapkv (avg pool 5, window 32)", "snapkv", 0),
                          ("h2o", "h2o", 2))
        for d in (0.5, 0.9)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(data / "09_snapkv_ablation.csv", index=False)
    (found,) = [f for f in findings(tmp_path, ["09_what_a_cache_forgets"]) if "SnapKV" in f.html]
    assert found.contradicts and "0/2" in found.html and "⚠" in found.html
    pd.DataFrame(rows).assign(weights="random").to_csv(data / "09_snapkv_ablation.csv", index=False)
    assert not [f for f in findings(tmp_path, ["09_what_a_cache_forgets"]) if "SnapKV" in f.html]


def test_further_models_rows_stay_out_of_the_index_table_regression(tmp_path):
    """08_agreement.csv with a second model's rows after the page's: the decision table and the finding keep to the
    page's model (its floor too), and the sentence points to the page for the other one."""
    data = _fixture(tmp_path)
    a = pd.read_csv(data / "08_agreement.csv")
    other = a.assign(model="gemma", kld_hi=a["kld_hi"] * 1e6, kld_mean=a["kld_mean"] * 1e6)
    pd.concat([a, other]).to_csv(data / "08_agreement.csv", index=False)
    table, sentence = decision_table(tmp_path)
    assert table["layout"].tolist() == ["full (static)", "int8 per-token", "h2o"]
    assert "3e-09" in sentence and "gemma: notebook 08" in sentence
    assert "within the floor" in table.set_index("layout").loc["int8 per-token", "note"]
    found = [f.html for f in findings(tmp_path, ["08_quality"]) if "exact cache" in f.html]
    assert len(found) == 1 and "3e-09" in found[0]


@pytest.mark.parametrize(
    ("more", "message"),
    [
        ("gemma3-270m", "a list of"),
        ([{"model": "gemma3-270m", "passages": 2}], r"more_models\[0\]: a mapping with the keys"),
        ([{"model": "nope", "passages": 2, "passage_tokens": 64}], r"more_models\[0\]\.model"),
        ([{"model": "tiny-gemma", "passages": 0, "passage_tokens": 64}], r"more_models\[0\]\.passages"),
        ([{"model": "tiny-gemma", "passages": 1, "passage_tokens": 1}], r"more_models\[0\]\.passage_tokens"),
        ([{"model": "tiny-gemma", "passages": 1, "passage_tokens": 8}] * 2, "each model once"),
    ],
)
def test_more_models_of_notebook_08_bad_input_is_one_line(more, message):
    with pytest.raises(KvlibError, match=message):
        agreement.more_runs(more)


def test_more_models_of_notebook_08():
    runs = agreement.more_runs([{"model": "tiny-gemma", "passages": 2, "passage_tokens": 48}])
    assert runs == [agreement.MoreRun("tiny-gemma", 2, 48)] and agreement.more_runs([]) == []
