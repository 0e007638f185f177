"""Pass-key retrieval (issue 16): the prompt builder, the Wilson interval, the command's bad input (one line, exit 2,
CSV untouched) and its rows, and the notebook's shared prefill, which must answer exactly as the command does.
Tiny random Llama weights and a stand-in word tokenizer; the builder is also checked with SmolLM2's tokenizer
when its converted weights are on this machine."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from kvlib.cli import main
from kvlib.core.errors import KvlibError
from kvlib.decoding.questions import answer
from kvlib.decoding.replay import record_prefill, replayed_answer
from kvlib.measure.passkey import CSV_COLUMNS, budget_options, retrieved, wilson
from kvlib.models.loading import load
from kvlib.models.prompts import (
    PASSKEY_SENTENCE,
    PasskeyPrompts,
    WordTokenizer,
    filler_sentences,
    passkey_keys,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _smollm2_tokenizer():
    from kvlib.models.gguf_cache import cache_root

    folders = sorted(cache_root().glob("SmolLM2-135M*")) if cache_root().is_dir() else []
    if not folders:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders[0])


TOKENIZERS = {"word": lambda: WordTokenizer(512), "smollm2": _smollm2_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    tok = TOKENIZERS[request.param]()
    if tok is None:
        pytest.skip("SmolLM2's converted tokenizer is not on this machine")
    return tok


# ---- the prompt builder ------------------------------------------------------------------------------------------


def _sentence_bounds(builder: PasskeyPrompts, n_filler: int) -> set[int]:
    """Token offsets within the filler where a whole sentence ends (and 0), as the builder tokenized them."""
    bounds, at = {0}, 0
    for s in builder._sentences:
        at += len(s)
        bounds.add(at)
    return {b for b in bounds if b <= n_filler} | {n_filler}


@pytest.mark.parametrize("filler", ["novel", "neutral"])
@pytest.mark.parametrize("n_tokens", [120, 257, 1024])
def test_prompts_have_exactly_the_tokens_asked_and_the_key_sentence_whole_at_the_asked_depth(
    tokenizer, filler, n_tokens
):
    builder = PasskeyPrompts(tokenizer, n_tokens, filler)
    longest = max(len(s) for s in builder._sentences)
    for depth in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        for key in (10000, 54321, 99999):
            p = builder.prompt(depth, key)
            assert len(p.ids) == n_tokens
            key_ids = list(tokenizer(PASSKEY_SENTENCE.format(key=key), add_special_tokens=False)["input_ids"])
            assert p.ids[p.key_start : p.key_end] == key_ids  # the key sentence, whole, where the prompt says
            question = list(tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
            assert p.ids[p.context_len :] == question and p.key_end <= p.context_len
            offset = p.key_start - p.filler_start
            assert offset in _sentence_bounds(builder, p.filler_tokens)  # between two sentences, never inside one
            # the nearest sentence boundary: within one sentence of the depth asked
            assert abs(offset - depth * p.filler_tokens) <= longest
            assert math.isclose(p.actual_depth, offset / p.filler_tokens)
            if hasattr(tokenizer, "convert_ids_to_tokens"):  # a real tokenizer: the text reads as it should
                text = tokenizer.decode(p.ids[p.key_start : p.key_end])
                assert text.count(str(key)) == 2


def test_depth_is_measured_in_tokens_of_the_filler(tokenizer):
    builder = PasskeyPrompts(tokenizer, 600, "neutral")  # short sentences: the depth is met closely
    for depth in (0.1, 0.5, 0.9):
        p = builder.prompt(depth, 12345)
        assert abs(p.actual_depth - depth) <= 12 / p.filler_tokens


def test_same_seed_same_keys_other_seed_other_keys():
    a, b = passkey_keys(10, seed=3), passkey_keys(10, seed=3)
    assert a == b and len(a) == 10 and all(10000 <= k <= 99999 for k in a)
    assert passkey_keys(10, seed=4) != a
    assert passkey_keys(3, seed=3) == a[:3]  # fewer keys: the first ones of the same draw


def test_too_few_tokens_and_bad_depths_are_refused(tokenizer):
    builder = PasskeyPrompts(tokenizer, 200)
    with pytest.raises(KvlibError, match="cannot hold the instruction"):
        PasskeyPrompts(tokenizer, builder.min_tokens - 1)
    assert len(PasskeyPrompts(tokenizer, builder.min_tokens).prompt(0.5, 12345).ids) == builder.min_tokens
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(KvlibError):
            builder.prompt(bad, 12345)
    with pytest.raises(KvlibError):
        builder.prompt(0.5, 1234)  # four digits


def test_novel_sentences_keep_abbreviations_and_dialogue_together():
    sentences = filler_sentences("novel")
    assert sentences[0].startswith("It is a truth universally acknowledged")
    assert not any(s.endswith(("Mr.", "Mrs.")) for s in sentences[:500])
    assert "“Do not you want to know who has taken it?” cried his wife, impatiently." in sentences[:20]
    assert filler_sentences("neutral") == [
        "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."
    ]  # fmt: skip


# ---- scoring -----------------------------------------------------------------------------------------------------


def test_retrieval_rule_is_the_five_digits_together():
    assert retrieved(" 12345. Remember", 12345)
    assert not retrieved(" 1234 5", 12345)
    assert not retrieved(" 54321", 12345)


def test_wilson_interval_matches_its_closed_forms_and_published_values():
    z2 = 1.959963984540054**2
    assert wilson(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))  # 0/n: upper bound z²/(n + z²)
    assert wilson(10, 10) == (pytest.approx(10 / (10 + z2)), pytest.approx(1.0))
    lo, hi = wilson(7, 9)  # statsmodels proportion_confint(7, 9, method="wilson"): (0.4526, 0.9368)
    assert lo == pytest.approx(0.4526, abs=1e-4) and hi == pytest.approx(0.9368, abs=1e-4)
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(KvlibError):
        wilson(3, 2)


def test_wilson_interval_holds_its_point_estimate_for_every_count():
    """Regression: at 6/6 rounding put the upper bound a hair below 1 (0.9999999999999999), so the figure's error
    bar (high - accuracy) was negative and matplotlib refused to draw notebook 09's Gemma page. Every count of every
    n up to 60: low <= k/n <= high, exactly 1 at n/n and 0 at 0/n."""
    for n in range(1, 61):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0


def test_budget_maps_to_each_layout():
    assert budget_options("window", {}, 64) == {"sink": 4, "window": 60}
    assert budget_options("window", {"sink": 0}, 64) == {"sink": 0, "window": 64}
    assert budget_options("snapkv", {}, 64) == {"budget": 64}
    assert budget_options("static", {}, None) == {}
    for cache, opts, budget, msg in (
        ("static", {}, 64, "does not evict"),
        ("quantized", {}, 64, "does not evict"),
        ("window", {}, 4, "must exceed the 4 sink"),
        ("window", {"window": 10}, 64, "not both"),
        ("streaming", {"sink": 8}, 8, "must exceed the 8 sink"),
    ):
        with pytest.raises(KvlibError, match=msg):
            budget_options(cache, opts, budget)


# ---- the command -------------------------------------------------------------------------------------------------

BASE = ["passkey", "--model", "tiny-llama", "--weights", "random", "--tokens", "100", "--keys", "2"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--depths", "0.5,1.2"], "depths must lie in [0, 1]"),
        (["--depths", "-0.1"], "depths must lie in [0, 1]"),
        (["--cache", "static", "--budget", "50"], "does not evict"),
        (["--cache", "window", "--budget", "4"], "must exceed the 4 sink"),
        (["--cache", "streaming", "--budget", "3", "--sink", "4"], "sink"),
        (["--cache", "h2o", "--budget", "300"], "exceeds the tiny-llama context of 256"),
        (["--cache", "snapkv", "--budget", "16"], "observation"),
        (["--tokens", "40"], "cannot hold the instruction"),
        (["--tokens", "250"], "exceed the tiny-llama context"),
        (["--cache", "window", "--positions", "cache", "--model", "tiny"], "positions='cache'"),
        (["--cache", "none"], "not one"),
        (["--cache", "h2o", "--bits", "4"], "bits"),
        (["--question-aware", "--question-after"], "not allowed with"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_csv(tmp_path, capsys, extra, message):
    out = tmp_path / "rows.csv"
    assert main([*BASE, *extra, "--csv", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not out.exists()


def test_bad_input_leaves_an_existing_csv_untouched(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert main([*BASE, "--depths", "0.5", "--csv", str(out)]) == 0
    before = out.read_bytes()
    assert main([*BASE, "--tokens", "40", "--csv", str(out)]) == 2
    assert out.read_bytes() == before


def test_command_writes_one_tidy_row_per_depth_and_key_and_prints_accuracy(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    args = [*BASE, "--depths", "0.2,0.8", "--cache", "streaming", "--budget", "40", "--csv", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "overall: " in text and "95% Wilson interval" in text and "setting question-after" in text
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 4
    assert {(r["depth"], r["key"]) for r in rows} == {
        (d, str(k)) for d in ("0.2", "0.8") for k in passkey_keys(2, 0)
    }  # fmt: skip
    assert {r["setting"] for r in rows} == {"question-after"} and {r["budget"] for r in rows} == {"40"}
    assert {r["weights"] for r in rows} == {"random"} and all(r["git_commit"] for r in rows)
    assert main([*args[:-2], "--question-aware"]) == 0  # the same run, the other setting
    assert "setting question-aware" in capsys.readouterr().out
    assert main([*BASE, "--depths", "0.5", "--cache", "static", "--question-aware"]) == 0
    assert "setting no eviction" in capsys.readouterr().out  # a layout that does not evict ignores the setting


# ---- the notebook's shared prefill -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return load("tiny-llama", weights="random", seed=0, with_hf=False).model


@pytest.fixture(scope="module")
def gemma():
    return load("tiny-gemma", weights="random", seed=0, with_hf=False).model  # sliding window 8: prompts cross it


@pytest.fixture(scope="module")
def gpt2():
    return load("tiny", weights="random", seed=0, with_hf=False).model


@pytest.fixture(params=["llama", "gemma", "gpt2"])
def decoder(request):
    return request.getfixturevalue(request.param)


LAYOUTS = [
    ("static", {}),
    ("dynamic", {}),
    ("window", {"sink": 4, "window": 20}),
    ("streaming", {"budget": 24}),
    ("h2o", {"budget": 24}),
    ("tova", {"budget": 24}),
    ("snapkv", {"budget": 24, "observation": 8}),
    ("knorm", {"budget": 24}),
]


def two_prompts(llama) -> tuple[torch.Tensor, int]:
    """Two 96-token pass-key prompts of the novel's filler (key at depth 0.3), as ids (2, 96), and their context
    length (the question follows it)."""
    builder = PasskeyPrompts(WordTokenizer(llama.cfg.vocab_size), 96, "novel")
    prompts = [builder.prompt(0.3, k) for k in passkey_keys(2, 1)]
    return torch.tensor([p.ids for p in prompts]), prompts[0].context_len


def by_position(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values in order of position (an evicting cache's decode steps write into the evicted
    token's slot, so two caches holding the same tokens may hold them in different slots)."""
    k, v = cache.layer_kv(layer)
    pos = cache.layer_positions(layer) if hasattr(cache, "layer_positions") else None
    if pos is None:
        return k, v
    order = pos.argsort(dim=-1)[..., None].expand_as(k)
    return k.gather(2, order), v.gather(2, order)


@pytest.mark.parametrize("cache, options", LAYOUTS)
@pytest.mark.parametrize("question_aware", [False, True])
def test_replayed_prefill_answers_exactly_as_a_real_prefill(decoder, cache, options, question_aware):
    llama = decoder  # either architecture; Gemma 3's per-call masks are cut for question-after
    if cache == "window" and llama.cfg.is_hybrid:
        pytest.skip("the window layout refuses a model with sliding layers of its own")
    ids, C = two_prompts(llama)
    real = answer(llama, ids, C, cache, options, question_aware, new_tokens=6)
    rec = record_prefill(llama, ids, new_tokens=6)
    assert len(rec.calls) == llama.cfg.n_layer  # the attention modules, not the blocks around them
    replayed = replayed_answer(llama, rec, C, cache, options, question_aware, 6)
    assert torch.equal(replayed.tokens, real.tokens)
    assert replayed.kv_bytes_held == real.kv_bytes_held
    # The same keys and values kept after every token: bit for bit when the replay is the whole prompt; for
    # question-after, the context's part of a longer prefill differs from the context's own prefill by float
    # rounding (matrix products of another length sum in another order).
    for layer in range(llama.cfg.n_layer):
        if not question_aware and layer and near_ties_decided_otherwise(replayed.cache, real.cache, layer):
            continue  # the same kept keys but for keys whose scores tie within rounding (checked there)
        for a, b in zip(by_position(replayed.cache, layer), by_position(real.cache, layer), strict=True):
            if question_aware or layer == 0:
                assert torch.equal(a, b), (cache, layer)
            else:
                assert a.shape == b.shape and (a - b).abs().max() < 1e-5, (cache, layer)


def near_ties_decided_otherwise(one, other, layer: int, tol: float = 1e-5) -> bool:
    """Whether the two caches kept different positions in `layer` (False when the same), and if so assert that
    every position only one of them kept scored within `tol` of that cache's lowest kept score: a tie that float
    rounding decided (K-norm on Gemma 3, whose RMS-normed keys all have nearly one norm), nothing else."""
    if not hasattr(one, "layer_positions"):
        return False
    a, b = one.layer_positions(layer), other.layer_positions(layer)
    if torch.equal(a.sort(-1).values, b.sort(-1).values):
        return False
    for cache, mine, theirs in ((one, a, b), (other, b, a)):
        only = ~(mine[..., :, None] == theirs[..., None, :]).any(-1)  # (B, nkv, S): kept here only
        scores = cache.scores[layer]
        lowest = scores.amin(-1, keepdim=True).expand_as(scores)
        assert bool(((scores - lowest)[only] <= tol).all()), f"layer {layer}: kept keys differ beyond a near tie"
    return True


@pytest.mark.parametrize("cache", ["streaming", "h2o", "tova", "snapkv", "knorm", "window"])
@pytest.mark.parametrize("question_aware", [False, True])
def test_budgets_sharing_one_replay_keep_and_answer_as_separate_replays(decoder, cache, question_aware):
    """replayed_answers hands one attention pass to every budget of a policy (the writes of a replay into an empty
    cache, and the attention they receive, do not depend on the budget): the same kept keys, bit for bit, and the
    same answers as one replay per budget."""
    from kvlib.decoding.replay import replay_all, replayed_answers

    llama = decoder
    if cache == "window" and llama.cfg.is_hybrid:
        pytest.skip("the window layout refuses a model with sliding layers of its own")
    ids, C = two_prompts(llama)
    rec = record_prefill(llama, ids, new_tokens=4)
    options = [budget_options(cache, {}, b) for b in (36, 48, 72)]
    shared = replayed_answers(llama, rec, C, cache, options, question_aware, 4)
    for opts, got in zip(options, shared, strict=True):
        alone = replayed_answer(llama, rec, C, cache, opts, question_aware, 4)
        assert torch.equal(got.tokens, alone.tokens) and got.kv_bytes_held == alone.kv_bytes_held, (cache, opts)
        for layer in range(llama.cfg.n_layer):
            for a, b in zip(got.cache.layer_kv(layer), alone.cache.layer_kv(layer), strict=True):
                assert torch.equal(a, b), (cache, opts, layer)
    assert len({a.kv_bytes_held for a in shared}) == 3  # three budgets, three sizes: each evicted to its own
    with pytest.raises(ValueError, match="fresh caches"):
        replay_all(rec, [shared[0].cache, shared[1].cache])
    if cache == "snapkv":
        with pytest.raises(ValueError, match="more than the budget"):
            replayed_answers(llama, rec, C, cache, [{"budget": 48}, {"budget": 48, "observation": 8}], True, 4)


def test_report_finding_from_the_notebooks_files(tmp_path):

    import pandas as pd

    from kvlib.report.findings import findings

    data = tmp_path / "data"
    data.mkdir()
    acc = pd.DataFrame(
        [("full (static)", "static", 1024, 1.0, "no eviction", 9, 9, 0, 0),
         ("h2o", "h2o", 256, 0.25, "question-after", 0, 9, 0, 6),
         ("knorm", "knorm", 256, 0.25, "question-after", 9, 9, 8, 8),
         ("tova", "tova", 256, 0.25, "question-after", 3, 9, 1, 9),
         ("h2o", "h2o", 256, 0.25, "question-aware", 7, 9, 4, 6),
         ("knorm", "knorm", 256, 0.25, "question-aware", 2, 9, 2, 9)],
        columns=["policy", "cache", "budget", "budget_fraction", "setting", "retrieved", "n", "selected", "selectable"],
    )  # fmt: skip
    acc["accuracy_pct"] = 100 * acc["retrieved"] / acc["n"]
    # Two models on the page: the second (Gemma at 2048 tokens) retrieves everything
    gemma_acc = acc.assign(retrieved=9, accuracy_pct=100.0)
    pd.concat(
        [acc.assign(model="smollm2-135m", tokens=1024), gemma_acc.assign(model="gemma3-270m", tokens=2048)]
    ).to_csv(data / "09_accuracy.csv", index=False)
    head = pd.DataFrame(
        [{"metric": m, "value": 100.0, "headline": True, "n": 1}
         for m in ("full_cache_retrieval", "full_cache_retrieval_gemma3-270m")]
    )  # fmt: skip
    head.to_csv(data / "09_headline.csv", index=False)
    (found,) = findings(tmp_path, ["09_what_a_cache_forgets"])
    assert "smollm2-135m: evicting down to 25% of a 1024-token prompt" in found.html
    assert (
        "gemma3-270m: evicting down to 25% of a 2048-token prompt, the most pass keys retrieved were <b>every "
        "policy 9/9</b>" in found.html  # every policy 9/9: no best policy to name
    )
    # both settings and how many successes were selected, per model; without notebook 08's table, no ranking
    after = "question-after: 12 of 27 keys retrieved over 3 policies × 1 budget (25%); of these 12 successes"
    assert f"{after}, <b>9 were selected</b>" in found.html
    assert "question-aware: 9 of 18 keys retrieved" in found.html and "rank" not in found.html
    # with it (09_quality.csv, written by the page when 08 ran first): three policies cannot rank (5 needed)
    quality = acc[acc["setting"] != "no eviction"].assign(
        model="smollm2-135m", tokens=1024, kld_mean=[1.0, 9.0, 4.0, 1.0, 9.0]
    )
    quality.to_csv(data / "09_quality.csv", index=False)
    (found,) = findings(tmp_path, ["09_what_a_cache_forgets"])
    assert "question-after: the data cannot rank the policies (only 3 values of keys retrieved (at least 5 needed))" \
        in found.html  # fmt: skip
    assert "predict" not in found.html.replace("perfect predictor", "")
    head.loc[1, "headline"] = False  # the second model's weights were random: its numbers are no finding
    head.to_csv(data / "09_headline.csv", index=False)
    (found,) = findings(tmp_path, ["09_what_a_cache_forgets"])
    assert "smollm2-135m: evicting" in found.html and "gemma3-270m" not in found.html
    assert "<b>knorm 9/9, apart from every other policy (95% Wilson intervals)</b> when the question came" in found.html
    assert "<b>h2o 7/9, not apart from knorm (95% Wilson intervals overlap)</b> when the policy saw" in found.html
    assert "<b>9/9</b> for the full cache" in found.html
    head.assign(headline=False).to_csv(data / "09_headline.csv", index=False)  # random weights: no finding
    assert findings(tmp_path, ["09_what_a_cache_forgets"]) == []


def test_the_notebooks_grid_answers_as_the_command_does(decoder):
    llama = decoder
    from kvlib.measure.passkey import accuracy, retrieval_grid

    tok = WordTokenizer(llama.cfg.vocab_size)
    builder = PasskeyPrompts(tok, 96, "neutral")
    keys = passkey_keys(2, 5)
    policies = [("static", {}), ("streaming", {}), ("tova", {})]
    grid = retrieval_grid(llama, tok, builder, [0.2, 0.8], keys, policies, [0.5], new_tokens=5, batch=3)
    assert len(grid) == 4 * (1 + 2 * 2)  # 4 prompts: the full cache once, each policy in both settings
    for (cache, setting), rows in grid.groupby(["cache", "setting"]):
        for depth in (0.2, 0.8):
            prompts = [builder.prompt(depth, k) for k in keys]
            ids = torch.tensor([p.ids for p in prompts])
            opts = budget_options(cache, {}, 48) if cache != "static" else {}
            real = answer(llama, ids, prompts[0].context_len, cache, opts, setting == "question-aware", 5)
            got = rows[rows["depth"] == depth].sort_values("key")
            want = sorted(zip(keys, real.tokens.tolist(), strict=True))
            assert list(got["continuation"]) == [tok.decode(t) for _, t in want], (cache, setting, depth)
    acc = accuracy(grid)
    assert set(acc["n"]) == {4} and (acc["low_pct"] <= acc["accuracy_pct"]).all()


def test_read_token_by_token_streaming_and_snapkv_keep_the_window_layouts_tokens(llama):
    """What kvlib.measure.perplexity relies on to give them the one-pass method (KVCache.one_pass)."""
    from kvlib.measure.perplexity import perplexity

    ids = torch.randint(0, llama.cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    for cache, opts, window in (
        ("streaming", {"budget": 16, "sink": 4}, {"sink": 4, "window": 12}),
        ("snapkv", {"budget": 16, "observation": 8}, {"sink": 0, "window": 16}),
    ):
        got = perplexity(llama, ids, cache, opts, "token").nll
        want = perplexity(llama, ids, "window", window, "fast").nll
        assert (got - want).abs().max() < 1e-6, cache
        assert (got - perplexity(llama, ids, "static", {}, "fast").nll).abs().max() > 1e-4  # it did evict


def test_question_after_replay_on_gemma_cuts_its_per_call_masks(gemma):
    """Regression: replaying a recorded Gemma 3 prefill up to the end of the context (question-after) passed the
    whole prompt's masks to the attention of a shorter call (a size mismatch in scaled_dot_product_attention:
    2038 against 2048 on Gemma 3 270M). The masks are now cut with the positions."""
    from kvlib.decoding.replay import replayed_answer
    from kvlib.models.gemma3 import Masks

    m = Masks(40, 0, None, torch.device("cpu"), "tiny-gemma")
    cut = m.first(30)
    assert (cut.T, cut.start) == (30, 0)
    assert torch.equal(cut.over_every_slot(8)[0], m.over_every_slot(8)[0][..., :30, :30])
    with pytest.raises(ValueError):
        m.first(41)
    builder = PasskeyPrompts(WordTokenizer(gemma.cfg.vocab_size), 64, "novel")
    prompts = [builder.prompt(0.5, k) for k in passkey_keys(2, 3)]
    ids = torch.tensor([p.ids for p in prompts])
    C = prompts[0].context_len
    rec = record_prefill(gemma, ids, new_tokens=4)
    for cache in ("streaming", "h2o"):  # one policy without attention scores, one with
        opts = budget_options(cache, {}, 24)
        got = replayed_answer(gemma, rec, C, cache, opts, False, 4)
        assert torch.equal(got.tokens, answer(gemma, ids, C, cache, opts, False, new_tokens=4).tokens), cache


def test_replay_cuts_every_input_that_runs_along_the_positions():
    """The kind of the Gemma regression above: whatever a recorded call received along its n positions is cut to
    the replayed prefix, whatever carries it (a tensor along the sequence, a query x key mask, a masks object)."""
    from kvlib.decoding.replay import _swap
    from kvlib.models.gemma3 import Masks

    old, new, n, upto = object(), object(), 12, 7
    x = torch.randn(2, n, 5)  # hidden states (B, n, C)
    cos = torch.randn(1, n, 1, 4)  # rotary tables (1, n, 1, hd)
    mask = torch.ones(2, 1, n, n, dtype=torch.bool).tril()  # a padded causal mask (B, 1, n, n)
    masks = Masks(n, 0, None, torch.device("cpu"), "m")
    assert _swap(old, old, new, n, upto) is new
    assert _swap(x, old, new, n, upto).shape == (2, upto, 5)
    assert _swap(cos, old, new, n, upto).shape == (1, upto, 1, 4)
    assert torch.equal(_swap(mask, old, new, n, upto), mask[..., :upto, :upto])
    assert upto == _swap(masks, old, new, n, upto).T
    assert _swap(3, old, new, n, upto) == 3 and _swap(x, old, new, n, n) is x  # a whole replay changes nothing


@pytest.mark.parametrize(
    "more, message",
    [
        ({"model": "tiny-gemma", "tokens": 64}, "a list of {model, tokens[, keys]} mappings"),
        ([{"model": "tiny-gemma"}], "the keys model and tokens (and optionally keys)"),
        ([{"model": "tiny-gemma", "tokens": 64, "depths": [0.5]}], "the keys model and tokens (and optionally keys)"),
        (["tiny-gemma"], "the keys model and tokens (and optionally keys)"),
        ([{"model": "tiny-gemma", "tokens": 64, "keys": 0}], "more_models[0].keys"),
        ([{"model": "no-such-model", "tokens": 64}], "parameter more_models[0].model: "),
        ([{"model": "tiny-gemma", "tokens": 1}], "more_models[0].tokens"),
        ([{"model": "tiny-llama", "tokens": 64}], "each model once"),
    ],
)
def test_page_runs_refuse_bad_more_models_with_one_line(more, message):
    from kvlib.core.errors import KvlibError
    from kvlib.study.passkey import page_runs

    with pytest.raises(KvlibError) as e:
        page_runs("tiny-llama", 96, 3, more)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_page_runs_lists_the_pages_model_first():
    from kvlib.study.passkey import page_runs

    more = [{"model": "tiny-gemma", "tokens": 64}, {"model": "tiny", "tokens": 80, "keys": 1}]
    assert page_runs("tiny-llama", 96, 3, more) == [("tiny-llama", 96, 3), ("tiny-gemma", 64, 3), ("tiny", 80, 1)]
    assert page_runs("tiny-llama", 96, 3, []) == page_runs("tiny-llama", 96, 3, None) == [("tiny-llama", 96, 3)]


def test_measure_model_tags_every_table_and_the_figure_shows_only_that_models_published_figures():
    import matplotlib

    matplotlib.use("Agg")
    from kvlib.study.passkey import measure_model, retention_figure, theirs_for

    lm = load("tiny-gemma", weights="random", seed=0, with_hf=False)
    layouts = [("static", {}), ("streaming", {}), ("h2o", {})]
    r = measure_model(lm, 80, [0.5], 2, "novel", layouts, [0.5], ["question-after"], 3, 2, 0)
    assert not r.meaningful and (r.model, r.tokens) == ("tiny-gemma", 80)
    for table in (r.grid, r.acc, r.by_depth):
        assert list(table.columns[:2]) == ["model", "tokens"] and set(table["model"]) == {"tiny-gemma"}
    assert {"selected", "selectable"} <= set(r.acc.columns) and "in_protected" in r.grid
    assert len(r.grid) == 2 * (1 + 2)
    assert len(theirs_for("tiny-gemma")[0]) == 0
    legend = [
        t.get_text() for t in retention_figure([(r.model, 80, r.acc)], ["question-after"], "t").legends[0].get_texts()
    ]
    assert "theirs (published)" not in legend
    theirs, notes = theirs_for("smollm2-135m")
    assert set(theirs["source"]) == {"kvpress"} and notes
    fig = retention_figure([("smollm2-135m", 80, r.acc)], ["question-after"], "t")
    assert "theirs (published)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_outputs_unused_returns_zeros_after_the_same_cache_writes_and_observations(llama):
    from kvlib.caches.base import make_cache
    from kvlib.models.attention import attend, outputs_unused

    cfg = llama.cfg
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, cfg.n_head, 24, cfg.head_dim, generator=g)
    k, v = (torch.randn(2, cfg.n_kv_head, 24, cfg.head_dim, generator=g) for _ in range(2))
    caches = [make_cache("h2o", cfg, 2, 32, "cpu", torch.float32, budget=16) for _ in range(2)]
    y = attend(q, k, v, caches[0], 0, 0, None, True)
    with outputs_unused():
        z = attend(q, k, v, caches[1], 0, 0, None, True)
    assert torch.equal(z, torch.zeros_like(y)) and y.abs().sum() > 0
    assert attend(q, k, v, None, 0, 0, None, True).abs().sum() > 0  # the switch is off again after the block
    with pytest.raises(RuntimeError), outputs_unused():
        raise RuntimeError("inside the block")
    assert attend(q, k, v, None, 0, 0, None, True).abs().sum() > 0  # and after an exception inside it
    import threading

    seen = []
    with outputs_unused():  # another thread decoding meanwhile computes its outputs
        t = threading.Thread(target=lambda: seen.append(attend(q, k, v, None, 0, 0, None, True).abs().sum() > 0))
        t.start()
        t.join()
    assert seen == [True]
    for a, b in zip(caches[0].layer_kv(0), caches[1].layer_kv(0), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[0].scores[0], caches[1].scores[0])


def test_a_replay_skips_every_attention_output_projection(decoder):
    """Within outputs_unused the attention modules return before their output projection (o_proj / c_proj):
    nothing of it reaches a replayed cache. The replay tests above prove the answers unchanged."""
    from kvlib.caches.base import make_cache
    from kvlib.decoding.replay import replay

    builder = PasskeyPrompts(WordTokenizer(decoder.cfg.vocab_size), 80, "novel")
    ids = torch.tensor([builder.prompt(0.5, k).ids for k in passkey_keys(2, 3)])
    rec = record_prefill(decoder, ids, new_tokens=2)
    calls = []
    projections = [getattr(b, "self_attn", None) or b.attn for b in decoder.h]
    projections = [getattr(a, "o_proj", None) or a.c_proj for a in projections]  # Llama, Gemma 3 / GPT-2
    handles = [p.register_forward_hook(lambda *a: calls.append(1)) for p in projections]
    try:
        kv = make_cache("h2o", decoder.cfg, 2, 82, "cpu", torch.float32, budget=40)
        replay(rec, kv)
        assert calls == [] and kv.layer_kv(0)[0].shape[2] == 40
        with torch.inference_mode():
            decoder(ids[:, :4], torch.arange(4).expand(2, 4))  # outside a replay the projection runs
        assert len(calls) == decoder.cfg.n_layer
    finally:
        for h in handles:
            h.remove()
