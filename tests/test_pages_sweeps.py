"""Notebooks 05 and 06's pages (kvlib.study.batch_sweep and prompt_sweep), without running the notebooks.

- the parameters: check_parameters reads papermill's text, lists the runs the notebook measures, and refuses a bad
  value by name before anything runs;
- every page function on real measurements of the tiny model at small sizes: tidy frames, figures with their titles,
  headline rows that Outputs takes as they are, sentences computed from the frames;
- the sentences' branches on small synthetic frames: what they claim follows from the data they are given;
- every public function is typed and documented.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from matplotlib.figure import Figure

from kvlib import study
from kvlib.core.errors import KvlibError
from kvlib.measure.harness import ModelPool
from kvlib.report import pipeline
from kvlib.study import batch_sweep, prompt_sweep

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parent.parent
WHERE = "tiny float32 cpu"


def smoke(page, notebook: str, **overrides) -> dict:
    """`page.check_parameters`' arguments as the smoke profile sets them, then `overrides` (as papermill passes
    them)."""
    params = {**pipeline.profile_params(ROOT / "params", "smoke", notebook), **overrides}
    return {k: v for k, v in params.items() if k in inspect.signature(page.check_parameters).parameters}


def batch(**overrides) -> batch_sweep.Sweep:
    return batch_sweep.check_parameters(**smoke(batch_sweep, "05_batch_sweep", **overrides))


def prompt(**overrides) -> prompt_sweep.Sweep:
    return prompt_sweep.check_parameters(**smoke(prompt_sweep, "06_prompt_sweep", **overrides))


# ---- parameters ----------------------------------------------------------------------------------------------------


def test_batch_parameters_read_papermill_text_and_list_the_runs():
    s = batch(batch_sizes="[4, 1, 2, 2]", naive_max_batch_size="2", repeats="3")
    assert s.batch_sizes == [1, 2, 4] and s.repeats == 3 and s.naive_max_batch_size == 2
    assert [(x.cache, x.batch_size, x.max_new_tokens) for x in s.specs] == [
        ("static", 1, s.max_new_tokens), ("static", 2, s.max_new_tokens), ("static", 4, s.max_new_tokens),
        ("none", 1, s.naive_new_tokens), ("none", 2, s.naive_new_tokens),
    ]  # fmt: skip
    assert [x.cache for x in batch(naive_max_batch_size=0).specs] == ["static"] * 3  # no naive runs


def test_prompt_parameters_read_papermill_text_and_list_the_runs():
    s = prompt(prompt_lens="[64, 16, 32]", naive_new_tokens="4")
    assert s.prompt_lens == [16, 32, 64]
    assert [(x.cache, x.prompt_len) for x in s.specs] == [(c, p) for c in ("static", "none") for p in (16, 32, 64)]
    assert [x.cache for x in prompt(naive_new_tokens=0).specs] == ["static", "static"]  # no naive runs


@pytest.mark.parametrize(
    ("name", "value"),
    [("batch_sizes", "[8]"), ("prompt_len", 0), ("max_new_tokens", 1), ("naive_max_batch_size", -1),
     ("naive_new_tokens", 1), ("repeats", 0), ("warmup", -1), ("cache", "nope"), ("batch_sizes", "[1, oops")],
)  # fmt: skip
def test_batch_parameters_refuse_a_bad_value_by_name(name, value):
    with pytest.raises(KvlibError, match=name if name != "cache" else "unknown cache 'nope'") as e:
        batch(**{name: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("prompt_lens", "[16, 16]"), ("max_new_tokens", 1), ("batch_size", 0), ("naive_new_tokens", -1),
     ("repeats", 0), ("warmup", -1), ("cache", "nope")],
)  # fmt: skip
def test_prompt_parameters_refuse_a_bad_value_by_name(name, value):
    with pytest.raises(KvlibError, match=name if name != "cache" else "unknown cache 'nope'") as e:
        prompt(**{name: value})
    assert "\n" not in str(e.value)


def test_one_naive_token_is_refused_not_changed():
    with pytest.raises(KvlibError, match=r"naive_new_tokens must be 0 \(no naive runs\) or >= 2, got 1"):
        prompt(naive_new_tokens=1)


# ---- every page function on real measurements ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    """Both pages' grids on the tiny model: batch 1 and 2 (naive at 1), prompts of 8 and 16 tokens, 2 repeats."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLIB_NO_ROOFLINE", "1")  # the bandwidth and matmul measurements take seconds; mbu is NaN
        pool = ModelPool()
        b = batch(batch_sizes=[1, 2], prompt_len=8, max_new_tokens=3, naive_max_batch_size=1, naive_new_tokens=2,
                  warmup=0)  # fmt: skip
        p = prompt(prompt_lens=[8, 16], max_new_tokens=3, naive_new_tokens=2, warmup=0)
        yield b, batch_sweep.measure(b, pool), p, prompt_sweep.measure(p, pool), pool


def test_batch_page_on_measurements(measured, tmp_path):
    sweep, (runs, steps), *_ = measured
    assert len(runs) == 3 * sweep.repeats and not steps.empty
    runs = study.with_units(runs)
    table = batch_sweep.summary(runs)
    assert list(table.columns) == ["decode_tokens_per_s", "tpot_p50_ms", "ttft_ms", "kv_cache_mib", "mbu"]
    assert set(table.index) == {("kvlib static cache", 1), ("kvlib static cache", 2), ("kvlib naive (no cache)", 1)}
    fig = batch_sweep.batch_figure(runs, sweep.batch_sizes, WHERE, sweep.prompt_len)
    assert isinstance(fig, Figure) and fig._suptitle.get_text() == f"Batch size, {WHERE}, prompt 8"
    assert len(fig.axes) == 3
    out = study.Outputs("05_batch_sweep", tmp_path)
    out.figure(fig, "batch", batch_sweep.batch_caption(runs, sweep.repeats, 3, 2), key=True)
    assert "Cached: 3 new tokens per sequence; naive: 2." in out.figures[-1]["caption"]
    for row in batch_sweep.headline_rows(runs, sweep.cache, sweep.batch_sizes, WHERE, sweep.prompt_len):
        out.headline(**row)
    head = pd.read_csv(tmp_path / "data" / "05_headline.csv").set_index("metric")
    assert list(head.index) == ["best_throughput", "batch_throughput_gain"]
    assert head.loc["best_throughput", "headline"] and head.loc["best_throughput", "note"].startswith(WHERE)
    s = batch_sweep.scaling(runs, sweep.cache, sweep.batch_sizes)
    assert head.loc["batch_throughput_gain", "value"] == pytest.approx(s.gain)
    text = batch_sweep.sentence(runs, sweep.cache, sweep.batch_sizes)
    assert text.startswith("With the static cache, going from batch 1 to batch 2") and "at batch 1." in text


def test_prompt_page_on_measurements(measured, tmp_path):
    *_, sweep, (runs, steps), pool = measured
    assert len(runs) == 4 * sweep.repeats and not steps.empty
    runs = study.with_units(runs)
    paths = ("kvlib static cache", "kvlib naive (no cache)")
    assert set(prompt_sweep.summary(runs).index) == {(path, n) for path in paths for n in (8, 16)}
    fig = prompt_sweep.prompt_figure(runs, WHERE, sweep.batch_size)
    assert isinstance(fig, Figure) and fig._suptitle.get_text() == f"Prompt length, {WHERE}, batch 1"
    out = study.Outputs("06_prompt_sweep", tmp_path)
    out.figure(fig, "prompt", prompt_sweep.prompt_caption(sweep.repeats, 3, 2), key=True)
    out.headline(**prompt_sweep.ttft_headline(runs, sweep.cache, sweep.prompt_lens, WHERE, sweep.batch_size))
    lm = pool.get(sweep.specs[0].model_key(), need_kvlib=True, need_hf=False)
    assert study.condition(lm) == WHERE
    text = prompt_sweep.sentence(runs, sweep.cache, sweep.prompt_lens, lm.model.weight_bytes())
    assert text.startswith("From a 8- to a 16-token prompt (2x), time to first token went from")
    adv = prompt_sweep.advantage(runs, sweep.cache, sweep.prompt_lens)
    assert list(adv.columns) == ["repeat", "advantage", "prompt_len"] and len(adv) == 2 * sweep.repeats
    out.csv(adv, "advantage")
    fig = prompt_sweep.advantage_figure(adv, "tiny")
    out.figure(fig, "advantage", prompt_sweep.advantage_caption(sweep.repeats), key=True)
    out.headline(**prompt_sweep.advantage_headline(adv, sweep.prompt_lens))
    head = pd.read_csv(tmp_path / "data" / "06_headline.csv").set_index("metric")
    assert list(head.index) == ["ttft_longest_prompt_ms", "advantage_longest_prompt"]
    assert head.loc["advantage_longest_prompt", "n"] == sweep.repeats
    assert prompt_sweep.advantage_sentence(adv, sweep.prompt_lens).startswith("A naive step cost **")


# ---- the sentences' branches ----------------------------------------------------------------------------------------


def _batch_runs(tput: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"path": study.path_label("kvlib", c), "cache": c, "batch_size": b, "repeat": r, "decode_tokens_per_s": v,
          "tpot_p50_ms": 1000 * b / v} for (c, b), values in tput.items() for r, v in enumerate(values)]
    )  # fmt: skip


def test_batch_sentence_branches():
    more = _batch_runs({("static", 1): [100, 101, 102], ("static", 2): [500, 505, 510]})
    assert "**More than perfect scaling** (5.0x for 2x the sequences)" in batch_sweep.sentence(more, "static", [1, 2])
    fell = _batch_runs({("static", 1): [100, 101, 102], ("static", 2): [300, 301, 302], ("static", 4): [200, 201, 202]})
    assert "Throughput peaked at batch 2 and fell beyond it" in batch_sweep.sentence(fell, "static", [1, 2, 4])
    naive = _batch_runs({("static", 1): [100, 101, 102], ("static", 2): [190, 191, 192], ("none", 1): [10, 10, 10]})
    text = batch_sweep.sentence(naive, "static", [1, 2])
    assert "(cached tokens/s / naive tokens/s, medians): 10.1x at batch 1." in text
    rows = batch_sweep.headline_rows(naive, "static", [1, 2], WHERE, 16)
    assert rows[0]["value"] == 191 and rows[0]["note"] == f"{WHERE}, kvlib static cache, batch 2, prompt 16"
    assert rows[1]["label"] == "Throughput gain, batch 2 over batch 1 (static cache)" and "spread" not in rows[1]


def _prompt_runs(tpot: dict[int, list[float]], ttft: dict[int, list[float]], kv_mib: float) -> pd.DataFrame:
    return pd.DataFrame(
        [{"path": "kvlib static cache", "cache": "static", "prompt_len": p, "repeat": r, "ttft_ms": ttft[p][r],
          "tpot_p50_ms": v, "kv_cache_mib": kv_mib} for p, values in tpot.items() for r, v in enumerate(values)]
    )  # fmt: skip


def test_prompt_sentence_branches():
    flat, ttft = {16: [1.0, 1.01, 1.02], 256: [1.1, 1.11, 1.12]}, {16: [2.0, 2.1, 2.2], 256: [4.0, 4.1, 4.2]}
    small = prompt_sweep.sentence(_prompt_runs(flat, ttft, 0.5), "static", [16, 256], 2**20)
    assert "that is why the cached step hardly slows down" in small
    assert "TTFT grew much less than the prompt (2.0x for 16x the tokens)" in small
    big = prompt_sweep.sentence(_prompt_runs(flat, ttft, 2.0), "static", [16, 256], 2**20)
    assert "slowed only 1.10x although the cache outgrew the weights" in big
    steep = {16: [1.0, 1.01, 1.02], 256: [3.0, 3.01, 3.02]}
    assert "still the cached step slowed 3.0x" in prompt_sweep.sentence(
        _prompt_runs(steep, ttft, 0.5), "static", [16, 256], 2**20
    )


def _advantage(values: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"repeat": r, "advantage": v, "prompt_len": p} for p, vs in values.items()
                         for r, v in enumerate(vs)])  # fmt: skip


def test_advantage_sentence_branches():
    grew = prompt_sweep.advantage_sentence(_advantage({16: [1.5, 1.6, 1.7], 64: [3.0, 3.1, 3.2]}), [16, 64])
    assert "it first reached 2x at a 64-token prompt" in grew and "Here it did grow with the prompt" in grew
    shrank = prompt_sweep.advantage_sentence(_advantage({16: [5.0, 5.1, 5.2], 64: [3.0, 3.1, 3.2]}), [16, 64])
    assert "already at the shortest prompt measured (16 tokens)" in shrank and "shrank with the prompt" in shrank
    overlap = prompt_sweep.advantage_sentence(_advantage({16: [1.0, 1.2, 1.4], 64: [1.1, 1.3, 1.5]}), [16, 64])
    assert "it never reached 2x" in overlap and "could not tell whether it grew" in overlap
    one = prompt_sweep.advantage_sentence(_advantage({16: [1.0], 64: [3.0]}), [16, 64])
    assert "Whether it grew here: n too small" in one and "over 1 paired repeats" in one
    row = prompt_sweep.advantage_headline(_advantage({16: [1.0], 64: [3.0]}), [16, 64])
    assert row["metric"] == "advantage_longest_prompt" and row["value"] == 3.0 and row["spread"].n == 1


# ---- typed and documented ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [batch_sweep, prompt_sweep])
def test_every_public_function_is_typed_and_documented(page):
    assert page.__doc__.startswith(f"Notebook {'05' if page is batch_sweep else '06'}'s page: ")
    functions = [f for n, f in vars(page).items() if inspect.isfunction(f) and f.__module__ == page.__name__]
    assert functions
    for f in functions:
        if f.__name__.startswith("_"):
            continue
        sig = inspect.signature(f)
        assert f.__doc__, f.__name__
        assert sig.return_annotation is not inspect.Signature.empty, f.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), f.__name__
