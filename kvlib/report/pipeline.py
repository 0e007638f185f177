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
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kvlib.errors import KvlibError

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
    import papermill

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


def _move_outputs(stage: Path, out: Path, prefix: str) -> None:
    """Replace the report's files of this notebook (data/NN_*, figures/NN_*) by the staged ones."""
    for sub in ("data", "figures"):
        staged = sorted((stage / sub).glob("*")) if (stage / sub).is_dir() else []
        stray = [p.name for p in staged if not p.name.startswith(f"{prefix}_")]
        if stray:
            raise KvlibError(f"the notebook wrote {sub}/{', '.join(stray)}: names must start with {prefix}_")
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob(f"{prefix}_*"):
            old.unlink()
        for p in staged:
            os.replace(p, out / sub / p.name)


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
    from kvlib.measure.results import check_folder_writable

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
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebooks_dir = Path(notebooks_dir).resolve()
    source = notebooks_dir / f"{notebook}.ipynb"
    if not source.is_file():
        raise KvlibError(f"no notebook {source}")
    params = profile_params(params_dir, profile, notebook)
    check_keys(source, params, f"profile {profile}")
    check_reports_dir(reports_dir)
    out = Path(reports_dir) / profile
    stage = out / ".build" / notebook
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    params[OUT_DIR_PARAM] = str(stage.resolve())

    order = discover(notebooks_dir)
    step = f"[{order.index(notebook) + 1}/{len(order)}]" if notebook in order else "[-]"
    print(f"{step} {notebook} ...", flush=True)
    staged_nb = stage / f"{notebook}.ipynb"
    failed = out / f"{notebook}.failed.ipynb"
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(staged_nb),
            parameters=params,
            kernel_name=KERNEL,
            cwd=str(notebooks_dir),
            progress_bar=sys.stderr.isatty(),
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
        _move_outputs(stage, out, notebook.split("_", 1)[0])
    except KvlibError as e:
        _keep_failed(staged_nb, failed, stage)
        raise NotebookFailed(f"{notebook}: {e}") from None
    os.replace(staged_nb, out / f"{notebook}.ipynb")
    failed.unlink(missing_ok=True)
    _clean_stage(stage)
    print(f"{step} {notebook} ... {seconds:.0f} s", flush=True)
    return seconds


class NotebookFailed(KvlibError):
    """A notebook raised while running: the build stops (exit 1), its partial output is kept for inspection."""
