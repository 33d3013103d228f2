"""The service's A-CAPEEN bandit: one policy chosen by the settings, its metrics, its snapshot and its reset.

The policy itself (bandit/) is thread-safe; this wrapper only swaps it whole on reset, so requests that
selected an arm before the reset update the fresh policy (same grid, so their arm is still valid).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from bandit import Arm, Policy, load_or_new
from models.decoding import DecodeTrace
from service.metrics import ServingMetrics

log = logging.getLogger(__name__)


def arm_label(arm: Arm) -> str:
    """The arm's metric label: its threshold as written ("0.55"), and distinct for distinct thresholds (a
    6-digit format gave 0.5 and 0.5000001 one label)."""
    return repr(arm.threshold)


class AdaptiveThreshold:
    def __init__(self, factory: Callable[[], Policy], metrics: ServingMetrics, state_path: Path | None) -> None:
        """A fresh policy, or the one in the snapshot at `state_path` if usable (a bad one is set aside)."""
        self._factory = factory
        self._metrics = metrics
        self._changes_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self.state_path = state_path
        if state_path is None:
            self.policy = factory()
        else:
            loaded = load_or_new(state_path, factory)
            self.policy = loaded.policy
            if loaded.restored:
                log.info("bandit restored from %s (%d requests learnt)", state_path, self.policy.rounds)
        self._changes_counted = len(self.policy.changes)  # those before a restart are not counted again
        for arm in self.policy.arms:  # at 0 from the start, so that an arm's first pulls count in rate()
            metrics.arm_pulls.labels(arm=arm_label(arm))
        self._saved = (self.policy, self.policy.rounds)  # what the snapshot on disk holds
        # read at each scrape: set after each update, concurrent updates could leave an older best showing
        metrics.bandit_threshold.set_function(lambda: self.policy.best().threshold)

    def save(self, level: int = logging.INFO, only_if_unsaved: bool = False) -> None:
        """Write the snapshot (nothing without a state path); raises OSError if it cannot be written.
        `only_if_unsaved`: not when the snapshot on disk already holds this state (a periodic save that waited
        for a reset's, say)."""
        if self.state_path is not None:
            with self._save_lock:  # one at a time, each taking the state when its turn comes: the last write is
                policy = self.policy  # the newest state (a periodic save cannot overwrite a reset's)
                rounds = policy.rounds
                if only_if_unsaved and self._saved == (policy, rounds):
                    return
                policy.save(self.state_path)
                self._saved = (policy, rounds)
            log.log(level, "bandit snapshot written to %s (%d requests learnt)", self.state_path, rounds)

    def unsaved(self) -> bool:
        """Whether the bandit learnt something, or was reset, since the snapshot on disk was written."""
        return self.state_path is not None and self._saved != (self.policy, self.policy.rounds)

    def reset(self) -> None:
        with self._changes_lock:
            self.policy = self._factory()
            self._changes_counted = 0

    def select(self) -> Arm:
        return self.policy.select()

    def update(self, arm: Arm, trace: DecodeTrace) -> None:
        """Learn from one request's own trace."""
        policy = self.policy
        reward = policy.update(arm, trace)
        self._count_changes(policy)
        self._metrics.arm_pulls.labels(arm=arm_label(arm)).inc()
        self._metrics.bandit_reward.observe(reward)

    def _count_changes(self, policy: Policy) -> None:
        """Add the policy's newly detected changes to the counter, each once although updates run concurrently."""
        with self._changes_lock:
            if policy is not self.policy:
                return  # reset meanwhile: the detections of the discarded policy no longer matter
            changes = policy.changes
            found = len(changes)
            if found > self._changes_counted:
                self._metrics.bandit_changes.inc(found - self._changes_counted)
                log.info("bandit: the rewards moved (change %d detected at request %d); learning afresh", found,
                         changes[-1])
                self._changes_counted = found
