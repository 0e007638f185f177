"""Running the study's notebooks with papermill: profiles, parameter checks, and results that survive failure.

A profile is a pair of YAML files per notebook:

    params/<profile>.yaml                 keys every notebook declares (model, weights, device, dtype, seed)
    params/<profile>/<notebook>.yaml      that notebook's own keys (sizes, repeats, ...); optional

merged in that order. Every key must be a parameter the notebook declares, so papermill never warns about an
unknown parameter; `check_profiles` proves it for every profile and notebook with papermill's inspect API.

`run_notebook` executes into a staging folder and moves the notebook, its CSVs and figures into the report only
when every cell succeeded. On failure the executed notebook is kept as <notebook>.failed.ipynb and the previous
report is left as it was.

One machine probe per report (kvlib.measure.roofline): `ensure_machine_probe` measures it once, before any
notebook, into reports/<profile>/data/machine.json (`make report` runs `python -m kvlib report probe` first; a
notebook run alone reuses the file, or measures it when there is none), and `run_notebook` hands its path to the
notebook's kernel in KVLIB_MACHINE_PROBE, so that every page divides its MBU by the same read bandwidth. The probe
is kept until it is measured again (`report probe`, or make after kvlib/measure/roofline.py or the profile's shared
keys changed), and then every notebook runs again.

`add_verdicts` opens each notebook's HTML pages with a "What this page found" box: the report's findings for that
notebook (kvlib.report.findings), put right after the page's first <h1> when the index is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import html
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import yaml

from kvlib.core.errors import KvlibError
from kvlib.measure.results import check_folder_writable, write_whole
from kvlib.measure.roofline import PROBE_ENV, MachineProbe, measure_probe, roofline_enabled
from kvlib.models.loading import DTYPES, dtype_name, resolve_device
from kvlib.report.findings import Finding, findings

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
KERNEL = "python3"  # the kernel of the Python that runs papermill: the project's .venv
OUT_DIR_PARAM = "out_dir"  # every notebook declares it; the runner points it at the staging folder
MACHINE_PROBE_FILE = "machine.json"  # in the report's data/ folder


def discover(notebooks_dir: str | Path) -> list[str]:
    """The study's notebooks, in order: notebooks/NN_name.ipynb -> ["01_concept", ...]."""
    return sorted(p.stem for p in Path(notebooks_dir).glob(NOTEBOOK_GLOB))


def profiles(params_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(params_dir).glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise KvlibError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KvlibError(f"{path}: expected a mapping of parameter names to values")
    return data


EXTENDS = "extends"  # a profile's shared file may start from another profile: `extends: default`


def _profile_file(params_dir: str | Path, profile: str) -> Path:
    common = Path(params_dir) / f"{profile}.yaml"
    if not common.is_file():
        known = ", ".join(profiles(params_dir)) or "none"
        raise KvlibError(f"unknown profile {profile!r}: no {common} (profiles: {known})")
    return common


def base_profile(params_dir: str | Path, profile: str) -> str | None:
    """The profile `profile` extends (its shared file's `extends:` key), or None. One level only: a base that itself
    extends another, or a profile extending itself, is a KvlibError (the Makefile tracks one base's files)."""
    common = _profile_file(params_dir, profile)
    base = _read_yaml(common).get(EXTENDS)
    if base is None:
        return None
    if not isinstance(base, str) or base == profile:
        raise KvlibError(f"{common}: {EXTENDS} must name another profile, not {base!r}")
    _profile_file(params_dir, base)
    if _read_yaml(Path(params_dir) / f"{base}.yaml").get(EXTENDS) is not None:
        raise KvlibError(f"{common}: extends {base!r}, which extends another profile (one level only)")
    return base


def profile_files(params_dir: str | Path, profile: str, notebook: str) -> list[Path]:
    """The parameter files of `notebook` in `profile`, in the order they apply (a later file's key wins): the base
    profile's shared and own files first when the profile extends one, then the profile's shared and own files."""
    common = _profile_file(params_dir, profile)
    base = base_profile(params_dir, profile)
    before = profile_files(params_dir, base, notebook) if base else []
    own = Path(params_dir) / profile / f"{notebook}.yaml"
    return [*before, common, own] if own.is_file() else [*before, common]


def profile_params(params_dir: str | Path, profile: str, notebook: str) -> dict[str, Any]:
    """The notebook's parameters in `profile`: its files' keys merged in order (profile_files), `extends` dropped."""
    params: dict[str, Any] = {}
    for path in profile_files(params_dir, profile, notebook):
        params.update(_read_yaml(path))
    params.pop(EXTENDS, None)
    return params


def declared_parameters(notebook_path: str | Path) -> dict[str, dict[str, Any]]:
    """The notebook's parameters as papermill infers them from its `parameters` cell."""
    import papermill  # heavy: only when the report runs notebooks

    return papermill.inspect_notebook(str(notebook_path))


def check_keys(notebook_path: Path, params: dict[str, Any], where: str) -> None:
    declared = declared_parameters(notebook_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise KvlibError(
            f"{where}: {', '.join(unknown)} not a parameter of {notebook_path.stem} (it declares {', '.join(declared)})"
        )
    if OUT_DIR_PARAM not in declared:
        raise KvlibError(f"{notebook_path.stem} must declare the parameter {OUT_DIR_PARAM}")


def check_profiles(params_dir: str | Path, notebooks_dir: str | Path) -> list[str]:
    """Every (profile, notebook) pair checked; returns the problems, one line each (empty: all good)."""
    problems = []
    for profile in profiles(params_dir):
        for nb in discover(notebooks_dir):
            try:
                params = profile_params(params_dir, profile, nb)
                check_keys(Path(notebooks_dir) / f"{nb}.ipynb", params, f"profile {profile}")
            except KvlibError as e:
                problems.append(str(e))
        extra = Path(params_dir) / profile
        for orphan in sorted(extra.glob("*.yaml")) if extra.is_dir() else []:
            if orphan.stem not in discover(notebooks_dir):
                problems.append(f"{orphan}: there is no notebook {orphan.stem}")
    return problems


def _move_outputs(stage: Path, out: Path, prefix: str, executed: Path, notebook: str) -> None:
    """Replace the report's files of this notebook (data/NN_*, figures/NN_*, the executed notebook `executed` as
    out/<notebook>.ipynb) by the staged ones, under an exclusive
    lock on out/.lock: a concurrent run of the same notebook replaces them before or after, never file by file in
    between (which would leave one run's CSVs beside the other's figures)."""
    for sub in ("data", "figures"):
        staged = sorted((stage / sub).glob("*")) if (stage / sub).is_dir() else []
        stray = [p.name for p in staged if not p.name.startswith(f"{prefix}_")]
        if stray:
            raise KvlibError(f"the notebook wrote {sub}/{', '.join(stray)}: names must start with {prefix}_")
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        for sub in ("data", "figures"):
            staged = sorted((stage / sub).glob("*")) if (stage / sub).is_dir() else []
            (out / sub).mkdir(parents=True, exist_ok=True)
            for old in (out / sub).glob(f"{prefix}_*"):
                old.unlink(missing_ok=True)
            for p in staged:
                os.replace(p, out / sub / p.name)
        os.replace(executed, out / f"{notebook}.ipynb")


def _new_stage(build: Path, notebook: str) -> Path:
    """A stage folder of its own under `build`: two runs of one notebook at once (two `make report`s, a report and
    a test) never write into or remove each other's stage; the last to finish replaces the report's files, as a set
    (_move_outputs). `build` is made again when another run's _clean_stage removed it in between."""
    for _ in range(5):
        build.mkdir(parents=True, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(prefix=f"{notebook}.", dir=build))
        except FileNotFoundError:  # another run removed the empty build folder just now
            continue
    raise KvlibError(f"cannot create a stage folder in {build}")


def _clean_stage(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        stage.parent.rmdir()  # .build/, unless another notebook is running in parallel (make -j)


def _keep_failed(staged_nb: Path, failed: Path, stage: Path) -> None:
    """Keep what the notebook got to as <notebook>.failed.ipynb; drop the rest of the staging folder."""
    if staged_nb.exists():
        os.replace(staged_nb, failed)
    _clean_stage(stage)


def check_reports_dir(reports_dir: str | Path) -> None:
    """Before any notebook runs: the reports folder, or for a new one its parent, must exist (a mistyped parent is
    not created) and take files."""
    folder = Path(reports_dir)
    if not folder.is_dir():
        if not folder.parent.is_dir():
            raise KvlibError(
                f"reports folder {folder}: folder {folder.parent} does not exist (it is not created for you)"
            )
        folder.mkdir()
    check_folder_writable(folder, "cannot write the report")


# ---- the machine probe: one per report -------------------------------------------------------------------------


def machine_probe_path(out: str | Path) -> Path:
    """Where the report in `out` (reports/<profile>) keeps its machine probe: out/data/machine.json."""
    return Path(out) / "data" / MACHINE_PROBE_FILE


def probe_targets(
    profile: str, params_dir: str | Path = "params", notebooks_dir: str | Path = "notebooks"
) -> tuple[str, list[str]]:
    """(device, dtypes) the profile's notebooks run on: the one device they share ('cpu', 'cuda:0'; 'auto'
    resolved) and every dtype any of them uses (canonical names, in the notebooks' order). One-line KvlibError
    when the notebooks ask for several devices (one probe per report covers one) or an unknown device or dtype."""
    devices: dict[str, list[str]] = {}
    dtypes: list[str] = []
    for nb in discover(notebooks_dir) or ["-"]:
        params = profile_params(params_dir, profile, nb)
        dev = str(resolve_device(str(params.get("device", "cpu"))))
        devices.setdefault("cuda:0" if dev == "cuda" else dev, []).append(nb)
        dt = str(params.get("dtype", "float32"))
        if dt not in DTYPES:
            raise KvlibError(f"profile {profile}, {nb}: unknown dtype {dt!r}; choose from {', '.join(DTYPES)}")
        if dtype_name(DTYPES[dt]) not in dtypes:
            dtypes.append(dtype_name(DTYPES[dt]))
    if len(devices) > 1:
        which = "; ".join(f"{d}: {', '.join(nbs)}" for d, nbs in devices.items())
        raise KvlibError(f"profile {profile}: its notebooks run on several devices ({which}); one machine probe per "
                         "report measures one")  # fmt: skip
    return next(iter(devices)), dtypes


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created), released on exit."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_machine_probe(
    profile: str,
    reports_dir: str | Path = "reports",
    params_dir: str | Path = "params",
    notebooks_dir: str | Path = "notebooks",
    fresh: bool = False,
) -> Path:
    """The absolute path of the report's machine probe, reports/<profile>/data/machine.json: measured now on the
    profile's device in each of its dtypes (`probe_targets`) when `fresh` or when there is none, else the one there
    (read and checked: a one-line KvlibError when it is not a probe). Two runs at once measure it once (a lock on
    reports/<profile>/.probe.lock); the file is replaced whole."""
    check_reports_dir(reports_dir)
    out = Path(reports_dir) / profile
    path = machine_probe_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".probe.lock"):
        if path.is_file() and not fresh:
            try:
                probe = MachineProbe.load(path)
            except KvlibError as e:
                raise KvlibError(
                    f"{e}; measure it again with `python -m kvlib report probe --profile {profile}`"
                ) from None
            print(f"machine probe: reusing {path} (measured {probe.timestamp}: {probe.bandwidth_text()})", flush=True)
            return path.resolve()
        device, dtypes = probe_targets(profile, params_dir, notebooks_dir)
        print(f"machine probe: measuring {device} ({', '.join(dtypes)}) once for the report ...", flush=True)
        probe = measure_probe(device, dtypes)
        write_whole(path, probe.save)
        matmul = "; ".join(f"{d} matmul {probe.matmul(d).text(1e9, 'GFLOP/s')}" for d in probe.dtypes)
        print(
            f"machine probe: {probe.bandwidth_text()}; {matmul}; {probe.duration_s:.1f} s -> {path}",
            flush=True,
        )
    return path.resolve()


def _check_probe_covers(path: Path, params: dict[str, Any], notebook: str, profile: str) -> None:
    """One-line KvlibError when the report's probe was not measured on the notebook's device or lacks its dtype
    (a device the notebook would reject itself is left to the notebook's own check)."""
    try:
        device = resolve_device(str(params.get("device", "cpu")))
    except KvlibError:
        return
    dtype = str(params.get("dtype", "float32"))
    try:
        MachineProbe.load(path).check(device, dtype if dtype in DTYPES else None, f"machine probe {path}")
    except KvlibError as e:
        raise KvlibError(
            f"{notebook}: {e}; measure it again with `python -m kvlib report probe --profile {profile}` "
            "(make then runs every notebook again)"
        ) from None


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """os.environ[name] = value (unset when None) inside the block (the kernel papermill starts inherits it)."""
    before = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def run_notebook(
    notebook: str,
    profile: str,
    reports_dir: str | Path = "reports",
    params_dir: str | Path = "params",
    notebooks_dir: str | Path = "notebooks",
) -> float:
    """Execute one notebook of the study with the profile's parameters into reports/<profile>/; return seconds.

    The notebook's kernel gets KVLIB_MACHINE_PROBE, the path of the report's machine probe (`ensure_machine_probe`:
    the one in reports/<profile>/data/, measured first when there is none); not with KVLIB_NO_ROOFLINE=1."""
    import papermill  # heavy: only when the report runs notebooks
    from papermill.exceptions import PapermillExecutionError  # heavy: only when the report runs notebooks

    notebooks_dir = Path(notebooks_dir).resolve()
    source = notebooks_dir / f"{notebook}.ipynb"
    if not source.is_file():
        raise KvlibError(f"no notebook {source}")
    params = profile_params(params_dir, profile, notebook)
    check_keys(source, params, f"profile {profile}")
    check_reports_dir(reports_dir)
    out = Path(reports_dir) / profile
    probe = ensure_machine_probe(profile, reports_dir, params_dir, notebooks_dir) if roofline_enabled() else None
    if probe is not None:
        _check_probe_covers(probe, params, notebook, profile)
    stage = _new_stage(out / ".build", notebook)
    params[OUT_DIR_PARAM] = str(stage.resolve())

    order = discover(notebooks_dir)
    step = f"[{order.index(notebook) + 1}/{len(order)}]" if notebook in order else "[-]"
    print(f"{step} {notebook} ...", flush=True)
    staged_nb = stage / f"{notebook}.ipynb"
    failed = out / f"{notebook}.failed.ipynb"
    progress = Progress(step, notebook, _previous_durations(out / f"{notebook}.ipynb"))
    t0 = time.perf_counter()
    try:
        with _environment(PROBE_ENV, None if probe is None else str(probe)):
            papermill.execute_notebook(
                str(source),
                str(staged_nb),
                parameters=params,
                kernel_name=KERNEL,
                cwd=str(notebooks_dir),
                progress_bar=False,  # our own per-cell lines (Progress), on a terminal or not
                engine_name=_engine_with(progress),
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],  # quiet: its TCP notice, its shutdown chatter
            )
    except PapermillExecutionError as e:
        _keep_failed(staged_nb, failed, stage)
        raise NotebookFailed(
            f"{notebook} failed in cell {e.exec_count}: {e.ename}: {e.evalue.strip()} "
            f"(executed notebook kept at {failed}; the previous report is untouched)"
        ) from None
    except Exception as e:  # a kernel that died or would not start: papermill's own message, on one line
        _keep_failed(staged_nb, failed, stage)
        first = (str(e).strip().splitlines() or [""])[0]
        raise NotebookFailed(f"{notebook} could not run: {type(e).__name__}: {first}") from None
    except KeyboardInterrupt:
        _keep_failed(staged_nb, failed, stage)
        raise
    seconds = time.perf_counter() - t0
    try:
        _move_outputs(stage, out, notebook.split("_", 1)[0], staged_nb, notebook)
    except KvlibError as e:
        _keep_failed(staged_nb, failed, stage)
        raise NotebookFailed(f"{notebook}: {e}") from None
    failed.unlink(missing_ok=True)
    _clean_stage(stage)
    print(f"{step} {notebook} ... {seconds:.0f} s", flush=True)
    return seconds


# ---- progress ---------------------------------------------------------------------------------------------------

HEARTBEAT_S = 20.0  # while a cell runs, a line this often (a TTY gets one line rewritten in place)


def _previous_durations(executed: Path) -> list[float] | None:
    """Seconds each code cell took in the report's previous run of this notebook (papermill records them), or None."""
    try:
        cells = json.loads(executed.read_text()).get("cells", [])
        durations = [c["metadata"]["papermill"].get("duration") for c in cells if c.get("cell_type") == "code"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return [float(d) for d in durations] if durations and all(d is not None for d in durations) else None


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Prints, per notebook, which code cell runs (its first line), the time so far and an estimate of what is
    left, from the durations papermill recorded for each cell in the previous run of the notebook (when there is
    one with as many code cells). On a terminal one line is rewritten in place; otherwise (make's output piped to
    a log, CI) a line at every cell and every HEARTBEAT_S while a long cell runs."""

    def __init__(self, step: str, notebook: str, previous: list[float] | None, stream: Any = None) -> None:
        self.step, self.notebook, self.previous = step, notebook, previous
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.total = 0
        self.done = 0  # code cells finished
        self.current = ""
        self.cell_t0 = self.t0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def estimate(self) -> str:
        """'about 1m20s left' from the previous run's cell durations; '' without a usable previous run."""
        if not self.previous or len(self.previous) != self.total:
            return ""
        running = time.perf_counter() - self.cell_t0
        left = sum(self.previous[self.done :]) - (running if self.done < self.total else 0.0)
        left = max(left, 0.0)
        return f", about {_clock(left)} left (previous run: {_clock(sum(self.previous))})"

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        cell = min(self.done + 1, self.total)
        return (
            f"{self.step} {self.notebook}: cell {cell}/{self.total} {self.current} · {_clock(elapsed)}"
            + self.estimate()
        )

    def _print(self) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + self.line()[:200])
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def start(self, code_cells: int) -> None:
        self.total = code_cells
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(1.0 if self.tty else HEARTBEAT_S):
            self._print()

    def cell_start(self, cell: Any) -> None:
        if cell.get("cell_type") != "code":
            return
        first = next((ln.strip() for ln in str(cell.get("source", "")).splitlines() if ln.strip()), "")
        self.current = f"({first[:48]}{'…' if len(first) > 48 else ''})" if first else ""
        self.cell_t0 = time.perf_counter()
        self._print()

    def cell_complete(self, cell: Any) -> None:
        if cell.get("cell_type") == "code":
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.tty:
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()


def _engine_with(progress: Progress) -> str:
    """Register (under a fixed name) papermill's nbclient engine reporting each cell to `progress`."""
    from papermill.engines import NBClientEngine, papermill_engines  # heavy: only when the report runs notebooks

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def cell_start(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                progress.cell_start(cell)
                return start(cell, cell_index, **kw)

            def cell_complete(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                progress.cell_complete(cell)
                return complete(cell, cell_index, **kw)

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            progress.start(sum(c.get("cell_type") == "code" for c in nb_man.nb.cells))
            try:
                return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
            finally:
                progress.stop()

    papermill_engines.register("kvlib-progress", ProgressEngine)
    return "kvlib-progress"


class NotebookFailed(KvlibError):
    """A notebook raised while running: the build stops (exit 1), its partial output is kept for inspection."""


# ---- each page opens with its verdict ---------------------------------------------------------------------------

VERDICT_BEGIN = "<!-- kvlib:verdict -->"  # the box's bounds: a rebuilt index replaces the box, never adds a second
VERDICT_END = "<!-- /kvlib:verdict -->"
VERDICT_STYLE = (
    "font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; border: 2px solid #5b8def; background: #f3f7ff; "
    "padding: 0.6em 1.1em; margin: 0.6em 0 1.2em 0; border-radius: 4px;"
)


def verdict_box(found: Sequence[Finding]) -> str:
    """The HTML of a page's "What this page found" box: one item per finding (its sentence, as the index shows
    it; ⚠ before one that contradicts the textbook), between VERDICT_BEGIN and VERDICT_END; "" without findings."""
    if not found:
        return ""
    items = "".join(
        f"<li{' class=contradicts' if f.contradicts else ''} style='margin: 0.3em 0'>"
        f"{'<b>⚠</b> ' if f.contradicts else ''}{f.html}</li>"
        for f in found
    )
    warn = " ⚠ marks a result that contradicts the textbook." if any(f.contradicts for f in found) else ""
    return (
        f'{VERDICT_BEGIN}<div class=kvlib-verdict style="{VERDICT_STYLE}">'
        "<div style='font-weight: 600; font-size: 1.1em'>What this page found</div>"
        f"<ul style='margin: 0.4em 0; padding-left: 1.3em'>{items}</ul>"
        "<div style='font-size: 0.85em; color: #555'>The report's findings for this notebook, computed from its CSVs "
        f"when <a href='index.html'>the report's index</a> was built; the page below shows how.{html.escape(warn)}"
        f"</div></div>{VERDICT_END}"
    )


class _FirstH1(HTMLParser):
    """Finds where the first </h1> starts (line, column), as HTMLParser reads a page: text inside <script> and
    <style> and escaped text are not mistaken for a tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.end: tuple[int, int] | None = None

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1" and self.end is None:
            self.end = self.getpos()


def _first_h1_end(page: str, chunk: int = 1 << 16) -> int | None:
    """The index just after the first </h1> of `page` (None when it has none), read in chunks until found."""
    parser = _FirstH1()
    for start in range(0, len(page), chunk):
        parser.feed(page[start : start + chunk])
        if parser.end is not None:
            break
    if parser.end is None:
        return None
    line, column = parser.end  # HTMLParser counts lines by "\n", from 1
    lines = page.split("\n", line - 1)
    tag_start = sum(len(s) + 1 for s in lines[: line - 1]) + column
    close = page.find(">", tag_start)
    return None if close < 0 else close + 1


def with_verdict(page: str, box: str) -> str:
    """`page` (an HTML document) with its previous verdict box removed and `box` put right after its first </h1>
    (its title); without an <h1>, right after <body ...>; unchanged when there is neither. An empty `box` only
    removes the previous one."""
    begin = page.find(VERDICT_BEGIN)
    if begin >= 0:
        end = page.find(VERDICT_END, begin)
        if end >= 0:
            page = page[:begin] + page[end + len(VERDICT_END) :]
    if not box:
        return page
    at = _first_h1_end(page)
    if at is None:
        body = page.lower().find("<body")
        at = page.find(">", body) + 1 if body >= 0 else 0
        if at <= 0:
            return page
    return page[:at] + box + page[at:]


def add_verdicts(out: str | Path, notebooks: Sequence[str]) -> list[Path]:
    """Open every notebook's HTML pages in `out` (NN_name.html and NN_name.reading.html, where they exist) with
    the box of the report's findings for it (`verdict_box` of kvlib.report.findings.findings); a page without a
    finding gets none (an earlier box is removed). Only pages whose text changes are rewritten (whole); returns
    them. Raises what `findings` raises (KvlibError, one line)."""
    out = Path(out)
    found = findings(out, list(notebooks))
    changed = []
    for nb in notebooks:
        box = verdict_box([f for f in found if f.notebook == nb])
        for page in (out / f"{nb}.html", out / f"{nb}.reading.html"):
            if not page.is_file():
                continue
            text = page.read_text(encoding="utf-8")
            new = with_verdict(text, box)
            if new != text:
                write_whole(page, functools.partial(_write_text, text=new))
                changed.append(page)
    return changed


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
