"""Running the study's notebooks with papermill: profiles, parameter checks, and results that survive failure.

A profile is a pair of YAML files per notebook:

    params/<profile>.yaml                 keys every notebook declares (model, weights, device, dtype, seed)
    params/<profile>/<notebook>.yaml      that notebook's own keys (sizes, repeats, ...); optional

merged in that order. Every key must be a parameter the notebook declares, so papermill never warns about an
unknown parameter; `check_profiles` proves it for every profile and notebook with papermill's inspect API.

`run_notebook` executes into a staging folder and moves the notebook, its CSVs and figures into the report only
when every cell succeeded. On failure the executed notebook is kept as <notebook>.failed.ipynb and the previous
report is left as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from kvlib.core.errors import KvlibError
from kvlib.measure.results import check_folder_writable

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
KERNEL = "python3"  # the kernel of the Python that runs papermill: the project's .venv
OUT_DIR_PARAM = "out_dir"  # every notebook declares it; the runner points it at the staging folder


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


def profile_files(params_dir: str | Path, profile: str, notebook: str) -> list[Path]:
    """The parameter files of `notebook` in `profile`, in the order papermill applies them."""
    common = Path(params_dir) / f"{profile}.yaml"
    if not common.is_file():
        known = ", ".join(profiles(params_dir)) or "none"
        raise KvlibError(f"unknown profile {profile!r}: no {common} (profiles: {known})")
    own = Path(params_dir) / profile / f"{notebook}.yaml"
    return [common, own] if own.is_file() else [common]


def profile_params(params_dir: str | Path, profile: str, notebook: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for path in profile_files(params_dir, profile, notebook):
        params.update(_read_yaml(path))
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


def run_notebook(
    notebook: str,
    profile: str,
    reports_dir: str | Path = "reports",
    params_dir: str | Path = "params",
    notebooks_dir: str | Path = "notebooks",
) -> float:
    """Execute one notebook of the study with the profile's parameters into reports/<profile>/; return seconds."""
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
