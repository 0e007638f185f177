"""End to end: `make report PROFILE=smoke` runs every notebook with papermill and builds index.html (slow: a few
minutes on 2 busy cores; CI runs it). Then: incremental rebuilds, a broken parameter, the README's papermill call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kvlib import study
from kvlib.measure.harness import RUN_COLUMNS, STEP_COLUMNS
from kvlib.report import pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NAMES = pipeline.discover(ROOT / "notebooks")
HEADLINE_COLUMNS = list(study.HEADLINE_COLUMNS)
EXPECTED_COLUMNS = {
    "01_work.csv": ["mode", "step", "position", "kv_projections", "attention_flops", "total_flops"],
    "01_model_tokens.csv": ["step", "naive token", "cached token"],
    "02_runs.csv": list(RUN_COLUMNS),
    "02_steps.csv": list(STEP_COLUMNS),
    "02_tokens.csv": ["new token", "kvlib naive (no cache)", "kvlib static cache"],
    "03_runs.csv": list(RUN_COLUMNS),
    "03_agreement.csv": ["path", "tokens_equal", "max_abs_logit_diff", "tolerance", "ok"],
    "04_cache_bytes.csv": ["layout", "batch_size", "tokens", "held_bytes", "formula_bytes", "held_over_formula"],
    "04_breakdown.csv": ["component", "bytes", "mib", "peak_kind"],
    "04_architectures.csv": ["architecture", "n_layer", "n_kv_head", "head_dim", "kv_bytes_per_token", "source"],
    "04_budget.csv": ["model", "batch_size", "max_tokens_memory", "context_limit", "limited_by"],
    "05_runs.csv": list(RUN_COLUMNS),
    "06_runs.csv": list(RUN_COLUMNS),
    "06_advantage.csv": ["repeat", "advantage", "prompt_len"],
}


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The whole smoke report, built once into a temporary folder, with a copy of params/ (mtimes kept)."""
    base = tmp_path_factory.mktemp("report")
    params = base / "params"
    shutil.copytree(ROOT / "params", params)  # copy2: same mtimes, so make sees nothing new
    t0 = time.perf_counter()
    # two jobs: one notebook renders (nbconvert, ~5 s a page) while the next executes; smoke timings mean nothing
    proc = make("-j2", "report", "PROFILE=smoke", f"REPORTS={base / 'reports'}", f"PARAMS={params}")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nsmoke report: {seconds:.0f} s")
    return {"out": base / "reports" / "smoke", "params": params, "reports": base / "reports", "log": proc.stdout}


def test_every_notebook_executed_without_error(report):
    out = report["out"]
    for name in NAMES:
        nb = json.loads((out / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] for c in code), f"{name}: a cell did not run"
        errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
        assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        assert nb["metadata"]["papermill"]["parameters"]["model"] in ("tiny", "tiny-llama")  # smoke: 01 and 07 Llama
        assert (out / f"{name}.html").stat().st_size > 10_000
        full, reading = (out / f"{name}.html").read_text(), (out / f"{name}.reading.html").read_text()
        assert 'class="jp-CodeMirrorEditor' in full and 'class="jp-CodeMirrorEditor' not in reading  # code hidden
        assert f'href="{name}.reading.html"' in full and f'href="{name}.html"' in reading  # each links the other
        assert not (out / f"{name}.failed.ipynb").exists()
    assert not (out / ".build").exists()
    for i, name in enumerate(NAMES, 1):  # one progress line per notebook, with its time, and one per cell
        assert f"[{i}/{len(NAMES)}] {name} ... " in report["log"]
        assert f"[{i}/{len(NAMES)}] {name}: cell 1/" in report["log"]


def test_index_is_self_contained_with_headline_table(report):
    page = (report["out"] / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 6
    assert "<script" not in page and 'src="http' not in page
    headline = page[page.index("<table class=headline>") :]
    headline = headline[: headline.index("</table>")]
    for label in (
        "Speedup of cached",
        "Time to first token",
        "Per-token latency, cached",
        "KV cache per token",
        "Model bandwidth utilisation",
        "Best decode throughput",
    ):
        assert label in headline, f"headline table lacks {label!r}"
    assert page.count("RANDOM WEIGHTS") == 1  # the smoke profile uses random weights: one banner, not one each
    assert page.index("<h2>Findings</h2>") < page.index("RANDOM WEIGHTS") < page.index("Headline numbers")
    findings = page[page.index("<ul class=findings>") : page.index("</ul>", page.index("<ul class=findings>"))]
    assert findings.count("<li") >= 3 and ".reading.html'>notebook 0" in findings
    assert "what it means" in headline
    for name in NAMES:
        assert f"href='{name}.html'" in page and f"href='{name}.reading.html'" in page
    assert "git_commit" in page and "Provenance" in page


def test_offline_pages_load_nothing_from_the_network(report):
    """Regression (issue 14, "offline pages"): nbconvert's pages loaded require.js and MathJax from a CDN."""
    pages = [report["out"] / f"{name}{view}.html" for name in NAMES for view in ("", ".reading")]
    for page in [report["out"] / "index.html", *pages]:
        text = page.read_text()
        fetched = re.findall(r"<(?:script|link|img|iframe)[^>]*(?:src|href)=[\"']?(https?:)?//[^>]*>", text)
        assert not fetched, f"{page.name} fetches {fetched[:2]}"
        assert "<script" not in text, f"{page.name} still has a script"


@pytest.mark.skipif(not shutil.which("chromium"), reason="no Chromium (apt-get install chromium)")
def test_check_report_passes_on_the_smoke_report(report):
    proc = make("check-report", "PROFILE=smoke", f"REPORTS={report['reports']}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ["index", *NAMES, *(f"{n}.reading" for n in NAMES)]:  # every page, both views of each notebook
        assert (report["out"] / "screenshots" / f"{name}.png").is_file(), name


def test_csvs_have_the_expected_columns(report):
    data = report["out"] / "data"
    for name in NAMES:
        prefix = name.split("_")[0]
        head = pd.read_csv(data / f"{prefix}_headline.csv")
        assert list(head.columns) == HEADLINE_COLUMNS and len(head) > 0
    for file, columns in EXPECTED_COLUMNS.items():
        df = pd.read_csv(data / file)
        missing = [c for c in columns if c not in df.columns]
        assert not missing and len(df) > 0, f"{file}: missing {missing}"
    runs = pd.read_csv(data / "02_runs.csv")
    assert set(runs["cache"]) == {"none", "dynamic", "static"} and (runs["weights"] == "random").all()
    assert (runs["tokens_generated"] == runs["batch_size"] * runs["max_new_tokens"]).all()
    tokens = pd.read_csv(data / "02_tokens.csv")
    assert (tokens["kvlib naive (no cache)"] == tokens["kvlib static cache"]).all()


def test_make_rebuilds_only_what_changed(report):
    args = ["-n", "report", "PROFILE=smoke", f"REPORTS={report['reports']}", f"PARAMS={report['params']}"]

    def planned_runs() -> list[str]:  # the notebooks `make report` would execute now
        return re.findall(r" run (\d\d_\w+) --profile smoke", make(*args).stdout)

    assert planned_runs() == []  # everything up to date
    own = report["params"] / "smoke" / "06_prompt_sweep.yaml"
    later = time.time() + 5
    os.utime(own, (later, later))
    assert planned_runs() == ["06_prompt_sweep"]
    plan = make(*args).stdout
    assert "nbconvert" in plan and "index --profile smoke" in plan and "06_prompt_sweep.reading" in plan
    os.utime(report["params"] / "smoke.yaml", (later, later))  # the shared keys: every notebook
    assert planned_runs() == NAMES
    os.utime(own, (0, 0))  # leave the report up to date for the next tests
    os.utime(report["params"] / "smoke.yaml", (0, 0))


def test_a_broken_parameter_fails_cleanly_and_keeps_the_report(report):
    out = report["out"]
    before = {
        p: p.read_bytes() for p in (out / "index.html", out / "05_batch_sweep.ipynb", out / "05_batch_sweep.html")
    }
    data_before = (out / "data" / "05_runs.csv").read_bytes()
    own = report["params"] / "smoke" / "05_batch_sweep.yaml"
    good = own.read_text()
    own.write_text(good.replace("batch_sizes: [1, 2, 4]", "batch_sizes: [0]"))
    try:
        proc = make("report", "PROFILE=smoke", f"REPORTS={report['reports']}", f"PARAMS={report['params']}")
    finally:
        own.write_text(good)
        os.utime(own, (0, 0))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "05_batch_sweep failed" in errors[0] and "batch_sizes" in errors[0]
    assert "Traceback" not in proc.stderr
    assert all(p.read_bytes() == b for p, b in before.items()), "the previous report was modified"
    assert (out / "data" / "05_runs.csv").read_bytes() == data_before
    failed = json.loads((out / "05_batch_sweep.failed.ipynb").read_text())
    assert any(o["output_type"] == "error" for c in failed["cells"] if c["cell_type"] == "code" for o in c["outputs"])


def test_an_unknown_profile_is_one_line():
    proc = make("report", "PROFILE=nope")
    assert proc.returncode != 0 and "unknown PROFILE=nope" in proc.stderr and "smoke" in proc.stderr


def test_readme_papermill_example_runs(tmp_path):
    """`papermill notebooks/05_batch_sweep.ipynb out.ipynb -f params/smoke.yaml -p batch_sizes "[1, 2]"`."""
    out = tmp_path / "out.ipynb"
    readme = [sys.executable, "-m", "papermill", "notebooks/05_batch_sweep.ipynb", str(out), "-f", "params/smoke.yaml"]
    proc = subprocess.run(
        [*readme, "-p", "batch_sizes", "[1, 2]", "-p", "out_dir", str(tmp_path)],  # out_dir: keep the repo clean
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown parameter" not in proc.stderr.lower()
    runs = pd.read_csv(tmp_path / "data" / "05_runs.csv")
    assert sorted(set(runs["batch_size"])) == [1, 2] and (runs["model"] == "tiny").all()


def _probe_notebook(prefix: str) -> dict:
    """A notebook of two cells that records the probe its kernel was given and what machine_roofline returned."""
    code = (
        "import json, os, pathlib\n"
        "from kvlib.measure.roofline import machine_roofline\n"
        "roof = machine_roofline(device, dtype)\n"
        "data = pathlib.Path(out_dir, 'data')\n"
        "data.mkdir(parents=True, exist_ok=True)\n"
        "seen = {'env': os.environ.get('KVLIB_MACHINE_PROBE'), **roof}\n"
        f"(data / '{prefix}_seen.json').write_text(json.dumps(seen))\n"
    )
    cells = [
        {"cell_type": "markdown", "id": "title", "metadata": {}, "source": [f"# {prefix}. A probe reader"]},
        {"cell_type": "code", "id": "params", "metadata": {"tags": ["parameters"]}, "execution_count": None,
         "outputs": [], "source": ["device = 'cpu'\n", "dtype = 'float32'\n", "out_dir = '.'\n"]},
        {"cell_type": "code", "id": "read", "metadata": {}, "execution_count": None, "outputs": [],
         "source": code.splitlines(keepends=True)},
    ]  # fmt: skip
    kernel = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return {"cells": cells, "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}


def test_every_notebook_of_a_report_divides_by_the_one_probe_measured_first(tmp_path, monkeypatch):
    """`report run` measures data/machine.json when there is none, the next notebook reuses it, and each kernel's
    machine_roofline returns the stored figures (KVLIB_MACHINE_PROBE), not a measurement of its own."""
    from kvlib.measure.roofline import PROBE_ENV, MachineProbe, Rates

    notebooks, params, reports = tmp_path / "notebooks", tmp_path / "params", tmp_path / "reports"
    notebooks.mkdir()
    params.mkdir()
    (params / "t.yaml").write_text("device: cpu\ndtype: float32\n")
    for name in ("01_first", "02_second"):
        (notebooks / f"{name}.ipynb").write_text(json.dumps(_probe_notebook(name[:2]), indent=1) + "\n")
    calls = []

    def fake_measure(device, dtypes, *args, **kwargs):
        calls.append((str(device), list(dtypes)))
        return MachineProbe("cpu", "Test CPU", Rates((7.25e9, 7.5e9, 7.0e9)), Rates((6e9,)),
                            {"float32": Rates((3.5e10,))}, {"float32": 512}, 2**28, 2, "Test CPU", ("avx2",),
                            "2025-01-01T00:00:00+00:00", 1.0)  # fmt: skip

    monkeypatch.setattr(pipeline, "measure_probe", fake_measure)
    monkeypatch.delenv("KVLIB_NO_ROOFLINE", raising=False)
    monkeypatch.delenv(PROBE_ENV, raising=False)
    for name in ("01_first", "02_second"):
        pipeline.run_notebook(name, "t", reports, params, notebooks)
    out = reports / "t"
    assert calls == [("cpu", ["float32"])]  # measured once, before the first notebook; the second reused it
    probe_file = (out / "data" / "machine.json").resolve()
    for prefix in ("01", "02"):
        seen = json.loads((out / "data" / f"{prefix}_seen.json").read_text())
        assert seen == {"env": str(probe_file), "bandwidth_bytes_per_s": 7.5e9, "matmul_flops_per_s": 3.5e10}
    assert PROBE_ENV not in os.environ  # the pipeline's own process is left as it was
