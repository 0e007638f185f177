"""The report as a reader sees it (issue 12), on small hand-made data, fast: findings computed from the CSVs and
left out when the data cannot carry them, one colour and order per path and layout, figures tidied (legends
outside, log scales, no text running into another), the random-weights banner once, progress per cell."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from kvlib import study
from kvlib.report import findings as fnd
from kvlib.report import index, pipeline
from kvlib.study import plotting

HEAD = list(study.HEADLINE_COLUMNS)


def _headline(out: Path, prefix: str, rows: list[dict]) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=HEAD).to_csv(out / "data" / f"{prefix}_headline.csv", index=False)


def _row(
    nb: str, metric: str, value: float, q25: float, q75: float, n: int, label: str = "x", note: str = "", **typed: str
) -> dict:
    return dict(notebook=nb, metric=metric, label=label, value=value, unit="x", q25=q25, q75=q75, n=n,
                headline=True, note=note, **typed)  # fmt: skip


def _speedup(out: Path, value: float, q25: float, q75: float, n: int) -> list[fnd.Finding]:
    label, note = "Speedup of cached decoding (a label for readers)", "tiny float32 cpu; naive / cached"
    row = _row("02_naive_vs_cached", "speedup", value, q25, q75, n, label, note, layout="static",
               condition="tiny float32 cpu", baseline="none")  # fmt: skip
    _headline(out, "02", [row])
    return fnd.findings(out, ["02_naive_vs_cached"])


def test_speedup_finding_states_its_number_and_links_the_notebook(tmp_path):
    (f,) = _speedup(tmp_path, 6.8, 4.2, 9.4, 3)
    assert "6.80x faster" in f.html and "static cache" in f.html and "IQR 4.20x–9.40x over 3" in f.html
    assert f.notebook == "02_naive_vs_cached" and not f.contradicts


def test_a_speedup_within_the_noise_makes_no_claim_and_no_warning(tmp_path):
    """Overlapping intervals are no finding either way (kvlib.core.stats): no ⚠, no cause, the interval stated."""
    (f,) = _speedup(tmp_path, 1.05, 0.9, 1.2, 3)
    assert not f.contradicts and "Contrary" not in f.html and "could not tell" in f.html and "holds 1" in f.html


def test_a_slower_cache_says_so(tmp_path):
    (f,) = _speedup(tmp_path, 0.5, 0.45, 0.55, 3)
    assert f.contradicts and "2.00x slower" in f.html


def test_a_comparison_on_one_repeat_is_left_out(tmp_path):
    assert _speedup(tmp_path, 6.8, 6.8, 6.8, 1) == []


def test_findings_read_typed_fields_not_display_labels(tmp_path):
    """Regression: the speedup finding recovered its cache from the label's parentheses (label.split("("))."""
    (f,) = _speedup(tmp_path, 6.8, 4.2, 9.4, 3)
    assert "static cache" in f.html and "tiny float32 cpu" in f.html and "a label for readers" not in f.html


def test_a_missing_input_is_left_out_and_any_other_error_fails_the_index_with_one_line(tmp_path):
    """Regression: a broad except turned a bug in a finding into a silently missing sentence."""
    from kvlib.core.errors import KvlibError

    assert fnd.findings(tmp_path, ["02_naive_vs_cached", "05_batch_sweep"]) == []  # nothing ran: nothing said
    (tmp_path / "data").mkdir()
    pd.DataFrame({"cache": ["static"] * 2, "batch_size": [1, 2]}).to_csv(tmp_path / "data" / "05_runs.csv", index=False)
    with pytest.raises(KvlibError, match="finding batching of 05_batch_sweep: KeyError") as e:
        fnd.findings(tmp_path, ["05_batch_sweep"])  # a file without its column: a bug or a damaged file, said
    assert "\n" not in str(e.value)


def test_batching_and_prompt_findings_use_the_spread_of_repeats(tmp_path):
    runs = pd.DataFrame(
        [
            dict(cache="static", batch_size=b, repeat=r, decode_tokens_per_s=v)
            for b, vs in ((1, (100, 101, 99)), (8, (104, 98, 102)))
            for r, v in enumerate(vs)
        ]
    )
    (tmp_path / "data").mkdir()
    runs.to_csv(tmp_path / "data" / "05_runs.csv", index=False)
    adv = pd.DataFrame([dict(repeat=r, advantage=a, prompt_len=p) for p, vs in ((16, (2, 2.1, 1.9)),
                        (256, (9, 9.5, 8.5))) for r, a in enumerate(vs)])  # fmt: skip
    adv.to_csv(tmp_path / "data" / "06_advantage.csv", index=False)
    batch, prompt = fnd.findings(tmp_path, ["05_batch_sweep", "06_prompt_sweep"])
    assert not batch.contradicts and "could not tell the decode throughput" in batch.html  # intervals overlap
    assert not prompt.contradicts and "grows with the prompt" in prompt.html and "9.00x" in prompt.html


def test_a_lossy_layout_that_lost_nothing_is_left_out(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [dict(cache="static", fits=True, total_tokens=32, held_bytes=4),
            dict(cache="window", fits=True, total_tokens=32, held_bytes=2)]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "07_window.csv", index=False)
    assert fnd.window(tmp_path) is None
    rows[1]["fits"] = False
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "07_window.csv", index=False)
    assert "<b>2.0x</b> less memory" in fnd.window(tmp_path).html


def test_missing_data_leaves_findings_out_and_unknown_notebooks_give_their_headline_rows(tmp_path):
    _headline(tmp_path, "08", [_row("08_quality", "ppl", 12.5, float("nan"), float("nan"), 1, "Perplexity, int4")])
    found = fnd.findings(tmp_path, ["02_naive_vs_cached", "07_cache_strategies", "08_quality"])
    assert [f.notebook for f in found] == ["08_quality"] and "Perplexity, int4: <b>12.5 x</b>" in found[0].html


def _report(out: Path, weights: str = "random") -> None:
    (out / "data").mkdir(parents=True)
    for nb in ("02_naive_vs_cached", "05_batch_sweep"):
        (out / f"{nb}.ipynb").write_text(json.dumps({"cells": [], "metadata": {"papermill": {}}}))
        meta = {"weights": [weights], "weights_warning": "no cached weights for tiny; using random weights"}
        (out / "data" / f"{nb[:2]}_meta.json").write_text(json.dumps(meta))
    _speedup(out, 6.8, 4.2, 9.4, 3)


def test_index_opens_with_findings_and_shows_the_banner_once(tmp_path):
    _report(tmp_path)
    page = index.build_index(tmp_path, "smoke", ["02_naive_vs_cached", "05_batch_sweep"]).read_text()
    assert page.index("<h2>Findings</h2>") < page.index("RANDOM WEIGHTS") < page.index("Headline numbers")
    assert page.count("RANDOM WEIGHTS") == 1 and page.count("using random weights") == 1
    assert "every notebook" in page
    assert "href='02_naive_vs_cached.reading.html'>notebook 02</a>" in page
    assert "href='02_naive_vs_cached.html'>full notebook with code</a>" in page
    assert "what it means" in page and "paired repeat by repeat" in page  # the speedup explained


def test_no_banner_when_every_run_was_pretrained(tmp_path):
    _report(tmp_path, weights="pretrained")
    page = index.build_index(tmp_path, "smoke", ["02_naive_vs_cached", "05_batch_sweep"]).read_text()
    assert "RANDOM WEIGHTS" not in page


# ---- palette and figures ----------------------------------------------------------------------------------------


def test_one_colour_per_path_and_layout_in_every_notebook():
    same = [
        ("kvlib static cache", "static"),
        ("paged (block 16)", "paged"),
        ("none", "kvlib naive (no cache)"),
        ("quantized int4, KIVI keys, 32-token fp tail", "int4 KIVI (per-channel keys, 32-token groups)"),
        ("quantized int8 [0 quantized]", "int8 per-token"),
    ]
    for a, b in same:
        assert plotting.color(a) == plotting.color(b), (a, b)
    waste_layouts = ["dynamic", "static", "static_context", "paged", "paged_keep"]  # 07_paged_waste: were two pink
    assert len({plotting.color(v) for v in waste_layouts}) == len(waste_layouts)
    paths = [
        "kvlib naive (no cache)",
        "kvlib dynamic cache",
        "kvlib static cache",
        "hf naive (no cache)",
        "hf dynamic cache",
        "hf static cache",
    ]
    assert len({plotting.color(v) for v in paths}) == len(paths)
    assert plotting.color("something new") == plotting.color("something new")  # unknown names: fixed too


def test_eviction_policies_have_their_own_colours_and_streaming_is_the_window():
    """Regression (issue 16): the eviction policies fell to hashed spare colours, which could collide."""
    from kvlib.caches.eviction import POLICIES

    named = [p for p in POLICIES if p != "streaming"]
    assert all(plotting.style_key(p) == p for p in named)
    assert plotting.color("streaming (4 sinks + window)") == plotting.color("streaming") == plotting.color("window")
    full = ["static", "dynamic", "window", "hybrid"]
    assert len({plotting.color(v) for v in [*named, *full]}) == len(named) + len(full)


def test_one_order_whatever_order_the_data_come_in():
    a = plotting.order(["window (sink 4 + 64)", "static", "quantized int8", "dynamic", "paged (block 16)"])
    b = plotting.order(["paged (block 16)", "dynamic", "quantized int8", "static", "window (sink 4 + 64)"])
    assert a == b == ["dynamic", "static", "paged (block 16)", "quantized int8", "window (sink 4 + 64)"]
    palette, _ = plotting.colors(["paged (block 16)", "paged (block 32)"])  # same layout twice: two shades
    assert palette["paged (block 16)"] != palette["paged (block 32)"]


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(path=p, batch_size=b, repeat=r, tps=(1000 if "static" in p else 10) * b + r)
            for p in ("kvlib static cache", "kvlib naive (no cache)")
            for b in (1, 2, 4)
            for r in range(3)
        ]
    )


def test_tidy_puts_one_legend_outside_the_panels_and_logs_decades():
    plotting.setup()
    fig, axes = plotting.figure(ncols=3, width=4, title="Batch size")
    for ax in axes:
        plotting.lines(_runs(), "batch_size", "tps", "path", ax)
        plotting.label(ax, "Decode throughput", "batch size (sequences)", "throughput (tokens/s)")
    plotting.tidy(fig)
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["kvlib naive (no cache)", "kvlib static cache"]  # the study's order, once
    assert all(
        ax.get_yscale() == "log" and "log scale" in ax.get_ylabel().replace("\n", " ") for ax in axes
    )  # 10..4000: decades
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in axes)


def test_notebook01_work_figure_keeps_growth_shapes_on_a_linear_axis():
    """Regression (issue 12): tidy's automatic log scale turned notebook 01's linear-vs-constant work curves into
    parallel-looking lines; keep_linear opts an axis out, and only that axis."""
    fig, axes = plotting.figure(ncols=2, width=4, title="Work")
    for ax in axes:
        plotting.lines(_runs(), "batch_size", "tps", "path", ax)
        plotting.label(ax, "Work", "step (count)", "work (FLOP)")
    plotting.keep_linear(axes[0])
    plotting.tidy(fig)
    assert axes[0].get_yscale() == "linear" and "log" not in axes[0].get_ylabel()
    assert axes[1].get_yscale() == "log"


def test_tidy_wraps_a_label_longer_than_its_axis():
    fig, ax = plotting.figure(width=4, height=2.5, title="t")
    ax.plot([0, 1], [0, 50])
    plotting.label(ax, "Waste", "spread (fraction)", "waste: held but not live, as a share of what was held (%)")
    plotting.tidy(fig)
    fig.canvas.draw()
    assert "\n" in ax.get_ylabel() and ax.yaxis.label.get_window_extent().height <= ax.get_window_extent().height


# ---- progress ---------------------------------------------------------------------------------------------------


def test_progress_names_the_cell_and_estimates_from_the_previous_run():
    stream = io.StringIO()
    p = pipeline.Progress("[2/7]", "02_naive_vs_cached", previous=[1.0, 30.0, 5.0], stream=stream)
    p.total = 3
    p.cell_start({"cell_type": "code", "source": "m = measure_grid(specs)\nmore"})
    p.cell_complete({"cell_type": "code"})
    p.cell_start({"cell_type": "markdown", "source": "# not counted"})
    p.cell_start({"cell_type": "code", "source": "plot()"})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[2/7] 02_naive_vs_cached: cell 1/3 (m = measure_grid(specs))")
    assert "cell 2/3 (plot())" in lines[1] and "about 35s left (previous run: 36s)" in lines[1]


@pytest.mark.parametrize("cells", [None, [{"cell_type": "code", "metadata": {}}]])
def test_no_estimate_without_a_usable_previous_run(tmp_path, cells):
    path = tmp_path / "nb.ipynb"
    if cells is not None:
        path.write_text(json.dumps({"cells": cells}))
    assert pipeline._previous_durations(path) is None


def test_more_than_perfect_scaling_is_flagged_not_celebrated(tmp_path):
    rows = [(1, (29, 30, 28)), (4, (250, 252, 254))]
    runs = pd.DataFrame(
        [
            dict(cache="static", batch_size=b, repeat=r, decode_tokens_per_s=v)
            for b, vs in rows
            for r, v in enumerate(vs)
        ]
    )
    (tmp_path / "data").mkdir()
    runs.to_csv(tmp_path / "data" / "05_runs.csv", index=False)
    f = fnd.batching(tmp_path)
    assert f.contradicts and "more than perfect scaling" in f.html and "upper bound" in f.html


def test_hybrid_finding_states_the_saving_and_whether_bytes_met_the_formula(tmp_path):
    """Issue 15: the index reports what the hybrid cache saves, computed from 04's CSVs, and says so plainly when a
    measured cache did not equal its formula."""
    data = tmp_path / "data"
    data.mkdir()
    computed = pd.DataFrame(
        [
            dict(model="m", layout=lay, tokens=t, kv_mib=mib, ratio_to_full=r, sliding_window=8, n_sliding_layers=3)
            for lay, t, mib, r in (("static", 64, 4.0, 1.0), ("hybrid", 64, 1.5, 0.375), ("hybrid", 16, 1.0, 1.0))
        ]
    )
    computed.to_csv(data / "04_hybrid_computed.csv", index=False)
    pd.DataFrame({"held_bytes": [10, 20], "formula_bytes": [10, 20]}).to_csv(data / "04_hybrid_measured.csv")
    f = fnd.hybrid_saving(tmp_path)
    assert "64 tokens it holds <b>38%</b>" in f.html and "in all 2 caches measured" in f.html and not f.contradicts
    pd.DataFrame({"held_bytes": [10, 21], "formula_bytes": [10, 20]}).to_csv(data / "04_hybrid_measured.csv")
    f = fnd.hybrid_saving(tmp_path)
    assert "differed from the formula</b> in 1 of 2" in f.html and f.contradicts
