"""`python -m kvlib perplexity` and its two methods: the token-by-token path through each layout, and the one-pass
shortcut (mask + fake quantization) that must equal it. Tiny random Llama weights, except one short test on the
real SmolLM2 weights (skipped when the weights' package is missing)."""

from __future__ import annotations

import gzip

import pytest
import torch

from kvlib.caches.base import make_cache, sink_window_mask
from kvlib.cli import main
from kvlib.core.config import get_preset
from kvlib.core.errors import KvlibError
from kvlib.measure.perplexity import (
    CSV_COLUMNS,
    held_bytes,
    perplexity,
    read_text,
    recompute_nll,
    recompute_targets,
)
from kvlib.measure.results import read_header
from kvlib.models.loading import load

N = 32  # tokens of the short texts: long enough for windows to slide and quantized groups to fill
TOL = 1e-6  # largest |NLL difference| (nats) between the two methods in float32 (measured: about 1e-7)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return load("tiny-llama", weights="random", seed=0, with_hf=False).model


@pytest.fixture(scope="module")
def ids(llama):
    return torch.randint(0, llama.cfg.vocab_size, (1, N), generator=torch.Generator().manual_seed(1))


def test_full_static_cache_equals_the_model_without_a_cache(llama, ids):
    naive, static = perplexity(llama, ids, "none"), perplexity(llama, ids, "static")
    assert static.scored == naive.scored == N - 1
    assert (static.nll - naive.nll).abs().max() < TOL
    assert static.kv_bytes_held == N * llama.cfg.kv_bytes_per_token(4)


def test_a_window_that_holds_the_whole_text_is_the_full_cache(llama, ids):
    full = perplexity(llama, ids, "static")
    for opts in ({"sink": 0, "window": N}, {"sink": 4, "window": N - 4}, {"sink": 2, "window": 10 * N}):
        assert (perplexity(llama, ids, "window", opts).nll - full.nll).abs().max() < TOL, opts
    # the last query scored is N - 2: a window of N - 1 still shows it every key, N - 2 does not
    assert (perplexity(llama, ids, "window", {"sink": 0, "window": N - 1}).nll - full.nll).abs().max() < TOL
    assert (perplexity(llama, ids, "window", {"sink": 0, "window": N - 2}).nll - full.nll).abs().max() > 1e-4


def test_window_contract_query_i_sees_the_sinks_and_the_last_window_keys_its_own_included(llama):
    """A window cache with sink S, window W: S + W slots at most; the keys step i returns are exactly those of
    positions j < S and i - W < j <= i (identified here by writing each position's index as its key)."""
    S, W, T = 3, 5, 20
    kv = make_cache("window", llama.cfg, 1, T, "cpu", torch.float32, sink=S, window=W)
    mask = sink_window_mask(T, S, W)
    for i in range(T):
        k = torch.full((1, llama.cfg.n_kv_head, 1, llama.cfg.head_dim), float(i))
        for layer in range(llama.cfg.n_layer):
            keys, _ = kv.update(layer, k, k, i)
        seen = sorted(int(x) for x in keys[0, 0, :, 0])
        assert seen == mask[i].nonzero().flatten().tolist(), i
        assert len(seen) <= S + W
    assert kv.k.shape[3] == S + W


def test_shortcut_equals_token_by_token_for_every_layout(llama, ids):
    cases = [
        ("static", {}),
        ("window", {"sink": 0, "window": 8}),
        ("window", {"sink": 4, "window": 12}),
        ("window", {"sink": 3, "window": 7, "positions": "cache"}),
        ("quantized", {"bits": 8}),
        ("quantized", {"bits": 4, "residual_len": 5}),
        ("quantized", {"bits": 2, "group": 8}),
        ("quantized", {"bits": 4, "key_axis": "channel", "residual_len": 4, "group": 8}),
        ("quantized", {"bits": 2, "key_axis": "channel", "residual_len": 8, "group": 16}),
        ("quantized", {"bits": 4, "rotate": True}),  # rotated (QuaRot): the same rotation both ways
        ("quantized", {"bits": 4, "key_axis": "channel", "residual_len": 4, "rotate": True}),
    ]
    for cache, opts in cases:
        slow, fast = perplexity(llama, ids, cache, opts, "token"), perplexity(llama, ids, cache, opts, "fast")
        assert (slow.nll - fast.nll).abs().max() < TOL, (cache, opts)
        assert slow.kv_bytes_held == fast.kv_bytes_held == held_bytes(llama.cfg, cache, opts, N, torch.float32)


def test_the_position_convention_matters_only_with_sinks(llama, ids):
    def ppl(**o):
        return perplexity(llama, ids, "window", o, "fast").nll

    assert (ppl(sink=0, window=8) - ppl(sink=0, window=8, positions="cache")).abs().max() < TOL
    assert (ppl(sink=4, window=8) - ppl(sink=4, window=8, positions="cache")).abs().max() > 1e-4
    with pytest.raises(KvlibError, match="learned"):
        make_cache("window", get_preset("tiny"), 1, 8, "cpu", torch.float32, positions="cache")


def test_more_bits_never_lose_to_fewer(llama, ids):
    """Per-token NLL moves away from the full cache's as bits drop (random weights: the distance, not the sign)."""
    full = perplexity(llama, ids, "static").nll
    dist = [(perplexity(llama, ids, "quantized", {"bits": b}, "fast").nll - full).abs().mean() for b in (8, 4, 2)]
    assert dist[0] < dist[1] < dist[2]


def test_recompute_batched_equals_one_window_at_a_time(llama, ids):
    """Sliding window with re-computation: the batched windows ("fast") equal one forward pass per scored token
    (the definition), for every token and for a sample of them; bytes held are one window's cache."""
    for W in (1, 5, 8):
        slow, fast = (
            perplexity(llama, ids, "recompute", {"window": W}, "token"),
            perplexity(llama, ids, "recompute", {"window": W}, "fast"),
        )
        assert slow.scored == fast.scored == N - 1
        assert (slow.nll - fast.nll).abs().max() < TOL, W
        assert fast.kv_bytes_held == W * llama.cfg.kv_bytes_per_token(4)
    every = recompute_targets(N, 8, every=3)
    assert every.tolist() == list(range(9, N, 3))
    sampled = recompute_nll(llama, ids, 8, every, "fast", batch_tokens=16)  # several batches of 2 windows
    assert (sampled - fast.nll[every - 1]).abs().max() < TOL
    with pytest.raises(KvlibError, match=r"1\.\.31"):
        recompute_nll(llama, ids, 8, torch.tensor([0, 5]))


def test_recompute_with_a_window_holding_the_text_is_the_full_cache(llama, ids):
    full = perplexity(llama, ids, "static")
    for W in (N - 1, N, 4 * N):
        for method in ("token", "fast"):
            assert (perplexity(llama, ids, "recompute", {"window": W}, method).nll - full.nll).abs().max() < TOL
    assert (perplexity(llama, ids, "recompute", {"window": N - 2}, "fast").nll - full.nll).abs().max() > 1e-4


def test_recompute_differs_from_the_window_cache_by_re_encoding_not_by_positions(llama, ids):
    """With RoPE, re-numbering the window's positions from 0 changes nothing (scores depend on i - j): the same
    windows at their original positions give the same NLL. Re-computation still differs from the window cache of
    the same size (0 sinks): there, every key was encoded when its token arrived, with its own earlier context."""
    W = 8
    renumbered = perplexity(llama, ids, "recompute", {"window": W}, "token").nll
    original = torch.empty(N - 1, dtype=torch.float64)
    with torch.inference_mode():
        for t in range(1, N):
            s = max(0, t - W)
            logits = llama(ids[:, s:t], torch.arange(s, t)[None], None, 0, None, last_only=True)[0, -1]
            original[t - 1] = torch.nn.functional.cross_entropy(logits[None].double(), ids[0, t : t + 1])
    assert (renumbered - original).abs().max() < 1e-5
    window_cache = perplexity(llama, ids, "window", {"sink": 0, "window": W}, "fast").nll
    assert (renumbered[:W] - window_cache[:W]).abs().max() < TOL  # whole prefixes: both are the full cache
    assert (renumbered - window_cache).abs().max() > 1e-3


def test_int2_codes_pack_four_to_a_byte():
    from kvlib.caches.quantized import pack_codes, unpack_codes

    codes = torch.randint(0, 4, (3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.shape == (3, 16) and torch.equal(unpack_codes(packed, 2), codes)


def test_cli_prints_and_appends_one_row(tmp_path, capsys):
    csv = tmp_path / "ppl.csv"
    args = ["perplexity", "--model", "tiny-llama", "--weights", "random", "--tokens", "24", "--csv", str(csv)]
    assert main([*args, "--cache", "window", "--sink", "2", "--window", "8"]) == 0
    assert main([*args, "--cache", "quantized", "--bits", "4", "--method", "fast"]) == 0
    assert main([*args, "--cache", "recompute", "--window", "8", "--method", "fast"]) == 0
    out, err = capsys.readouterr()
    assert "perplexity" in out and "RANDOM WEIGHTS" in err and "meaningless" in err
    assert "cache recompute window=8" in out
    assert read_header(csv) == list(CSV_COLUMNS) and len(csv.read_text().splitlines()) == 4


BAD = [
    (["--text", "/nonexistent/x.txt"], "does not exist"),
    (["--text", "/"], "not a regular file"),
    (["--tokens", "1"], "at least 2"),
    (["--cache", "window", "--sink", "30"], "does not fit"),
    (["--cache", "window", "--window", "0"], "positive"),
    (["--cache", "quantized", "--sink", "2"], "sink"),
    (["--cache", "static", "--bits", "4"], "bits"),
    (["--cache", "none", "--window", "4"], "takes no options"),
    (["--cache", "recompute", "--sink", "2"], "takes only window"),
    (["--cache", "quantized", "--bits", "3"], "8, 4 or 2"),
    (["--cache", "quantized", "--group", "5"], "does not divide"),
    (["--cache", "window", "--positions", "absolute"], "positions"),
    (["--cache", "nonsense"], "unknown cache layout"),
    (["--cache", "none", "--method", "fast"], "does not apply"),
    (["--tokens", "100000"], "context"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_input_is_one_line_exit_2_and_the_csv_untouched(tmp_path, capsys, extra, message):
    csv = tmp_path / "ppl.csv"
    csv.write_text("a,b\n")
    base = ["perplexity", "--model", "tiny-llama", "--weights", "random", "--tokens", "24"]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert main([*base, *extra, "--csv", str(csv)]) == 2
    assert csv.read_text() == "a,b\n"


def test_text_files_unreadable_or_too_short(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(KvlibError, match="cannot read"):
        read_text(bad)
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress(b"hello"))
    assert read_text(gz) == ("hello", "t.txt.gz")


def test_real_weights_full_cache_equals_hugging_face(tmp_path, capsys):
    """The one test on real weights: `python -m kvlib perplexity` with the full static cache, token by token,
    equals Hugging Face's LlamaForCausalLM on the same 32 tokens of the novel within 1e-4 in mean NLL (nats;
    measured: 2e-5 as the largest per-token difference on 256 tokens); and a text shorter than --tokens is refused."""
    from kvlib.measure.perplexity import perplexity_hf, text_token_ids
    from kvlib.models.gguf_cache import find_gguf

    try:
        find_gguf(get_preset("smollm2-135m"))
    except KvlibError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    csv = tmp_path / "ppl.csv"
    assert main(["perplexity", "--weights", "pretrained", "--tokens", "32", "--csv", str(csv)]) == 0
    import pandas as pd

    row = pd.read_csv(csv).iloc[0]
    lm = load("smollm2-135m", weights="pretrained")
    text, name = read_text(None)
    hf = perplexity_hf(lm.hf, text_token_ids(lm.tokenizer, text, 32, name))
    assert row.weights == "pretrained" and row.scored == 31
    assert abs(row.nll_mean - hf.nll_mean) < 1e-4
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    assert main(["perplexity", "--weights", "pretrained", "--tokens", "32", "--text", str(short)]) == 2
    assert "only" in capsys.readouterr().err


def test_real_weights_more_bits_never_lose_to_fewer():
    """On the real SmolLM2 and 256 tokens of the novel (one pass each): the perplexity through int8 <= int4 <= int2
    per token, and KIVI int4 <= KIVI int2 (the sanity check of issue 10: random weights show only a distance)."""
    from kvlib.measure.perplexity import text_token_ids
    from kvlib.models.gguf_cache import find_gguf

    try:
        find_gguf(get_preset("smollm2-135m"))
    except KvlibError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    lm = load("smollm2-135m", weights="pretrained", with_hf=False)
    text, name = read_text(None)
    ids = text_token_ids(lm.tokenizer, text, 256, name)

    def ppl(**o):
        return perplexity(lm.model, ids, "quantized", o, "fast").perplexity

    per_token = [ppl(bits=b) for b in (8, 4, 2)]
    kivi = [ppl(bits=b, key_axis="channel", residual_len=32, group=32) for b in (4, 2)]
    assert per_token == sorted(per_token), per_token
    assert kivi == sorted(kivi), kivi


def test_findings_of_notebook_8_are_computed_from_its_csvs(tmp_path):
    """The two headline gains of issue 10 (window only against sinks at budget W; the best saving within +1%
    perplexity) come from 08's CSVs, say when the data contradict the papers, and are left out for random weights."""
    import json

    import pandas as pd

    from kvlib.report.findings import findings

    data = tmp_path / "data"
    data.mkdir()
    meta = {"weights": ["pretrained"], "text": "the novel", "tokens": 2048, "dtype": "float32"}
    (data / "08_meta.json").write_text(json.dumps(meta))
    stream = pd.DataFrame(
        {
            "cache": ["static", "window", "window", "window", "window"],
            "sink": [None, 0, 1, 4, 4],
            "positions": [None, "original", "original", "original", "cache"],
            "budget": [None, 512, 512, 512, 512],
            "perplexity": [17.7, 32.8, 19.9, 19.5, 1.0],  # the cache-positions row is not the sinks' figure
        }
    )
    stream.to_csv(data / "08_streaming.csv", index=False)
    quant = pd.DataFrame(
        {
            "variant": ["full (static)", "int8 per-token", "int4 kivi r32 g32", "int2 kivi r32 g32"],
            "ppl_change_pct": [0.0, -0.05, 0.23, 21.0],
            "saving_pct": [0.0, 71.9, 81.2, 87.5],
            "bits_per_element": [32.0, 9.0, 6.0, 4.0],
            "vs_16bit_pct": [200.0, 56.2, 37.6, 25.0],
        }
    )
    quant.to_csv(data / "08_quantized.csv", index=False)
    found = findings(tmp_path, ["08_quality"])  # no 08_agreement.csv: that finding is left out
    assert len(found) == 2 and not any(f.contradicts for f in found)
    saving, sinks = found
    assert "<b>32.80</b>" in sinks.html and "4 sinks + 508 recent <b>19.50</b>" in sinks.html
    assert "<b>62%</b> against a 16-bit cache (81% against this run's float32 cache" in saving.html
    assert "int4 kivi r32 g32" in saving.html and "+21.0%" in saving.html
    stream.loc[1, "perplexity"] = 19.0  # window only beats every sink count
    stream.to_csv(data / "08_streaming.csv", index=False)
    quant.loc[1:, "ppl_change_pct"] = [1.5, 2.0, 21.0]
    quant.to_csv(data / "08_quantized.csv", index=False)
    found = findings(tmp_path, ["08_quality"])
    assert [f.contradicts for f in found] == [True, True] and "Contrary to StreamingLLM" in found[1].html
    (data / "08_meta.json").write_text(json.dumps({**meta, "weights": ["random"]}))
    assert findings(tmp_path, ["08_quality"]) == []


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma"])
def test_fast_method_of_an_exact_layout_on_any_architecture_equals_the_token_method(preset):
    """GPT-2 and Gemma 3 have no one-pass mask for the window or quantized layouts, but an exact cache shows each
    query every earlier key: the model's own forward pass over the whole text (Gemma applying its windows)."""
    model = load(preset, weights="random", seed=0, with_hf=False).model
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    for cache in ("static", "dynamic"):
        slow, fast = perplexity(model, ids, cache, {}, "token"), perplexity(model, ids, cache, {}, "fast")
        assert (slow.nll - fast.nll).abs().max() < TOL, (preset, cache)
        assert slow.kv_bytes_held == fast.kv_bytes_held
    with pytest.raises(KvlibError, match="exact layouts only"):
        perplexity(model, ids, "streaming", {"budget": 16}, "fast")
