"""Results that are never lost: a CSV appended one complete row at a time.

- The header is written once, with the first row.
- An existing file with a different header, its header again on a later line (two writers that once started it
  together), or a last line cut short is refused, never rewritten.
- Each row is one `write` of a whole line on a file opened in append mode, flushed and fsynced before the next
  run starts, so a crash or Ctrl-C leaves every earlier row intact.
- Writers take turns: each row is appended under an exclusive lock on the file itself (`fcntl.flock`, held from
  the check of what the file holds to the fsync of the row), so two processes that start the same new file at
  once write one header between them, and a file that became foreign since the last look is refused.
- `check_writable` answers, before any model work, whether rows could be appended, without changing the file;
  `check_outputs` does it for every output of a command at once and refuses two outputs that are one file.
- A missing parent folder is an error (a mistyped path is not created silently); so is a folder or file that
  cannot be written (permissions, a read-only file system), found by trying, not by reading permission bits.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from kvlib.core.errors import KvlibError


def read_header(path: str | Path) -> list[str] | None:
    """The header of an existing CSV, None when the file is missing or empty."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return None
    with p.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def _describe_difference(found: list[str], expected: list[str]) -> str:
    for i, (a, b) in enumerate(zip(found, expected, strict=False)):
        if a != b:
            return f"column {i + 1} is {a!r}, expected {b!r}"
    return f"it has {len(found)} columns, expected {len(expected)}"


def _refusal(f: BinaryIO, p: Path, columns: list[str], checked: int = 0) -> str | None:
    """Why rows with `columns` cannot be appended to the open, non-empty CSV `f` (at `p`), or None. Its header, its
    last byte and, from byte `checked` on (the part not read before), every record is read: one that is the
    header again is refused like a foreign header."""
    f.seek(0)
    first = f.readline()
    header = next(csv.reader([first.decode("utf-8")]), [])
    if header != columns:
        return (
            f"{p} already holds results with a different header ({_describe_difference(header, columns)}); "
            "it is left untouched: write to a new file"
        )
    size = f.seek(0, os.SEEK_END)
    f.seek(size - 1)
    if f.read(1) != b"\n":
        return f"{p} ends with an incomplete line; it is left untouched: write to a new file"
    f.seek(max(checked, len(first)))
    for record in csv.reader(io.StringIO(f.read().decode("utf-8"), newline="")):
        if record == columns:
            return (
                f"{p} holds its header line again after its first line (two writers once started it at the same "
                "time); it is left untouched: write to a new file"
            )
    return None


def check_writable(path: str | Path, columns: Sequence[str]) -> None:
    """Raise KvlibError unless rows with `columns` can be appended to `path`; the file is not touched."""
    _check_writable(Path(path), list(columns))


# (device, inode) -> (size, modification time) of a file as this process last wrote it, found sound: a check of a
# file unchanged since then reads only its header and last byte, so appending row by row to a large file does not
# re-read it whole each time. Any other change (another writer, a rewrite, a reused inode) reads it whole.
_verified: dict[tuple[int, int], tuple[int, int]] = {}


def _check_writable(p: Path, columns: list[str]) -> tuple[int, int, int] | None:
    """check_writable; returns (device, inode, size) of the existing file as it was read, None for a new file."""
    if p.exists():
        if not p.is_file():
            raise KvlibError(f"cannot write results to {p}: it is not a regular file")
        if not os.access(p, os.W_OK):
            raise KvlibError(f"cannot write results to {p}: permission denied")
        try:
            with p.open("rb") as f:
                st = os.fstat(f.fileno())
                # unchanged since this process last wrote it: only the header and the last byte are read again
                same = _verified.get((st.st_dev, st.st_ino)) == (st.st_size, st.st_mtime_ns)
                start = st.st_size if same else 0
                refusal = _refusal(f, p, columns, start) if st.st_size else None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise KvlibError(f"cannot read the existing results file {p}: {e}") from None
        if refusal:
            raise KvlibError(refusal)
        try:  # opening for append without writing changes neither the content nor the modification time
            with p.open("ab"):
                pass
        except OSError as e:
            raise KvlibError(f"cannot write results to {p}: {e.strerror or e}") from None
        return st.st_dev, st.st_ino, st.st_size
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise KvlibError(f"cannot write results to {p}: folder {parent} does not exist (it is not created for you)")
    check_folder_writable(parent, f"cannot write results to {p}")
    return None


def write_whole(path: Path, write: Any) -> None:
    """Replace the file at `path` whole: `write(tmp)` writes it in a new folder of a unique name beside `path`,
    which is then renamed over `path`. An interrupted write never leaves half a file, and two processes writing the
    same file at once never write into each other's temporary file (the last whole file wins). The file keeps its
    own name there, so its mode follows the umask and writers that read its suffix see the real one. Raises
    KvlibError (one line) when the folder cannot be written."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise KvlibError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        write(folder / path.name)
        os.replace(folder / path.name, path)
    except OSError as e:
        raise KvlibError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_folder_writable(folder: str | Path, what: str) -> None:
    """Raise KvlibError(`what`: why) unless a file can be created in `folder`, by creating and removing one."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kvlib-probe-"):
            pass
    except OSError as e:
        raise KvlibError(f"{what}: folder {folder} is not writable ({e.strerror or e})") from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links, `..` or different spellings), existing or not."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_outputs(outputs: Mapping[str, tuple[str | Path | None, Sequence[str]]]) -> None:
    """Check every output of a command before any work: {option: (path or None, columns)}.

    Raises KvlibError when two options name one file, or when any file could not take rows with its columns
    (`check_writable`). Options whose path is None are not written and not checked.
    """
    given = [(opt, path, cols) for opt, (path, cols) in outputs.items() if path is not None]
    for i, (opt_a, a, _) in enumerate(given):
        for opt_b, b, _ in given[i + 1 :]:
            if same_file(a, b):
                raise KvlibError(f"{opt_a} and {opt_b} name the same file ({a}); give each its own file")
    for _, path, cols in given:
        check_writable(path, cols)


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def _line(values: Iterable[object]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(v) for v in values])
    return buf.getvalue()


def append_rows(path: str | Path, rows: Iterable[Mapping[str, object]], columns: Sequence[str]) -> int:
    """Append each row (a mapping with exactly `columns` as keys) to the CSV at `path`; return how many.

    The header is written with the first row of a new or empty file. Each row is written and synced on its own,
    under an exclusive lock on the file, after checking again what the file holds (only what other writers added
    since this call's last row is read again), so rows already appended survive whatever happens next and
    concurrent writers never repeat the header.
    """
    columns = list(columns)
    p = Path(path)
    checked = _check_writable(p, columns)  # (device, inode, size) of the file as read last by this call
    header = _line(columns).encode("utf-8")
    n = 0
    for row in rows:
        missing = [c for c in columns if c not in row]
        extra = [k for k in row if k not in columns]
        if missing or extra:
            raise KvlibError(f"a result row does not match the CSV columns (missing {missing}, unexpected {extra})")
        data = _line(row[c] for c in columns).encode("utf-8")
        try:
            with p.open("a+b") as f:  # appends only; opening it alone changes nothing
                fcntl.flock(f, fcntl.LOCK_EX)  # released when f is closed, after the fsync
                st = os.fstat(f.fileno())
                if st.st_size == 0:
                    data = header + data  # the header goes out in the same write as the first row
                else:
                    start = 0
                    if checked is not None and checked[:2] == (st.st_dev, st.st_ino) and st.st_size >= checked[2]:
                        start = checked[2]  # the file this call read last: read only what others added since
                    refusal = _refusal(f, p, columns, start)
                    if refusal:
                        raise KvlibError(refusal)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                after = os.fstat(f.fileno())
                checked = (st.st_dev, st.st_ino, after.st_size)
                _verified[checked[:2]] = (after.st_size, after.st_mtime_ns)
        except (UnicodeDecodeError, csv.Error) as e:
            raise KvlibError(f"cannot read the existing results file {p}: {e}") from None
        except OSError as e:
            raise KvlibError(f"cannot write results to {p}: {e.strerror or e}") from None
        n += 1
    return n
