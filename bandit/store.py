"""Persisting a policy across restarts without ever leaving a half-written or poisonous file behind.

`write_json_atomic` writes a temporary file in the target's directory, fsyncs it, renames it over the
target and fsyncs the directory: after a crash the path holds either the old snapshot or the new one.
`load_or_new` restores at start; a snapshot that cannot be taken over (truncated, not JSON, another
format version, policy, config or grid) is logged, renamed to `<path>.corrupt-<UTC timestamp>` for a
human to look at, and replaced by a fresh policy: learning restarts, the service does not fail.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bandit.policies import Policy

log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot that a policy cannot take over; the message says why."""


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write `payload` as JSON to `path` so that readers only ever see a complete file.

    A symbolic link at `path` (into a persistent volume, say) is followed: the file it points to is replaced,
    and the link stays. The file keeps its permissions; a new one is readable by all (0644), so that a backup
    or monitoring job running as another user can read it."""
    target = Path(os.path.realpath(path))
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; other systems cannot open a directory and skip this)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LoadResult:
    """What `load_or_new` did: `restored` from the file, or fresh because of `problem` (None: no file)."""

    policy: Policy
    restored: bool
    problem: str | None = None
    set_aside: Path | None = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"snapshot holds the non-JSON number {name}")


def load_or_new(path: str | os.PathLike[str], factory: Callable[[], Policy]) -> LoadResult:
    """A policy from `factory()`, restored from the snapshot at `path` if there is a usable one."""
    # a link is followed, as `write_json_atomic` follows it: a bad snapshot is moved aside in the folder it is
    # in (a mounted volume, say), and the link stays where it is, to receive the next snapshot
    target = Path(os.path.realpath(path))
    policy = factory()
    _remove_leftover_temporaries(target)
    if not target.exists():
        return LoadResult(policy, restored=False)
    if not target.is_file():  # a folder is not moved aside with its contents, and a FIFO would block the read
        problem = "not a regular file"
        log.warning("bandit snapshot %s not restored (%s); starting a fresh %s policy", target, problem, policy.name)
        return LoadResult(policy, restored=False, problem=problem)
    try:
        policy.restore(json.loads(target.read_text(encoding="utf-8"), parse_constant=_reject_constant))
        return LoadResult(policy, restored=True)
    except SnapshotError as exc:
        problem = f"foreign or malformed snapshot: {exc}"
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, truncated, nested too deep
        problem = f"unreadable snapshot: {exc}"
    set_aside = _set_aside(target)
    log.warning(
        "bandit snapshot %s not restored (%s); %s; starting a fresh %s policy",
        target,
        problem,
        f"moved to {set_aside}" if set_aside else "could not move it aside",
        policy.name,
    )
    return LoadResult(policy, restored=False, problem=problem, set_aside=set_aside)


def _remove_leftover_temporaries(target: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted (`write_json_atomic` names them
    `.<name>.*.tmp` beside the file it replaces, `target` with links resolved); called at start, when no write
    is under way."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            leftover.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted snapshot write: %s", leftover, exc)
        else:
            log.info("removed %s, left by an interrupted snapshot write", leftover)


def _set_aside(target: Path) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = target.with_name(f"{target.name}.corrupt-{stamp}")
    suffix = 1
    while candidate.exists():
        candidate = target.with_name(f"{target.name}.corrupt-{stamp}-{suffix}")
        suffix += 1
    try:
        target.rename(candidate)
    except OSError as exc:
        log.warning("could not move bad snapshot %s aside: %s", target, exc)
        return None
    return candidate
