"""The files that commands write besides their printed output (`--json`, `--plot`): checked before the work whose
result they hold (the bandit snapshot's path too, at the service's start), and written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from capeen.errors import UserError

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def output_file_problem(path: Path) -> str | None:
    """Why a file could not be written at `path` (a folder there, a missing or read-only folder, a read-only
    file, a name too long), else None.

    The folder is tried with a real file, created and removed at once: `os.access` says yes to root in any
    folder, a read-only mount or /sys included. Its name is that of `bandit.store.write_json_atomic`'s
    temporary files, which a start-up clears if a kill left one."""
    folder = path.parent
    try:
        if path.is_dir():
            return "is a directory, not a file"
        if not folder.is_dir():
            return f"folder {folder} does not exist"
        if path.exists() and not os.access(path, os.W_OK):
            return "exists and is read-only"
    except OSError as exc:  # a name too long, a folder on the way that cannot be searched
        return exc.strerror or str(exc)
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError:
        return f"folder {folder} is not writable"
    except OSError as exc:  # a name too long, a read-only file system, a full disk...
        return f"cannot create a file in folder {folder} ({exc.strerror or exc})"
    os.close(handle)
    os.unlink(probe)
    return None


def check_output(option: str, path: str | None, plot: bool = False) -> None:
    """Refuse an output file that could not be written, before the work whose result it would hold."""
    if path is None:
        return
    problem = output_file_problem(Path(path))
    if problem is None and plot and Path(path).suffix.lower() not in PLOT_SUFFIXES:
        problem = f"name the plot file with one of {', '.join(PLOT_SUFFIXES)}"
    if problem:
        raise UserError(f"{option} {path}: {problem}")


@contextmanager
def replacing(option: str, path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write to; it is renamed over `path` once the block has written it
    whole, and removed if anything fails, so that an earlier file at `path` (last week's report) stays as it
    was. Its name keeps `path`'s suffix, from which matplotlib takes a plot's format. A failure to write is a
    UserError naming `option` and the file."""
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        temporary.chmod(new_file_mode())
        os.replace(temporary, path)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_text(option: str, path: str | Path, text: str) -> None:
    with replacing(option, path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def new_file_mode() -> int:
    """The mode a plain new file gets (0644 under the usual umask), not mkstemp's 0600: a file written here may
    be read by another user (a checkpoint copied into a container, a report on a shared machine)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
