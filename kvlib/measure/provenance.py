"""Provenance: what code, which libraries and which machine produced a measurement.

Every result row carries these, so a figure can always be traced to a commit and a machine. The git commit gets
a "-dirty" suffix when tracked files differ from it (as `git describe --dirty`; untracked files don't count).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # kvlib/measure/provenance.py -> the repository


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def git_commit() -> str:
    """The commit of the working tree, with "-dirty" when tracked files have changes; "unknown" outside git."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if status else commit


@functools.cache
def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13", ...) from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def timestamp() -> str:
    """Now, ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@functools.cache
def _static() -> dict[str, str]:
    import transformers  # heavy: seconds to import

    return {
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "platform": platform.platform(),
    }


def provenance(device: torch.device | str, dtype: str | None = None) -> dict[str, Any]:
    """Provenance of a measurement on `device`: timestamp, git commit, versions, device name, torch threads.

    The commit and versions are read once per process (the code does not change under a running process);
    the timestamp is taken at each call.
    """
    info: dict[str, Any] = {
        **_static(),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "timestamp": timestamp(),
    }
    if dtype is not None:
        info["dtype"] = dtype
    return info
