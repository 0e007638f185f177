"""One palette: a colour keeps one meaning across every figure of the report.

The sweep takes every registered layout (eviction policies included), every model preset (every one the parameter
files use among them), the engines and the style table's paths (kvlib.study.plotting.swatches) and compares every
pair of colours by CIEDE2000 on their sRGB values: two things that are not shades of one another at least
plotting.DISTINCT apart, any two at least plotting.NEAR_IDENTICAL apart, and a name of the same thing (streaming is
the window) exactly its colour. The thresholds are calibrated on the pairs a careful reader took for one colour.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import yaml

import kvlib.caches  # noqa: F401  (registers the layouts)
from kvlib.caches.base import CACHE_LAYOUTS, REFERENCE, KVCache, register_layout
from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError
from kvlib.study import plotting

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def clashes(swatches: list[plotting.Swatch]) -> list[tuple[str, str, float]]:
    """Pairs of different things whose colours are too close (see the module's docstring), with their distance."""
    bad = []
    for a, b in itertools.combinations(swatches, 2):
        d = plotting.colour_distance(a.colour, b.colour)
        if b.name in (a.same_as, a.name) or a.name == b.same_as or (a.same_as and a.same_as == b.same_as):
            if d > 0:
                bad.append((a.name, b.name, d))  # one thing under two names: one colour
            continue
        need = plotting.NEAR_IDENTICAL if a.shade_of or b.shade_of else plotting.DISTINCT
        if d < need:
            bad.append((a.name, b.name, d))
    return bad


def _param_models() -> set[str]:
    """Every model preset the parameter files name (model, hybrid_model, more_models[].model)."""
    names: set[str] = set()
    for path in (ROOT / "params").rglob("*.yaml"):
        params = yaml.safe_load(path.read_text()) or {}
        names |= {params[k] for k in ("model", "hybrid_model") if isinstance(params.get(k), str)}
        names |= {m["model"] for m in params.get("more_models") or [] if isinstance(m, dict) and "model" in m}
    return names


# ---- the distance -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lab1", "lab2", "expected"),
    [  # Sharma, Wu and Dalal (2005), the CIEDE2000 test data: pairs 1, 7, 17 and 25
        ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
        ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
        ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
        ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ],
)
def test_ciede2000_matches_the_published_test_data(lab1, lab2, expected):
    assert plotting.ciede2000(lab1, lab2) == pytest.approx(expected, abs=1e-4)


def test_colour_distance_reads_hex_and_is_zero_for_one_colour():
    assert plotting.colour_distance("#0173b2", (1 / 255, 115 / 255, 178 / 255)) == pytest.approx(0, abs=1e-9)
    assert plotting.colour_distance("#000000", "#ffffff") == pytest.approx(100, abs=0.01)


def test_the_thresholds_would_have_caught_what_the_reader_found():
    """The old palette: green for paged and TOVA, pink for int4 and SnapKV (and Gemma 3 took paged's own green from
    seaborn's default cycle)."""
    assert plotting.colour_distance("#029e73", "#117733") < plotting.DISTINCT  # paged, TOVA's old colour
    assert plotting.colour_distance("#cc78bc", "#cc6677") < plotting.DISTINCT  # int4's old, SnapKV's old
    old = [plotting.Swatch("layout", "paged", "#029e73", ""), plotting.Swatch("layout", "tova", "#117733", ""),
           plotting.Swatch("model", "gemma3-270m", "#029e73", "")]  # fmt: skip
    found = {(a, b) for a, b, _ in clashes(old)}
    assert found == {("paged", "tova"), ("paged", "gemma3-270m"), ("tova", "gemma3-270m")}


# ---- the sweep --------------------------------------------------------------------------------------------------


def test_every_layout_model_and_engine_has_a_colour_of_its_own():
    swatches = plotting.swatches()
    names = {(s.kind, s.name) for s in swatches}
    assert {("layout", n) for n in CACHE_LAYOUTS} <= names
    assert _param_models() and _param_models() <= set(PRESETS)
    assert {("model", n) for n in PRESETS} <= names
    assert {("engine", "kvlib"), ("engine", "hf")} <= names
    assert len(names) == len(swatches)  # each thing once
    assert clashes(swatches) == []


def test_a_shade_is_near_its_parent_and_an_alias_is_its_thing():
    by_name = {s.name: s for s in plotting.swatches()}
    for s in by_name.values():
        if s.shade_of:
            parent = by_name[s.shade_of]
            assert parent.shade_of is None and parent.kind == s.kind, s
        if s.same_as:
            assert s.colour == by_name[s.same_as].colour, s
    assert by_name["streaming"].same_as == "window" and by_name["cached"].colour == plotting.colour_of(
        "layout", REFERENCE
    )


def test_a_clash_fails_the_sweep(monkeypatch):
    """A layout given a colour near another's (TOVA back to its old green) is caught, by name."""
    monkeypatch.setattr(CACHE_LAYOUTS["tova"], "colour", "#117733")
    assert ("paged", "tova") in {(a, b) for a, b, _ in clashes(plotting.swatches())}
    monkeypatch.setattr(CACHE_LAYOUTS["tova"], "colour", plotting.colour_of("layout", "paged"))
    assert any({a, b} == {"paged", "tova"} for a, b, _ in clashes(plotting.swatches()))


def test_a_new_layout_without_a_colour_clashes_with_nothing():
    class Plain(KVCache):
        name = "plain-palette-test"

    register_layout(Plain)
    try:
        colour = plotting.colour_of("layout", "plain-palette-test")
        assert colour in plotting._NEW_LAYOUT_COLOURS
        assert [c for c in clashes(plotting.swatches()) if "plain-palette-test" in c[:2]] == []
    finally:
        del CACHE_LAYOUTS["plain-palette-test"]


def test_every_spare_colour_for_new_layouts_is_apart_from_the_palette_and_each_other():
    taken = [s.colour for s in plotting.swatches()]
    spare = plotting._NEW_LAYOUT_COLOURS
    for c in spare:
        assert min(plotting.colour_distance(c, t) for t in taken) >= 15, c
    assert min(plotting.colour_distance(a, b) for a, b in itertools.combinations(spare, 2)) >= 15


# ---- the one place ----------------------------------------------------------------------------------------------


def test_colour_of_reads_the_class_the_tables_and_refuses_the_unknown(monkeypatch):
    assert plotting.colour_of("layout", "paged") == CACHE_LAYOUTS["paged"].colour
    monkeypatch.setattr(CACHE_LAYOUTS["paged"], "colour", "#123456")
    assert plotting.colour_of("layout", "paged") == "#123456" == plotting.color("paged (block 16)")
    assert plotting.colour_of("engine", "hf") == plotting.color("hf") != plotting.colour_of("engine", "kvlib")
    assert plotting.colour_of("model", "gemma3-270m") == plotting.color("gemma3-270m")
    assert plotting.colour_of("model", "/some/local/folder") == plotting.NEUTRAL
    for kind, name in (("layout", "nope"), ("engine", "vllm"), ("colour", "static")):
        with pytest.raises(KvlibError) as e:
            plotting.colour_of(kind, name)
        assert "\n" not in str(e.value)


def test_names_outside_the_palette_are_neutral_and_so_is_an_uncoloured_series():
    assert plotting.color("theirs (published)") == plotting.NEUTRAL
    assert plotting.color("hf quanto int4 r128") == plotting.NEUTRAL  # not kvlib's int4
    plotting.setup()
    fig, ax = plotting.figure()
    (line,) = ax.plot([0, 1], [0, 1])
    assert matplotlib.colors.to_hex(line.get_color()) == plotting.NEUTRAL
    matplotlib.pyplot.close(fig)


# ---- lines that coincide ----------------------------------------------------------------------------------------


def _three(shift: float) -> pd.DataFrame:
    y = [1.0, 2.0, 3.0]
    return pd.DataFrame({
        "layout": ["static"] * 3 + ["paged (block 8)"] * 3 + ["dynamic"] * 3,
        "x": [1, 2, 3] * 3,
        "y": y + [v + shift for v in y] + [v + 0.5 for v in y],
    })  # fmt: skip


def test_equal_lines_are_found_and_named_in_the_legend():
    assert plotting.coinciding(_three(0.0), "x", "y", "layout") == [(["static", "paged (block 8)"], True)]
    assert plotting.coinciding(_three(0.001), "x", "y", "layout") == [(["static", "paged (block 8)"], False)]
    assert plotting.coinciding(_three(0.2), "x", "y", "layout") == []
    fig, ax = plotting.figure()
    plotting.lines(_three(0.0), "x", "y", "layout", ax)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["dynamic", "static [= paged (block 8)]", "paged (block 8) [= static]"]
    palette = plotting.palette(texts)
    assert palette["static [= paged (block 8)]"] == plotting.color("static")  # the mark keeps the colour
    matplotlib.pyplot.close(fig)


def test_lines_equal_at_one_batch_size_only_do_not_coincide():
    a = _three(0.0).assign(batch=1)
    b = _three(0.0).assign(batch=2)
    b.loc[b["layout"] == "static", "y"] *= 2
    assert plotting.coinciding(pd.concat([a, b]), "x", "y", "layout", by=["batch"]) == []


# ---- the figures: no hidden series, linear axes where the shape is the point, narrow tables -----------------------


def _axes_with_data(fig) -> list:
    return [ax for ax in fig.axes if ax.has_data()]


def test_streaming_position_draws_each_line_from_where_it_leaves_the_one_it_lies_on():
    import torch

    from kvlib.study import quality
    from kvlib.study import quality_page as page

    full = torch.linspace(1.0, 2.0, 40)
    w0 = full.clone()
    w0[12:] += 1.0  # leaves the full cache at token 13
    w1 = full.clone()
    w1[20:] += 0.5  # leaves it later ...
    w4 = w1.clone()  # ... and 4 sinks score exactly as 1 sink
    labels = quality.same_budget(8, [0, 1, 4])
    fig = page.streaming_position_figure(dict(zip(labels, [full, w0, w1, w4], strict=True)), 4, 8, [0, 1, 4], "t")
    (ax,) = _axes_with_data(fig)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[0] == "full (static)" and len(ax.get_lines()) == 3 + 1  # three lines drawn and the budget's
    assert texts[1].startswith("window 0+8 (on the full (static) line up to position ")
    assert texts[2].startswith("window 1+7 = window 4+4 (on the full (static) line up to position ")
    starts = [line.get_xdata()[0] for line in ax.get_lines()[:3]]
    assert starts[0] < starts[1] < starts[2]  # nothing drawn under another line
    assert len({(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()[:3]}) == 3  # each its own look
    matplotlib.pyplot.close(fig)


def _prompt_runs() -> pd.DataFrame:
    rows = []
    for cache, path, step in (("none", "kvlib naive (no cache)", 100.0), ("static", "kvlib static cache", 1.0)):
        for p in (16, 64, 256, 1024):
            for r in range(3):
                rows.append({"path": path, "cache": cache, "prompt_len": p, "repeat": r, "ttft_ms": p / 10 + r,
                             "tpot_p50_ms": step * p / 16 + r / 10 if cache == "none" else step + r / 10,
                             "kv_cache_mib": p / 100})  # fmt: skip
    return pd.DataFrame(rows)


def test_prompt_figure_shows_the_naive_step_on_its_own_linear_axis():
    from kvlib.study import prompt_sweep

    fig = prompt_sweep.prompt_figure(_prompt_runs(), "tiny float32 cpu", 1)
    plotting.tidy(fig)  # what Outputs.figure does: a log scale wherever not kept linear
    axes = _axes_with_data(fig)
    titles = [ax.get_title() for ax in axes]
    assert titles[1] == "Per-token latency: naive step (no cache)" and titles[2] == "Per-token latency: cached step"
    assert all(ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0 for ax in axes)
    naive = axes[1].get_lines()[0].get_ydata()
    assert naive[-1] / naive[0] == pytest.approx(64, rel=0.01)  # 100 to 6400 ms, drawn as a straight line from 0
    matplotlib.pyplot.close(fig)


def test_step_latency_keeps_every_path_on_a_linear_axis():
    from kvlib.study import naive_vs_cached

    steps = pd.DataFrame([
        {"path": p, "cache": c, "position": x, "repeat": r, "step": x, "latency_ms": (v * x if c == "none" else v)}
        for p, c, v in (("kvlib naive (no cache)", "none", 100.0), ("kvlib static cache", "static", 1.0))
        for x in range(16, 24) for r in range(3)
    ])  # fmt: skip
    fig = naive_vs_cached.step_latency_figure(steps, "tiny", 1, 16)
    plotting.tidy(fig)
    assert [ax.get_yscale() for ax in _axes_with_data(fig)] == ["linear", "linear"]
    matplotlib.pyplot.close(fig)


def test_memory_figures_name_coinciding_layouts_and_colour_by_the_palette():
    from kvlib.study import memory

    measured = pd.DataFrame([
        {"layout": layout, "batch_size": b, "tokens": t, "held_mib": b * t / 512, "formula_mib": b * t / 512,
         "held_over_formula": 1.0}
        for layout in ("dynamic", "static") for b in (1, 2) for t in (16, 64)
    ])  # fmt: skip
    fig = memory.cache_bytes_figure(measured, "tiny", "float32")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "dynamic [= static]" in texts and "static [= dynamic]" in texts
    matplotlib.pyplot.close(fig)
    arch = memory.architectures()
    fig = memory.architectures_figure(arch)
    bars = {t.get_text().split("  ·  ")[0]: p.get_facecolor() for t, p in
            zip(fig.axes[0].get_yticklabels(), fig.axes[0].patches, strict=False)}  # fmt: skip
    assert matplotlib.colors.to_hex(bars["gemma3-270m"]) == plotting.colour_of("model", "gemma3-270m")
    assert matplotlib.colors.to_hex(bars["Llama-2-7B"]) == plotting.NEUTRAL
    assert fig.axes[0].get_legend() is None
    matplotlib.pyplot.close(fig)
    parts = pd.DataFrame(
        {
            "component": ["weights", "packed weight copy", "KV cache", "rest"],
            "mib": [1.0, 1.0, 0.1, 100.0],
            "layout": "dynamic",
            "batch_size": 2,
            "prompt_len": 64,
        }
    )
    fig = memory.breakdown_figure(parts)
    colours = [matplotlib.colors.to_hex(p.get_facecolor()) for p in fig.axes[0].patches]
    assert colours[2] == plotting.colour_of("layout", "dynamic")
    assert all(c[1:3] == c[3:5] == c[5:7] for i, c in enumerate(colours) if i != 2)  # the other parts: greys
    matplotlib.pyplot.close(fig)


def test_notebook_07_reading_views_have_at_most_8_columns():
    from kvlib.study.strategies import page, page_savings

    for columns in (page.COMPARISON_COLUMNS, page_savings.QUANTIZED_COLUMNS, page_savings.GQA_COLUMNS,
                    page_savings.PREFIX_COLUMNS):  # fmt: skip
        assert len(columns) <= 8, columns
    prefix = pd.DataFrame(
        {
            c: [1.0]
            for c in (
                "prefill_tokens",
                "held_bytes",
                "ttft_ms",
                "ttft_ms_min",
                "ttft_ms_max",
                "tpot_ms",
                "batch_size",
                "used_bytes",
            )
        }
        | {"variant": ["shared"], "tokens_equal": [True]}
    )
    assert list(page_savings.prefix_view(prefix).columns) == page_savings.PREFIX_COLUMNS
    assert "`data/07_prefix.csv`" in page.full_table_note(Path("/x/data/07_prefix.csv"))
