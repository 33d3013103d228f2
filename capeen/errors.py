"""The one exception type that every `capeen` subcommand uses for a problem the user can fix, and how a
library's exception becomes part of its one line."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""


def output_file_problem(path: Path) -> str | None:
    """Why a file could not be written at `path` (a folder there, a missing or read-only folder), else None."""
    if path.is_dir():
        return "is a directory, not a file"
    folder = path.parent
    if not folder.is_dir():
        return f"folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_output(option: str, path: str | None, plot: bool = False) -> None:
    """Refuse an output file that could not be written, before the work whose result it would hold."""
    if path is None:
        return
    problem = output_file_problem(Path(path))
    if problem is None and plot and Path(path).suffix.lower() not in PLOT_SUFFIXES:
        problem = f"name the plot file with one of {', '.join(PLOT_SUFFIXES)}"
    if problem:
        raise UserError(f"{option} {path}: {problem}")


def first_line(exc: BaseException) -> str:
    """What went wrong, in one line: an OS error's own words, else the first line of the message, else its type."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
