"""The study's notebooks and parameter profiles, checked without running them (fast); plus the helpers they share.

The end-to-end run of the smoke report is tests/test_report.py.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvlib import study
from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError
from kvlib.report import pipeline
from kvlib.report.index import build_index
from kvlib.study import costs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
NAMES = pipeline.discover(NOTEBOOKS)
PROFILES = pipeline.profiles(PARAMS)
COMMON_KEYS = {"model", "weights", "device", "dtype", "seed"}


def load_nb(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


def test_the_six_notebooks_and_four_profiles_exist():
    assert NAMES[:6] == [
        "01_concept",
        "02_naive_vs_cached",
        "03_huggingface",
        "04_memory",
        "05_batch_sweep",
        "06_prompt_sweep",
    ]
    assert {"smoke", "default", "full", "gpu"} <= set(PROFILES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    for cell in load_nb(name)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name}: a code cell has outputs"
            assert cell["execution_count"] is None, f"{name}: a code cell has an execution count"
        assert "papermill" not in cell.get("metadata", {}), f"{name}: papermill metadata left in a cell"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    """A markdown title first, then one `parameters` cell of literal assignments, declaring the shared keys."""
    cells = load_nb(name)["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and cells[1] is tagged[0], f"{name}: the second cell must be the only parameters cell"
    tree = ast.parse("".join(tagged[0]["source"]))
    names = []
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{name}: only assignments in the parameters cell"
        ast.literal_eval(node.value)  # literals only: derived values belong in the next cell
        names += [t.id for t in node.targets]
    declared = set(pipeline.declared_parameters(NOTEBOOKS / f"{name}.ipynb"))
    assert declared == set(names), f"{name}: papermill does not parse every parameter line: {set(names) - declared}"
    assert COMMON_KEYS | {pipeline.OUT_DIR_PARAM} <= declared


def test_every_profile_key_is_a_declared_parameter():
    """papermill's inspect API against every profile and notebook: no 'Passed unknown parameter' warning, ever."""
    assert pipeline.check_profiles(PARAMS, NOTEBOOKS) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_are_complete(profile):
    """Shared keys in params/<profile>.yaml (all of them), every notebook's own keys in its own file; a profile that
    extends another sets every key through its base (and only keys the base sets)."""
    if pipeline.base_profile(PARAMS, profile) is not None:
        for name in NAMES:
            base = pipeline.profile_params(PARAMS, pipeline.base_profile(PARAMS, profile), name)
            assert set(pipeline.profile_params(PARAMS, profile, name)) == set(base), f"{profile}, {name}"
        return
    common = pipeline._read_yaml(PARAMS / f"{profile}.yaml")
    assert set(common) == COMMON_KEYS
    for name in NAMES:
        own = PARAMS / profile / f"{name}.yaml"
        assert own.is_file(), f"profile {profile} has no {own.relative_to(ROOT)}"
        declared = set(pipeline.declared_parameters(NOTEBOOKS / f"{name}.ipynb"))
        missing = declared - COMMON_KEYS - {pipeline.OUT_DIR_PARAM} - set(pipeline._read_yaml(own))
        assert not missing, f"profile {profile}, {name}: sets no {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_defaults_are_the_default_profile(name):
    """Run interactively (`make lab`), a notebook does what `make report` does with the default profile."""
    declared = pipeline.declared_parameters(NOTEBOOKS / f"{name}.ipynb")
    defaults = {k: ast.literal_eval(v["default"]) for k, v in declared.items() if k != pipeline.OUT_DIR_PARAM}
    assert pipeline.profile_params(PARAMS, "default", name) == defaults


def test_check_profiles_reports_an_unknown_key(tmp_path):
    params = tmp_path / "params"
    (params / "p").mkdir(parents=True)
    (params / "p.yaml").write_text("model: tiny\nweights: random\ndevice: cpu\ndtype: float32\nseed: 0\n")
    (params / "p" / "05_batch_sweep.yaml").write_text("batch_size: [1, 2]\n")  # the notebook's key is batch_sizes
    problems = pipeline.check_profiles(params, NOTEBOOKS)
    assert len(problems) == 1 and "batch_size not a parameter of 05_batch_sweep" in problems[0]


def test_unknown_profile_is_one_clear_error(tmp_path):
    with pytest.raises(KvlibError, match=r"unknown profile 'nope'.*profiles: default, full, gpu, smoke"):
        pipeline.profile_files(PARAMS, "nope", "01_concept")


def test_readme_example_gives_papermill_no_unknown_parameter(tmp_path):
    """The README's command, parameterized but not executed (--prepare-only): no warning, batch_sizes injected."""
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", "notebooks/05_batch_sweep.ipynb", str(out), "-f", "params/smoke.yaml"]
    proc = subprocess.run(
        [*cmd, "-p", "batch_sizes", "[1, 2]", "--prepare-only"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "unknown parameter" not in proc.stderr.lower()
    cells = json.loads(out.read_text())["cells"]
    injected = [c for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
    assert 'batch_sizes = "[1, 2]"' in "".join(injected[0]["source"])  # a string: the notebook parses it


# ---- kvlib.study: parameters ------------------------------------------------------------------------------------


def test_int_list_accepts_what_papermill_passes():
    assert study.int_list("b", "[1, 2]") == [1, 2]  # papermill -p passes list text as a string
    assert study.int_list("b", [4, 1, 2, 2]) == [1, 2, 4]
    assert study.int_list("b", 8) == [8]
    assert study.int_list("b", "8") == [8]


@pytest.mark.parametrize("bad", ["[0]", [0], "abc", [], True, [1.5], "[1, two]", "[1,"])
def test_int_list_rejects_bad_values_with_one_line(bad):
    with pytest.raises(KvlibError) as e:
        study.int_list("batch_sizes", bad)
    assert "batch_sizes" in str(e.value) and "\n" not in str(e.value)


def test_scalar_and_name_parameters():
    assert study.positive_int("n", "3") == 3
    assert study.positive_int("n", 0, minimum=0) == 0
    for bad in (0, -1, True, 2.5, "x"):
        with pytest.raises(KvlibError):
            study.positive_int("n", bad)
    assert study.positive_number("g", "16") == 16.0
    with pytest.raises(KvlibError):
        study.positive_number("g", 0)
    assert study.str_list("c", "[none, static]") == ["none", "static"]
    assert study.str_list("c", "static") == ["static"]
    with pytest.raises(KvlibError, match="unknown"):
        study.str_list("c", ["none", "bogus"], choices=["none", "static"])


def test_check_context():
    study.check_context(PRESETS["tiny"], 200, 56)
    with pytest.raises(KvlibError, match="exceeds the tiny context of 256"):
        study.check_context(PRESETS["tiny"], 200, 57)


def test_spread_and_paired_ratio():
    s = study.Spread.of([1.0, 2.0, 3.0, 4.0])  # nearest-rank quartiles, rounded outward: measured values
    assert (s.median, s.q25, s.q75, s.n) == (2.5, 1.0, 4.0, 4)
    assert "IQR 1–4, n=4" in s.text(".3g")
    assert math.isnan(study.Spread.of([]).median)
    runs = pd.DataFrame(
        {"cache": ["none", "static"] * 3, "repeat": [0, 0, 1, 1, 2, 2], "t": [10.0, 2.0, 12.0, 3.0, 9.0, 3.0]}
    )
    ratio = study.paired_ratio(runs, "t", {"cache": "none"}, {"cache": "static"})
    assert ratio.tolist() == [5.0, 4.0, 3.0]  # per repeat, not a ratio of medians
    with pytest.raises(KvlibError):
        study.paired_ratio(runs, "t", {"cache": "none"}, {"cache": "dynamic"})


def test_weights_banner():
    assert study.weights_banner("pretrained") == ""
    assert "RANDOM WEIGHTS" in study.weights_banner(["pretrained", "random"])


def test_the_random_weights_banner_is_shown_once_per_page_and_never_for_pretrained(tmp_path, monkeypatch):
    """Issue 9: a notebook that loads several random-weight models shows the banner once; pretrained, never."""
    import IPython.display

    from kvlib.models.loading import load

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(getattr(obj, "data", obj)))
    lm = load("tiny", "random", "cpu", "float32", 0, with_hf=False)
    out = study.Outputs("09_example", tmp_path)
    out.loaded(lm)
    out.loaded(lm)
    banners = [s for s in shown if "RANDOM WEIGHTS" in s]
    assert len(banners) == 1 and all("Model: **tiny**" in s for s in shown if s not in banners)
    shown.clear()
    lm.weights = "pretrained"  # what a pretrained load records; the banner depends on nothing else
    study.Outputs("09_example", tmp_path).loaded(lm)
    assert not [s for s in shown if "RANDOM WEIGHTS" in s]


def test_every_page_names_the_model_it_measured_with_its_weights_provenance(tmp_path, monkeypatch):
    """A page's first lines say which model and weights it measured (the weights' source, dtype, device)."""
    import IPython.display

    from kvlib.models.loading import load

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(getattr(obj, "data", obj)))
    lm = load("tiny", "random", "cpu", "float32", 0, with_hf=False)
    study.Outputs("09_example", tmp_path).loaded(lm)
    assert shown[-1] == f"Model: **tiny**; weights: random, {lm.source}; float32 on cpu."


def test_the_default_profile_runs_smollm2_with_pretrained_weights_and_the_smoke_profile_tiny_models():
    for name in NAMES:
        default = pipeline.profile_params(PARAMS, "default", name)
        assert (default["model"], default["weights"]) == ("smollm2-135m", "pretrained"), name
        smoke = pipeline.profile_params(PARAMS, "smoke", name)
        assert smoke["model"] in ("tiny", "tiny-llama") and smoke["weights"] == "random", name


def test_outputs_write_prefixed_files(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = study.Outputs("09_example", tmp_path)
    out.csv(pd.DataFrame({"a": [1]}), "rows")
    out.headline("speed", "Speed", 2.0, "x", study.Spread.of([1.0, 2.0, 3.0]), headline=True, note="n")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("A line")
    out.figure(fig, "line", "caption text", key=True)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["09_headline.csv", "09_meta.json", "09_rows.csv"]
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["09_line.png"]
    meta = json.loads((tmp_path / "data" / "09_meta.json").read_text())
    assert meta["figures"] == [{"file": "09_line.png", "title": "A line", "caption": "caption text", "key": True}]
    head = pd.read_csv(tmp_path / "data" / "09_headline.csv")
    assert head.loc[0, "q25"] == 1.0 and bool(head.loc[0, "headline"])


# ---- kvlib.study.costs ---------------------------------------------------------------------------------------------


def test_decode_work_counts():
    cfg = PRESETS["tiny"]  # 2 layers, 4 heads
    P, N = 10, 5
    w = costs.decode_work(cfg, P, N).set_index(["mode", "step"])
    for step in range(N):
        assert w.loc[("naive", step), "kv_projections"] == 2 * 2 * 4 * (P + step)
        assert w.loc[("cached", step), "kv_projections"] == 2 * 2 * 4 * (P if step == 0 else 1)
    # The prefill is the same work in both modes; after it, naive work per step is larger and grows.
    assert w.loc[("naive", 0), "total_flops"] == w.loc[("cached", 0), "total_flops"]
    naive = [w.loc[("naive", s), "total_flops"] for s in range(N)]
    assert naive == sorted(naive) and naive[-1] > w.loc[("cached", N - 1), "total_flops"]
    # One query over L keys: 4 x head_dim x heads x layers x L
    assert w.loc[("cached", 3), "attention_flops"] == 4 * 16 * 4 * 2 * (P + 3)


def test_published_kv_bytes_per_token():
    t = costs.kv_bytes_table(bytes_per_element=2).set_index("architecture")
    assert t.loc["Llama-2-7B", "kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2  # 512 KiB
    assert t.loc["Llama-3-8B", "kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # GQA: 4x smaller
    assert t.loc["Falcon-7B", "n_kv_head"] == 1
    assert (t["source"] == "computed from published config").all()


def test_max_context_tokens():
    assert costs.max_context_tokens(1000, 400, 10, batch_size=2) == 30
    assert costs.max_context_tokens(100, 400, 10) == 0


def test_measured_cache_bytes_match_the_formula(tiny):
    df = costs.measured_cache_bytes(tiny, ["dynamic", "static"], [1, 2], [4, 9])
    assert len(df) == 8 and (df["held_bytes"] == df["formula_bytes"]).all()


# ---- kvlib.report.index: the index page -----------------------------------------------------------------------------


def test_index_from_notebook_outputs(tmp_path):
    """The index embeds key figures, lists headline rows, links pages, and shows the random-weights banner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = study.Outputs("02_naive_vs_cached", tmp_path)
    out.describe(weights=["random"], weights_source="random(seed=0)", provenance={"git_commit": "abc123"})
    out.headline("speedup", "Speedup of cached over naive", 3.21, "x", study.Spread.of([3, 3.2, 3.4]), headline=True)
    out.headline("minor", "A minor number", 1.0, "x")
    fig, ax = plt.subplots()
    ax.set_title("Latency")
    out.figure(fig, "steps", "median over 3 repeats", key=True)
    page = build_index(tmp_path, "smoke", ["01_concept", "02_naive_vs_cached"]).read_text()
    assert "RANDOM WEIGHTS" in page
    assert page.count("data:image/png;base64,") == 1
    headline = page[page.index("<table class=headline>") : page.index("</table>")]
    assert "Speedup of cached over naive" in headline and "3.21 x" in headline and "A minor number" not in headline
    assert "href='02_naive_vs_cached.reading.html'" in page and "01_concept not run" in page  # the reading view
    assert "abc123" in page
    assert 'src="http' not in page and "<script" not in page  # self-contained: nothing fetched


def test_regression_budget_of_a_model_that_is_also_a_published_architecture():
    """04_memory failed on distilgpt2: its measured row and the published distilgpt2 row were told apart by name."""
    arch = costs.kv_bytes_table(bytes_per_element=2)
    fits = costs.context_budget(16 * 2**30, [1, 8], "distilgpt2", 3.3e8, 36864, 1024, architectures=arch)
    mine = fits[fits["measured"]].set_index("batch_size")
    assert list(mine.index) == [1, 8] and mine.loc[1, "max_tokens_memory"] == int((16 * 2**30 - 3.3e8) // 36864)
    assert mine.loc[1, "limited_by"] == "context length" and mine.loc[1, "max_tokens"] == 1024
    assert (fits[~fits["measured"]]["model"] == "distilgpt2").sum() == 2  # the published one, computed, kept apart
    llama = fits[(fits["model"] == "Llama-2-70B") & (fits["batch_size"] == 1)].iloc[0]
    assert llama["max_tokens_memory"] == 0 and llama["limited_by"].startswith("no room")


def test_run_refuses_an_unknown_key_before_starting_a_kernel(tmp_path):
    params = tmp_path / "params"
    (params / "p").mkdir(parents=True)
    (params / "p.yaml").write_text("model: tiny\nweights: random\ndevice: cpu\ndtype: float32\nseed: 0\nthreads: 2\n")
    with pytest.raises(KvlibError, match="threads not a parameter of 04_memory"):
        pipeline.run_notebook("04_memory", "p", tmp_path / "reports", params, NOTEBOOKS)
    assert not (tmp_path / "reports" / "p" / "04_memory.ipynb").exists()


def test_staged_files_must_carry_the_notebook_prefix(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    (stage / "data").mkdir(parents=True)
    (stage / "data" / "04_ok.csv").write_text("a\n1\n")
    (stage / "data" / "stray.csv").write_text("a\n1\n")
    (out / "data").mkdir(parents=True)
    (out / "data" / "04_old.csv").write_text("old\n")
    executed = stage / "04_x.ipynb"
    executed.write_text("{}")
    with pytest.raises(KvlibError, match="names must start with 04_"):
        pipeline._move_outputs(stage, out, "04", executed, "04_x")
    assert (out / "data" / "04_old.csv").exists() and not (out / "04_x.ipynb").exists()  # nothing replaced
    (stage / "data" / "stray.csv").unlink()
    pipeline._move_outputs(stage, out, "04", executed, "04_x")
    assert sorted(p.name for p in (out / "data").iterdir()) == ["04_ok.csv"]  # the old file of 04 is gone
    assert (out / "04_x.ipynb").read_text() == "{}"  # the executed notebook moves with its files, as one set


def test_full_profile_is_the_default_with_further_models():
    """params/full extends the default profile: the same keys and values except the further models of 08 and 09,
    08's StreamingLLM text length and the models 10 times (speed_models)."""
    assert pipeline.base_profile(PARAMS, "full") == "default"
    for name in NAMES:
        full, default = (pipeline.profile_params(PARAMS, p, name) for p in ("full", "default"))
        assert {k for k in full if full[k] != default[k]} <= {"more_models", "tokens", "speed_models"}, name
    assert pipeline.profile_params(PARAMS, "full", "08_quality")["more_models"][0]["model"] == "gemma3-270m"
    files = pipeline.profile_files(PARAMS, "full", "08_quality")
    assert [f.relative_to(PARAMS).as_posix() for f in files] == [
        "default.yaml",
        "default/08_quality.yaml",
        "full.yaml",
        "full/08_quality.yaml",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("extends: nope\n", "unknown profile 'nope'"),
        ("extends: p\n", "must name another profile"),
        ("extends: [default]\n", "must name another profile"),
        ("extends: q\n", "which extends another profile"),
    ],
)
def test_a_bad_extends_is_one_clear_error(tmp_path, text, error):
    params = tmp_path / "params"
    params.mkdir()
    (params / "default.yaml").write_text("model: tiny\n")
    (params / "q.yaml").write_text("extends: default\n")
    (params / "p.yaml").write_text(text)
    with pytest.raises(KvlibError, match=error):
        pipeline.profile_params(params, "p", "01_concept")


def test_an_extending_profile_overrides_its_base(tmp_path):
    params = tmp_path / "params"
    (params / "default").mkdir(parents=True)
    (params / "p").mkdir()
    (params / "default.yaml").write_text("model: tiny\nseed: 0\n")
    (params / "default" / "01_concept.yaml").write_text("toy_len: 8\nseed: 1\n")
    (params / "p.yaml").write_text("extends: default\nseed: 2\n")
    (params / "p" / "01_concept.yaml").write_text("toy_len: 16\n")
    assert pipeline.profile_params(params, "p", "01_concept") == {"model": "tiny", "seed": 2, "toy_len": 16}
    assert pipeline.profile_params(params, "p", "02_naive_vs_cached") == {"model": "tiny", "seed": 2}
