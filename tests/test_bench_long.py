"""The bench's long-context rows (kvlib.measure.bench.long): one shared prefill feeds every engine's cache, the
engines agree with kvlib's exact cache, the int8 cache's bytes and error are measured, and the targets judge them."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import kvlib.measure.bench.long as long
from kvlib.cli import main
from kvlib.core.errors import KvlibError
from kvlib.measure.harness import ModelPool
from kvlib.measure.roofline import decode_step_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_rows():
    torch.manual_seed(0)
    got = long.measure_long(
        long.LongRow("tiny-llama", 2, 80), ModelPool(), rounds=3, bandwidth_bytes_per_s=1e10, weights="random"
    )
    return got.rows


def test_every_engine_measured_from_one_prefill_agrees_with_the_exact_cache(tiny_rows):
    by = {r["engine"]: r for r in tiny_rows}
    assert list(by) == [label for label, *_ in long.ENGINES]
    assert all(r["rounds"] == 3 and r["context"] == 80 and r["batch_size"] == 2 for r in tiny_rows)
    assert by["kvlib static"]["kld_vs_kvlib_static"] == 0 and by["kvlib static"]["ratio_vs_kvlib_static"] == 1
    for hf in ("hf-dynamic", "hf-static"):  # HF decoding from the cache kvlib filled: the same model, same logits
        assert by[hf]["top1_vs_kvlib_static"] == 1.0 and by[hf]["max_abs_logit_diff"] < 1e-4, hf
    # int8 is lossy, measured not assumed: a small but non-zero divergence
    assert 0 < by["kvlib int8"]["kld_vs_kvlib_static"] < 1e-2


def test_bytes_floor_and_mbu_follow_their_definitions(tiny_rows):
    from kvlib.core.config import PRESETS

    cfg = PRESETS["tiny-llama"]
    weights = decode_step_bytes(cfg, 2, 0, torch.float32)
    dense = 80 * 2 * cfg.kv_bytes_per_token(4)
    by = {r["engine"]: r for r in tiny_rows}
    for r in tiny_rows:
        assert r["floor_ms"] == pytest.approx(1e3 * r["step_bytes"] / 1e10)
        assert r["mbu"] == pytest.approx(r["floor_ms"] / r["tpot_p50_ms"])
        assert r["tpot_min_ms"] <= r["tpot_p50_ms"] <= r["tpot_max_ms"]
    assert by["kvlib static"]["step_bytes"] == weights + dense == by["hf-dynamic"]["step_bytes"]
    assert weights < by["kvlib int8"]["step_bytes"] < weights + dense / 2  # codes and scales, not floats


def test_a_model_with_sliding_layers_is_refused_in_one_line_before_loading(monkeypatch):
    import kvlib.measure.harness as harness

    monkeypatch.setattr(harness, "load", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(KvlibError, match="sliding-window layers"):
        long.measure_long(long.LongRow("tiny-gemma", 1, 16), ModelPool(), 2, 1e10)


def _engine_rows(static_ms, int8_ms, dyn_ms, sta_ms, mbu=0.75):
    rows = []
    for label, ms in (
        ("kvlib static", static_ms),
        ("kvlib int8", int8_ms),
        ("hf-dynamic", dyn_ms),
        ("hf-static", sta_ms),
    ):
        rows.append(
            {"model": "m", "batch_size": 4, "context": 4096, "engine": label, "tpot_p50_ms": ms, "mbu": mbu,
             "kld_vs_kvlib_static": 1e-4 if label == "kvlib int8" else 0.0, "top1_vs_kvlib_static": 1.0, "rounds": 8}
        )  # fmt: skip
    return rows


def test_summary_ratios_and_target_verdicts():
    s = long.summary(_engine_rows(100.0, 70.0, 200.0, 130.0))
    assert s["vs_hf_best"] == pytest.approx(1.3) and s["int8_vs_static"] == pytest.approx(100 / 70)
    text, met = long.target_report([s])
    assert met and text.count("met ") == 3 and "int8 KL divergence 1.00e-04 nats" in text
    slow = long.summary(_engine_rows(100.0, 120.0, 200.0, 129.0, mbu=math.nan))
    text, met = long.target_report([slow])
    assert not met and text.count("MISSED") == 3  # NaN MBU is not met; 1.29x HF; int8 slower
    assert long.target_report([])[0].count("n/a") == len(long.LONG_TARGETS)


def test_unmeasured_long_rows_miss_the_targets():
    """Regression: every long row past its time bound once left `bench --strict` counting the long targets met."""
    text, met = long.target_report([], planned=1)
    assert not met and text.count("MISSED") == len(long.LONG_TARGETS) and "1 of 1 rows not measured" in text
    s = long.summary(_engine_rows(100.0, 70.0, 200.0, 130.0))
    text, met = long.target_report([s], planned=2)  # one measured and meeting every target, one not measured
    assert not met and "1 of 2 rows not measured" in text
    assert long.target_report([s], planned=1)[1]


def test_long_targets_are_data_and_a_bad_entry_is_refused():
    assert [t.name for t in long.LONG_TARGETS] == ["long_mbu", "long_vs_hf_best", "int8_vs_static"]
    assert all(t.source and "issue" not in t.source.lower() for t in long.LONG_TARGETS)
    with pytest.raises(ValueError, match="checks 'speed'"):
        long.load_long_targets("long_context: [{name: x, column: speed, minimum: 1, text: t, source: s}]")


def test_bench_cli_writes_the_long_rows_to_their_own_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    monkeypatch.setattr(long, "LONG_ROWS", (long.LongRow("tiny-llama", 2, 40),))
    csv, long_csv = tmp_path / "b.csv", tmp_path / "long.csv"
    args = ["bench", "--model", "tiny-llama", "--weights", "random", "--prompt_len", "8", "--max_new_tokens", "3",
            "--repeats", "1", "--warmup", "0", "--no-compile", "--dtypes", "float32", "--batch-sizes", "1",
            "--long-rounds", "2", "--csv", str(csv), "--long-csv", str(long_csv)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "long context" in out and "int8 KL divergence" in out and str(long_csv) in out
    df = pd.read_csv(long_csv)
    assert list(df.columns) == long.COLUMNS and len(df) == 4 and (df["rounds"] == 2).all()
    assert main([*args, "--no-long"]) == 0 and len(pd.read_csv(long_csv)) == 4  # --no-long: none appended
    assert main([*args[:-2], "--long-csv", str(csv)]) == 2  # the same file for both: refused in one line
    assert "name the same file" in capsys.readouterr().err


def test_contexts_from_one_prefill_equal_a_model_run_on_the_prefix():
    """Each context's caches are the shared prefill's first c slots: kvlib static's logits there equal the model's
    own logits over the passage (one forward pass, no cache), so slicing the prefix is not an approximation."""
    from kvlib.models.prompts import prompts_for

    torch.manual_seed(0)
    pool = ModelPool()
    got = long.measure_long(long.LongRow("tiny-llama", 2, 60), pool, rounds=2, bandwidth_bytes_per_s=1e10,
                            contexts=[24, 60])  # fmt: skip
    assert sorted({r["context"] for r in got.rows}) == [24, 60] and len(got.rows) == 8
    assert len(got.steps) == 2 * len(long.ENGINES) * 2 and {s["round"] for s in got.steps} == {1, 2}
    lm = next(iter(pool._models.values()))
    text = prompts_for(lm.cfg.vocab_size, lm.tokenizer, 1, 60 + 3, 0)
    with torch.inference_mode():
        full = lm.hf(input_ids=text).logits[0].float()  # (63, V): logits after each token
    for c in (24, 60):
        assert torch.allclose(got.logits[(c, "kvlib static")], full[c + 1 : c + 3], atol=1e-4)  # warm-up left out
    by = {(r["context"], r["engine"]): r for r in got.rows}
    assert by[(24, "kvlib int8")]["step_bytes"] < by[(60, "kvlib int8")]["step_bytes"]
    with pytest.raises(KvlibError, match="contexts must lie"):
        long.measure_long(long.LongRow("tiny-llama", 2, 60), pool, 2, 1e10, contexts=[61])
    for bad, message in (({"rounds": -3}, "rounds"), ({"contexts": ["4"]}, "contexts")):
        with pytest.raises(KvlibError, match=message):  # one line, before anything is loaded
            long.measure_long(long.LongRow("tiny-llama", 2, 60), ModelPool(), **{"rounds": 2, **bad},
                              bandwidth_bytes_per_s=1e10)  # fmt: skip
