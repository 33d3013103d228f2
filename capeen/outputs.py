"""The files that commands write besides their printed output (`--json`, `--plot`): checked before the work whose
result they hold (the bandit snapshot's path too, at the service's start), and written whole or not at all."""

from __future__ import annotations

import os
import stat
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
    folder, a read-only mount or /sys included."""
    try:
        path = Path(os.path.realpath(path))  # a link is written through (`replacing`)
        if path.is_dir():
            return "is a directory, not a file"
        folder = path.parent
        if not folder.is_dir():
            return f"folder {folder} does not exist"
        if path.exists():
            if not os.access(path, os.W_OK):
                return "exists and is read-only"
            if not path.is_file():  # /dev/stdout, a named pipe: written in place
                return None
    except OSError as exc:  # a name too long, a folder on the way that cannot be searched
        return exc.strerror or str(exc)
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".capeen-", suffix=".tmp")
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
    """A file to write `path`'s new content to. For a regular file (or a new one) it is a temporary file beside
    it, renamed over it once the block has written it whole, and removed if anything fails, so that an earlier
    file (last week's report) stays as it was; it keeps that file's permissions, and `path`'s suffix, from which
    matplotlib takes a plot's format. A link is followed: the file it points to is replaced, and the link stays.
    Anything else (/dev/stdout, a named pipe) is written in place. A failure to write is a UserError naming
    `option` and the file."""
    target = Path(os.path.realpath(path))
    with _reported(option, path):
        existing = target.stat() if target.exists() else None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        with _reported(option, path):
            yield target
        return
    with _reported(option, path):
        # a short name: `path`'s own may already be near the file system's limit
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=".capeen-", suffix=f".tmp{target.suffix}")
        os.close(handle)
    temporary = Path(name)
    try:
        with _reported(option, path):
            yield temporary
            with temporary.open("rb") as written:
                os.fsync(written.fileno())
            temporary.chmod(new_file_mode() if existing is None else stat.S_IMODE(existing.st_mode))
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def _reported(option: str, path: str | Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None


def write_text(option: str, path: str | Path, text: str) -> None:
    with replacing(option, path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def new_file_mode() -> int:
    """The mode a plain new file gets (0644 under the usual umask), not mkstemp's 0600: a file written here may
    be read by another user (a checkpoint copied into a container, a report on a shared machine)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
