"""The one exception type that every `capeen` subcommand uses for a problem the user can fix, and how a
library's exception becomes part of its one line."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: printed as one line on stderr, exit status 2."""


def first_line(exc: BaseException) -> str:
    """What went wrong, in one line: an OS error's own words, else the first line of the message, else its type."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
