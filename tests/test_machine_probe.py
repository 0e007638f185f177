"""One machine probe per report: the probe's JSON, machine_roofline reading the report's probe from
KVLIB_MACHINE_PROBE (and failing in one line on a bad one), the pipeline measuring it once, pages naming the
bandwidth they divide by, the index's machine section, and each page's "What this page found" box."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from kvlib import study
from kvlib.core.errors import KvlibError
from kvlib.measure import roofline
from kvlib.measure.roofline import PROBE_ENV, MachineProbe, Rates
from kvlib.report import pipeline
from kvlib.report.findings import Finding
from kvlib.report.machine import machine_section
from kvlib.study import batch_sweep

READS = (12.0e9, 12.345e9, 11.5e9, 12.1e9, 11.9e9)  # bytes/s; the best is 12.345 GB/s


def fake_probe(device: str = "cpu", dtypes: tuple[str, ...] = ("float32",), reads: tuple = READS) -> MachineProbe:
    return MachineProbe(
        device=device,
        device_name="Test CPU",
        read_bytes_per_s=Rates(reads),
        copy_bytes_per_s=Rates((9e9, 9.5e9, 10e9)),
        matmul_flops_per_s={d: Rates((50e9, 52e9, 48e9)) for d in dtypes},
        matmul_size={d: 1024 for d in dtypes},
        buffer_bytes=256 * 2**20,
        threads=2,
        cpu_model="Test CPU",
        cpu_flags=("avx", "avx2", "fma"),
        timestamp="2025-01-01T00:00:00+00:00",
        duration_s=1.5,
    )


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no probe measured, loaded or used; no probe variable."""
    monkeypatch.delenv(PROBE_ENV, raising=False)
    monkeypatch.delenv("KVLIB_NO_ROOFLINE", raising=False)
    monkeypatch.setattr(roofline, "_own_probes", {})
    monkeypatch.setattr(roofline, "_loaded_probes", {})
    monkeypatch.setattr(roofline, "_used", [])


# ---- the probe ---------------------------------------------------------------------------------------------------


def test_probe_json_round_trip_keeps_every_repeat_and_names_the_figure_mbu_uses(tmp_path):
    probe = fake_probe(dtypes=("float32", "bfloat16"))
    path = tmp_path / "machine.json"
    probe.save(path)
    back = MachineProbe.load(path)
    assert back == probe
    d = json.loads(path.read_text())
    assert d["read_bytes_per_s"]["values"] == list(READS) and d["read_bytes_per_s"]["n"] == 5
    assert d["bandwidth_bytes_per_s"] == 12.345e9 == back.bandwidth_bytes_per_s  # the best read repeat
    assert "best" in d["mbu_divides_by"] and back.dtypes == ["float32", "bfloat16"]
    r = back.read_bytes_per_s
    assert (r.min, r.q25, r.median, r.q75, r.best) == (11.5e9, 11.9e9, 12.0e9, 12.1e9, 12.345e9)


@pytest.mark.parametrize(
    "text, says",
    [
        ("not json", "not a kvlib machine probe"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"schema": 99}), "schema 99"),
        (None, "missing key"),  # a probe without its read repeats
        ("negative", "values must be positive"),
    ],
)
def test_a_bad_probe_file_is_one_line(tmp_path, text, says):
    good = fake_probe().to_dict()
    if text is None:
        del good["read_bytes_per_s"]
        text = json.dumps(good)
    elif text == "negative":
        good["read_bytes_per_s"]["values"] = [-1.0]
        text = json.dumps(good)
    path = tmp_path / "machine.json"
    path.write_text(text)
    with pytest.raises(KvlibError, match=says) as e:
        MachineProbe.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_small_real_probe_has_ordered_statistics():
    probe = roofline.measure_probe("cpu", ["float32"], repeats=3, warmup=1, size_bytes=8 * 2**20)
    for r in (probe.read_bytes_per_s, probe.copy_bytes_per_s, probe.matmul("float32")):
        assert r.n == 3 and 0 < r.min <= r.q25 <= r.median <= r.q75 <= r.best
    assert 1e8 < probe.bandwidth_bytes_per_s < 1e13 and probe.buffer_bytes == 8 * 2**20
    assert probe.threads == torch.get_num_threads() and probe.device == "cpu" and probe.duration_s > 0
    assert set(probe.cpu_flags) <= set(roofline.DTYPE_FLAGS)


# ---- machine_roofline: the report's probe, or the process's own -------------------------------------------------


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured, although the report's probe was given")


def test_machine_roofline_returns_the_report_probe_when_the_variable_is_set(tmp_path, monkeypatch):
    path = tmp_path / "machine.json"
    fake_probe().save(path)
    monkeypatch.setenv(PROBE_ENV, str(path))
    monkeypatch.setattr(roofline, "measure_probe", _no_measuring)
    monkeypatch.setattr(roofline, "_matmul_rates", _no_measuring)
    roof = roofline.machine_roofline("cpu", torch.float32)
    assert roof == {"bandwidth_bytes_per_s": 12.345e9, "matmul_flops_per_s": 52e9}
    assert roofline.machine_roofline("cpu", "fp32") == roof
    text = roofline.bandwidth_source([12.345e9] * 3)
    assert text.startswith("the report's machine probe (machine.json, measured 2025-01-01")
    assert "12.3 GB/s read bandwidth, best of 5 repeats (median 12.0, IQR 11.9–12.1 GB/s)" in text
    assert roofline.bandwidth_source([12.345e9], short=True).startswith("12.3 GB/s, the best of the report's probe")
    monkeypatch.setenv("KVLIB_NO_ROOFLINE", "1")
    assert all(math.isnan(v) for v in roofline.machine_roofline("cpu", "float32").values())


@pytest.mark.parametrize(
    "content, device, dtype, says",
    [
        ("{oops", "cpu", "float32", "not a kvlib machine probe"),
        (None, "cpu", "float32", "cannot read it"),  # no such file
        ("probe", "cpu", "bfloat16", "no matmul figure in bfloat16"),
        ("cuda", "cpu", "float32", "measured on cuda:0"),
    ],
)
def test_a_bad_report_probe_fails_in_one_line(tmp_path, monkeypatch, content, device, dtype, says):
    path = tmp_path / "machine.json"
    if content == "probe":
        fake_probe().save(path)
    elif content == "cuda":
        fake_probe(device="cuda:0").save(path)
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv(PROBE_ENV, str(path))
    monkeypatch.setattr(roofline, "measure_probe", _no_measuring)
    with pytest.raises(KvlibError, match=says) as e:
        roofline.machine_roofline(device, dtype)
    assert "\n" not in str(e.value) and PROBE_ENV in str(e.value)


def test_without_the_variable_a_process_measures_its_own_once_and_says_so(monkeypatch, capsys):
    calls = []

    def fake_measure(device, dtypes, *args, **kwargs):
        calls.append((str(device), list(dtypes)))
        return fake_probe(dtypes=tuple(dtypes))

    monkeypatch.setattr(roofline, "measure_probe", fake_measure)
    monkeypatch.setattr(roofline, "_matmul_rates", lambda dev, dt, repeats: (512, Rates((7e9,))))
    assert roofline.machine_roofline("cpu", "float32")["bandwidth_bytes_per_s"] == 12.345e9
    assert roofline.machine_roofline("cpu", "float32")["bandwidth_bytes_per_s"] == 12.345e9
    assert roofline.machine_roofline("cpu", "bfloat16") == {"bandwidth_bytes_per_s": 12.345e9,
                                                           "matmul_flops_per_s": 7e9}  # fmt: skip
    assert calls == [("cpu", ["float32"])]  # once per process; a new dtype adds its matmul, same bandwidth
    err = capsys.readouterr().err
    assert err.count("machine probe: measured by this process") == 1 and PROBE_ENV in err
    assert roofline.bandwidth_source([12.345e9]).startswith("this process's own machine probe")
    assert "recorded in the runs" in roofline.bandwidth_source([3e9])
    assert roofline.bandwidth_source([math.nan]) == ""


# ---- the pipeline: once per report -------------------------------------------------------------------------------


def _profile(tmp_path: Path) -> tuple[Path, Path]:
    params, notebooks = tmp_path / "params", tmp_path / "notebooks"
    params.mkdir()
    notebooks.mkdir()
    (params / "t.yaml").write_text("device: cpu\ndtype: float32\n")
    return params, notebooks


def test_the_pipeline_measures_the_probe_once_and_reuses_it(tmp_path, monkeypatch):
    params, notebooks = _profile(tmp_path)
    calls = []

    def fake_measure(device, dtypes, *args, **kwargs):
        calls.append((str(device), list(dtypes)))
        return fake_probe(dtypes=tuple(dtypes))

    monkeypatch.setattr(pipeline, "measure_probe", fake_measure)
    reports = tmp_path / "reports"
    path = pipeline.ensure_machine_probe("t", reports, params, notebooks)
    assert path == (reports / "t" / "data" / "machine.json").resolve() and path.is_absolute()
    first = path.read_text()
    assert pipeline.ensure_machine_probe("t", reports, params, notebooks) == path
    assert calls == [("cpu", ["float32"])] and path.read_text() == first  # reused, not measured again
    pipeline.ensure_machine_probe("t", reports, params, notebooks, fresh=True)  # `report probe`
    assert len(calls) == 2
    path.write_text("{broken")
    with pytest.raises(KvlibError, match="not a kvlib machine probe") as e:
        pipeline.ensure_machine_probe("t", reports, params, notebooks)
    assert "\n" not in str(e.value)


def test_the_probe_covers_every_dtype_of_the_profile_and_one_device(tmp_path):
    params, notebooks = _profile(tmp_path)
    for nb in ("01_a", "02_b"):
        (notebooks / f"{nb}.ipynb").write_text("{}")
    (params / "t").mkdir()
    (params / "t" / "02_b.yaml").write_text("dtype: bf16\n")
    assert pipeline.probe_targets("t", params, notebooks) == ("cpu", ["float32", "bfloat16"])
    (params / "t" / "02_b.yaml").write_text("dtype: float64\n")
    with pytest.raises(KvlibError, match="unknown dtype 'float64'"):
        pipeline.probe_targets("t", params, notebooks)


# ---- the pages name the bandwidth they divide by; the index's machine section -------------------------------------


def test_the_batch_page_states_the_bandwidth_its_mbu_divides_by(tmp_path, monkeypatch):
    path = tmp_path / "machine.json"
    fake_probe().save(path)
    monkeypatch.setenv(PROBE_ENV, str(path))
    bw = roofline.machine_roofline("cpu", "float32")["bandwidth_bytes_per_s"]  # as the harness calls it
    label = study.path_label("kvlib", "static")
    runs = pd.DataFrame(
        [{"path": label, "batch_size": b, "mbu": m, "bandwidth_bytes_per_s": bw} for b, m in ((1, 0.2), (4, 0.5))]
    )
    text = batch_sweep.mbu_sentence(runs, label, 1, 4)
    assert "20% at batch 1 and 50% at batch 4" in text
    assert "against the report's machine probe" in text and "12.3 GB/s read bandwidth, best of 5 repeats" in text
    assert batch_sweep.mbu_sentence(runs.assign(mbu=math.nan), label, 1, 4) == ""  # not measured: no sentence


def test_machine_section_shows_the_spread_the_flags_and_who_divided_by_it(tmp_path):
    assert "no machine probe" in machine_section(tmp_path)
    (tmp_path / "data").mkdir()
    fake_probe(dtypes=("float32", "bfloat16")).save(tmp_path / "data" / "machine.json")
    pd.DataFrame({"bandwidth_bytes_per_s": [12.345e9] * 2}).to_csv(tmp_path / "data" / "02_runs.csv", index=False)
    pd.DataFrame({"bandwidth_bytes_per_s": [57.1e9]}).to_csv(tmp_path / "data" / "03_runs.csv", index=False)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "data" / "04_other.csv", index=False)
    page = machine_section(tmp_path)
    assert "<b>12.3 GB/s</b>" in page and "median 12.0, IQR 11.9–12.1" in page and "5 repeats" in page
    assert "matmul, bfloat16" in page and "emulated through float32" in page and "avx512_bf16 no" in page
    assert "avx2 yes" in page and "Test CPU" in page and "torch threads" in page
    assert "02_runs.csv" in page and "⚠ divided by another bandwidth: 03_runs.csv: 57.1 GB/s" in page
    assert "04_other.csv" not in page
    (tmp_path / "data" / "machine.json").write_text("{")
    assert "⚠" in machine_section(tmp_path) and "not a kvlib machine probe" in machine_section(tmp_path)


# ---- each page opens with its verdict -----------------------------------------------------------------------------

PAGE = (
    "<html><head><style>h1 { color: red }</style><script>var s = '</h1>';</script></head><body>"
    "<nav>the report</nav><main><h1 id='t'>2. Naive vs cached<a href='#t'>¶</a></h1>\n<p>Intro</p>"
    "<h1>Second</h1></main></body></html>"
)


def test_the_verdict_box_goes_right_after_the_first_h1():
    box = pipeline.verdict_box([Finding("Cached decoding was <b>6.8x</b> faster.", "02_naive_vs_cached")])
    page = pipeline.with_verdict(PAGE, box)
    assert page.index("What this page found") > page.index("¶</a></h1>")
    assert page.index("What this page found") < page.index("<p>Intro</p>") < page.index("<h1>Second")
    assert page.replace(box, "") == PAGE and "⚠" not in box and "<b>6.8x</b>" in box
    assert pipeline.with_verdict(page, box) == page  # rebuilt: one box, not two
    assert pipeline.with_verdict(page, "") == PAGE  # no finding any more: the box goes
    assert pipeline.with_verdict(PAGE, "") == PAGE  # no finding: no box


def test_a_contradicting_finding_is_marked_and_a_page_without_h1_gets_the_box_at_the_top():
    box = pipeline.verdict_box(
        [Finding("Batching <b>lowered</b> throughput.", "05_batch_sweep", contradicts=True), Finding("Two.", "05_x")]
    )
    assert box.count("<b>⚠</b> Batching") == 1 and "⚠ marks a result that contradicts" in box
    assert pipeline.verdict_box([]) == ""
    no_title = "<html><body class=x>\r\n<p>text</p></body></html>"
    assert pipeline.with_verdict(no_title, box) == f"<html><body class=x>{box}\r\n<p>text</p></body></html>"
    long = "<body>" + "<p>x</p>\n" * 20000 + "<h1>T</h1><p>after</p>"  # past the first chunk the parser reads
    assert pipeline.with_verdict(long, box).endswith(f"<h1>T</h1>{box}<p>after</p>")


def test_add_verdicts_boxes_the_pages_of_notebooks_with_findings(tmp_path):
    (tmp_path / "data").mkdir()
    row = dict(notebook="02_naive_vs_cached", metric="speedup", label="Speedup", value=6.8, unit="x", q25=4.2,
               q75=9.4, n=3, headline=True, note="tiny", layout="static", condition="tiny float32 cpu",
               baseline="none")  # fmt: skip
    pd.DataFrame([row], columns=list(study.HEADLINE_COLUMNS)).to_csv(tmp_path / "data" / "02_headline.csv", index=False)
    pages = [tmp_path / n for n in ("02_naive_vs_cached.html", "02_naive_vs_cached.reading.html", "05_b.html")]
    for p in pages:
        p.write_text(PAGE)
    changed = pipeline.add_verdicts(tmp_path, ["02_naive_vs_cached", "05_b"])
    assert changed == pages[:2]
    assert all("What this page found" in p.read_text() and "6.80x faster" in p.read_text() for p in pages[:2])
    assert pages[2].read_text() == PAGE  # no finding, no box
    assert pipeline.add_verdicts(tmp_path, ["02_naive_vs_cached", "05_b"]) == []  # nothing new: nothing rewritten
