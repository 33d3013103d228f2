"""Upper-confidence-bound policies over a grid of early-exit thresholds.

Each arm is a threshold. `select()` returns the arm to decode the next request with and `update()` turns
the decode's trace into rewards (reward.py). The three policies differ only in how much of the past they
remember, because request traffic drifts (clean photos, then noisy, then blurred ones):

* UCB1 (Auer et al. 2002; the paper's policy): all of it. Best when the traffic is stationary, slow to
  notice a change because old rewards outvote new ones.
* sliding-window UCB (Garivier & Moulines 2011): only the last `window` requests. Keeps O(window x arms)
  state, the price of being able to forget exactly.
* discounted UCB (Garivier & Moulines 2011): every past reward, weighted by gamma^age. O(arms) state;
  `1 / (1 - gamma)` is its effective memory in requests.

The index of arm a is `mean_a + c * sqrt(ln(H) / n_a)`, with n_a the (windowed or discounted) number of
observations of a and H the matching number of requests (all, the window's, or the discounted count).
Arms never observed come first, the highest threshold first: with side observations one pull of a high
threshold also observes every lower one.

Side observations (Mannor & Shamir 2011; UCB-N of Caron et al. 2012): a decode with threshold tau also
tells the reward every lower threshold would have earned, on every request, so each update counts as an
observation of all arms at or below the pulled one. Higher thresholds are left out even on requests where
the trace does determine their reward: that happens exactly when they would have exited where the pulled
arm did, so those rewards are a sample biased by the request's content (missing not at random). In the
drifting simulator they held a 0.44-reward arm's estimate at 0.14 and locked D-UCB on a worse arm for a
whole phase. Learning from lower arms only keeps every estimate unbiased.

All public methods take one lock, so the HTTP service may call them from any thread; between a request's
`select()` and its `update()` other requests may update, which UCB tolerates (the arm is just chosen on
slightly older statistics).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bandit.reward import DEFAULT_MU, ExitLayout, TraceLike, arm_rewards, request_reward
from bandit.store import SnapshotError, write_json_atomic

SNAPSHOT_FORMAT = "capeen-bandit-snapshot"
SNAPSHOT_VERSION = 1

DEFAULT_EXPLORATION = 0.2
"""c in the UCB index; `make_policy` says why it is far below UCB1's textbook sqrt(2)."""
DEFAULT_WINDOW = 1000
"""Sliding window in requests: a few minutes of traffic at a few requests per second."""
DEFAULT_GAMMA = 0.999
"""Discount per request; its effective memory 1 / (1 - gamma) = 1000 requests matches DEFAULT_WINDOW."""


@dataclass(frozen=True)
class Arm:
    """One candidate threshold and its position in the policy's grid."""

    index: int
    threshold: float


def _grid(thresholds: Sequence[float], calibrated: float | None) -> tuple[float, ...]:
    values = [float(t) for t in thresholds]
    if calibrated is not None and not any(math.isclose(t, calibrated, abs_tol=1e-9) for t in values):
        values.append(float(calibrated))
    if not values:
        raise ValueError("the threshold grid is empty")
    if not all(0.0 <= t <= 1.0 for t in values):
        raise ValueError(f"thresholds must lie in [0, 1], got {values}")
    grid = tuple(sorted(values))
    if any(b - a <= 1e-9 for a, b in zip(grid, grid[1:])):
        raise ValueError(f"thresholds must be distinct, got {list(grid)}")
    return grid


def default_grid(calibrated: float | None = None) -> tuple[float, ...]:
    """0.50, 0.55, ..., 0.95 and 0.99 (the steep end where confidence saturates), plus `calibrated`."""
    return _grid([round(0.5 + 0.05 * k, 2) for k in range(10)] + [0.99], calibrated)


class Policy(ABC):
    """A UCB policy over thresholds; subclasses say how past rewards are remembered."""

    name: ClassVar[str]

    def __init__(
        self,
        thresholds: Sequence[float],
        *,
        exit_positions: Sequence[int],
        num_layers: int,
        calibrated: float | None = None,
        exploration: float = DEFAULT_EXPLORATION,
        mu: float = DEFAULT_MU,
        side_observations: bool = True,
    ) -> None:
        if not (math.isfinite(exploration) and exploration >= 0):
            raise ValueError(f"exploration must be a finite number >= 0, got {exploration}")
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu}")
        self.layout = ExitLayout(tuple(exit_positions), num_layers)
        self.thresholds = _grid(thresholds, calibrated)
        self.arms = tuple(Arm(i, t) for i, t in enumerate(self.thresholds))
        self.calibrated = None if calibrated is None else float(calibrated)
        self.exploration = float(exploration)
        self.mu = float(mu)
        self.side_observations = bool(side_observations)
        self._threshold_array = np.asarray(self.thresholds)
        self._lock = threading.Lock()
        self._rounds = 0
        self._pulls = np.zeros(len(self.arms), dtype=np.int64)
        self._observations = np.zeros(len(self.arms), dtype=np.int64)
        self._reset()

    # --- what subclasses provide -------------------------------------------------------------------

    @abstractmethod
    def _reset(self) -> None:
        """Start the remembered statistics empty."""

    @abstractmethod
    def _add(self, rewards: np.ndarray) -> None:
        """Remember one request's rewards (NaN: not observed). Called under the lock."""

    @abstractmethod
    def _estimates(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Fresh arrays (means, counts) and the horizon H for the index. Called under the lock."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The remembered statistics as JSON values."""

    @abstractmethod
    def _parse_state(self, state: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        """Attribute values rebuilt from `_state()` output, not yet assigned; raises SnapshotError."""

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # --- public API --------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """Everything that defines what the statistics mean; a snapshot restores only into equal config."""
        return {
            "exit_positions": list(self.layout.exit_positions),
            "num_layers": self.layout.num_layers,
            "calibrated": self.calibrated,
            "exploration": self.exploration,
            "mu": self.mu,
            "side_observations": self.side_observations,
            **self._extra_config(),
        }

    @property
    def rounds(self) -> int:
        """Requests recorded so far."""
        with self._lock:
            return self._rounds

    def select(self) -> Arm:
        """The arm for the next request: an unobserved arm if any (highest first), else the best index."""
        with self._lock:
            means, counts, horizon = self._estimates()
        unobserved = np.flatnonzero(counts <= 0)
        if unobserved.size:
            return self.arms[int(unobserved[-1])]
        scores = means + self.exploration * np.sqrt(math.log(max(horizon, 1.0)) / counts)
        return self.arms[int(np.argmax(scores))]

    def update(self, arm: Arm, trace: TraceLike | Mapping[str, Any]) -> float:
        """Learn from the decode of one request made with `arm`; returns that request's reward.

        `trace` is any object with `exit_confidences` and `exit_layers` attributes, or a mapping with those
        keys (reward.py). Raises ValueError for a trace that does not fit the exit layout or is empty.
        """
        self._check_arm(arm)
        reward = request_reward(trace, self.layout, self.mu)
        rewards = np.full(len(self.arms), np.nan)
        if self.side_observations:
            # Lower thresholds only: they are known on every request, higher ones on a biased subset.
            rewards[: arm.index] = arm_rewards(trace, self.layout, self._threshold_array[: arm.index], self.mu)
        rewards[arm.index] = reward
        self._record(arm, rewards)
        return reward

    def observe(self, arm: Arm, rewards: Mapping[int, float]) -> None:
        """Learn from rewards given directly: arm index -> reward, including the pulled `arm`.

        For environments without traces (simulators, replays). Other arms' entries count only when side
        observations are on.
        """
        self._check_arm(arm)
        if arm.index not in rewards:
            raise ValueError(f"rewards lack the pulled arm {arm.index}")
        vector = np.full(len(self.arms), np.nan)
        for index, value in rewards.items():
            if not (0 <= index < len(self.arms)) or not math.isfinite(value):
                raise ValueError(f"bad reward {value!r} for arm {index!r}")
            if self.side_observations or index == arm.index:
                vector[index] = value
        self._record(arm, vector)

    def stats(self) -> list[dict[str, Any]]:
        """Per arm: threshold, pulls (requests decoded with it), observations (incl. side), mean_reward.

        mean_reward is the policy's current estimate (windowed/discounted for those policies); None if
        the arm has no observation it still remembers.
        """
        with self._lock:
            means, counts, _ = self._estimates()
            pulls, observations = self._pulls.tolist(), self._observations.tolist()
        return [
            {
                "threshold": arm.threshold,
                "pulls": pulls[arm.index],
                "observations": observations[arm.index],
                "mean_reward": float(means[arm.index]) if counts[arm.index] > 0 else None,
            }
            for arm in self.arms
        ]

    def best(self) -> Arm:
        """The arm with the highest estimated reward; before any data, the calibrated (else highest) one."""
        with self._lock:
            means, counts, _ = self._estimates()
        if np.any(counts > 0):
            return self.arms[int(np.argmax(np.where(counts > 0, means, -np.inf)))]
        if self.calibrated is not None:
            return min(self.arms, key=lambda a: abs(a.threshold - self.calibrated))
        return self.arms[-1]

    def snapshot(self) -> dict[str, Any]:
        """The whole learned state as JSON values, with the policy name, config and grid it belongs to."""
        with self._lock:
            state = {
                "rounds": self._rounds,
                "pulls": self._pulls.tolist(),
                "observations": self._observations.tolist(),
                **self._state(),
            }
        return {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "policy": self.name,
            "config": self.config,
            "thresholds": list(self.thresholds),
            "state": state,
        }

    def restore(self, snapshot: Any) -> None:
        """Take over the state in `snapshot`; raises SnapshotError, leaving this policy unchanged, if the
        snapshot is malformed or belongs to another format version, policy, config or grid."""
        if not isinstance(snapshot, Mapping):
            raise SnapshotError("the snapshot is not a JSON object")
        expected = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "policy": self.name,
            "config": self.config,
            "thresholds": list(self.thresholds),
        }
        for key, value in expected.items():
            if snapshot.get(key) != value:
                raise SnapshotError(f"snapshot {key} is {snapshot.get(key)!r}, this policy has {value!r}")
        state = snapshot.get("state")
        if not isinstance(state, Mapping):
            raise SnapshotError("snapshot state is missing")
        rounds = state.get("rounds")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise SnapshotError(f"snapshot rounds is {rounds!r}")
        pulls = _int_array(state, "pulls", len(self.arms))
        observations = _int_array(state, "observations", len(self.arms))
        if pulls.sum() != rounds:
            raise SnapshotError(f"snapshot pulls add up to {pulls.sum()}, not to its {rounds} rounds")
        # Everything is parsed before anything is assigned, so a bad state leaves this policy untouched.
        parsed = self._parse_state(state, rounds)
        with self._lock:
            self._rounds, self._pulls, self._observations = rounds, pulls, observations
            self.__dict__.update(parsed)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `snapshot()` to `path` atomically (store.write_json_atomic)."""
        write_json_atomic(path, self.snapshot())

    # --- internals ---------------------------------------------------------------------------------

    def _check_arm(self, arm: Arm) -> None:
        if not (isinstance(arm, Arm) and 0 <= arm.index < len(self.arms) and self.arms[arm.index] == arm):
            raise ValueError(f"{arm!r} is not an arm of this policy's grid {self.thresholds}")

    def _record(self, arm: Arm, rewards: np.ndarray) -> None:
        with self._lock:
            self._rounds += 1
            self._pulls[arm.index] += 1
            self._observations += ~np.isnan(rewards)
            self._add(rewards)


def _float_array(state: Mapping[str, Any], key: str, length: int) -> np.ndarray:
    value = state.get(key)
    if not isinstance(value, list) or len(value) != length:
        raise SnapshotError(f"snapshot {key} is not a list of {length} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise SnapshotError(f"snapshot {key} holds a value that is not a finite number")
    return np.asarray(value, dtype=float)


def _int_array(state: Mapping[str, Any], key: str, length: int) -> np.ndarray:
    array = _float_array(state, key, length)
    if any(not isinstance(v, int) for v in state[key]) or np.any(array < 0):
        raise SnapshotError(f"snapshot {key} must hold counts (integers >= 0)")
    return array.astype(np.int64)


class UCB1(Policy):
    """UCB1: means over every observation ever made; H is the number of requests."""

    name = "ucb1"

    def _reset(self) -> None:
        self._sums = np.zeros(len(self.arms))

    def _add(self, rewards: np.ndarray) -> None:
        seen = ~np.isnan(rewards)
        self._sums[seen] += rewards[seen]

    def _estimates(self) -> tuple[np.ndarray, np.ndarray, float]:
        counts = self._observations.astype(float)
        return self._sums / np.maximum(counts, 1.0), counts, float(self._rounds)

    def _state(self) -> dict[str, Any]:
        return {"sums": self._sums.tolist()}

    def _parse_state(self, state: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        return {"_sums": _float_array(state, "sums", len(self.arms))}


class DiscountedUCB(Policy):
    """D-UCB: every request's rewards and counts are multiplied by gamma, so old traffic fades."""

    name = "d-ucb"

    def __init__(self, thresholds: Sequence[float], *, gamma: float = DEFAULT_GAMMA, **kwargs: Any) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
        self.gamma = float(gamma)
        super().__init__(thresholds, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def _reset(self) -> None:
        self._sums = np.zeros(len(self.arms))
        self._counts = np.zeros(len(self.arms))
        self._horizon = 0.0

    def _add(self, rewards: np.ndarray) -> None:
        seen = ~np.isnan(rewards)
        self._sums *= self.gamma
        self._counts *= self.gamma
        self._horizon = self.gamma * self._horizon + 1.0
        self._sums[seen] += rewards[seen]
        self._counts[seen] += 1.0

    def _estimates(self) -> tuple[np.ndarray, np.ndarray, float]:
        counts = self._counts.copy()
        return self._sums / np.where(counts > 0, counts, 1.0), counts, self._horizon

    def _state(self) -> dict[str, Any]:
        return {"sums": self._sums.tolist(), "counts": self._counts.tolist(), "horizon": self._horizon}

    def _parse_state(self, state: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        counts = _float_array(state, "counts", len(self.arms))
        horizon = state.get("horizon")
        if not isinstance(horizon, (int, float)) or isinstance(horizon, bool) or not 0 <= horizon <= rounds:
            raise SnapshotError(f"snapshot horizon is {horizon!r}")
        if np.any(counts < 0) or np.any(counts > horizon + 1e-9):
            raise SnapshotError("snapshot counts must lie between 0 and the horizon")
        return {"_sums": _float_array(state, "sums", len(self.arms)), "_counts": counts, "_horizon": float(horizon)}


class SlidingWindowUCB(Policy):
    """SW-UCB: only the last `window` requests count; older ones are forgotten exactly."""

    name = "sw-ucb"

    def __init__(self, thresholds: Sequence[float], *, window: int = DEFAULT_WINDOW, **kwargs: Any) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self.window = window
        super().__init__(thresholds, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"window": self.window}

    def _reset(self) -> None:
        self._history: deque[np.ndarray] = deque()
        self._sums = np.zeros(len(self.arms))
        self._counts = np.zeros(len(self.arms), dtype=np.int64)

    def _add(self, rewards: np.ndarray) -> None:
        if len(self._history) == self.window:
            old = self._history.popleft()
            seen = ~np.isnan(old)
            self._sums[seen] -= old[seen]
            self._counts -= seen
            self._sums[self._counts == 0] = 0.0  # no float residue on arms that left the window
        seen = ~np.isnan(rewards)
        self._history.append(rewards)
        self._sums[seen] += rewards[seen]
        self._counts += seen

    def _estimates(self) -> tuple[np.ndarray, np.ndarray, float]:
        counts = self._counts.astype(float)
        return self._sums / np.maximum(counts, 1.0), counts, float(len(self._history))

    def _state(self) -> dict[str, Any]:
        # The running sums are saved too, so a restored policy continues bit for bit.
        history = [[None if math.isnan(v) else v for v in row.tolist()] for row in self._history]
        return {"history": history, "sums": self._sums.tolist()}

    def _parse_state(self, state: Mapping[str, Any], rounds: int) -> dict[str, Any]:
        rows = state.get("history")
        if not isinstance(rows, list) or len(rows) > min(rounds, self.window):
            raise SnapshotError(f"snapshot history must be a list of at most min(rounds, {self.window}) rows")
        history: deque[np.ndarray] = deque()
        for row in rows:
            if not isinstance(row, list) or len(row) != len(self.arms):
                raise SnapshotError(f"snapshot history rows must list {len(self.arms)} rewards")
            if not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                for v in row
            ):
                raise SnapshotError("snapshot history holds a reward that is neither null nor a finite number")
            history.append(np.array([np.nan if v is None else v for v in row], dtype=float))
        matrix = np.array(history).reshape(len(history), len(self.arms))
        seen = ~np.isnan(matrix)
        sums = _float_array(state, "sums", len(self.arms))
        if not np.allclose(sums, np.where(seen, matrix, 0.0).sum(axis=0), rtol=1e-9, atol=1e-9):
            raise SnapshotError("snapshot sums do not match its history")
        return {"_history": history, "_sums": sums, "_counts": seen.sum(axis=0).astype(np.int64)}


POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (UCB1, SlidingWindowUCB, DiscountedUCB)}


def make_policy(
    name: str,
    thresholds: Sequence[float] | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    gamma: float = DEFAULT_GAMMA,
    **options: Any,
) -> Policy:
    """Build policy `name` ("ucb1", "sw-ucb" or "d-ucb") over `thresholds` (default: `default_grid`).

    `options` are `Policy`'s keywords: exit_positions and num_layers (required), calibrated, exploration,
    mu, side_observations. `window` is used by sw-ucb only and `gamma` by d-ucb only.

    The default exploration c = 0.2 is far below UCB1's textbook sqrt(2), which assumes rewards spread
    over [0, 1]. The bonus should be about sqrt(2) times the reward's standard deviation, and a request's
    reward, a mean over its tokens, varies by 0.01-0.04 between requests in the simulator; 0.2 leaves a
    margin of several times that for real traffic. With c = 1 UCB1 had four times the regret on simulated
    clean and noisy traffic.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    memory = {"sw-ucb": {"window": window}, "d-ucb": {"gamma": gamma}}.get(name, {})
    grid = default_grid(options.get("calibrated")) if thresholds is None else thresholds
    return POLICIES[name](grid, **memory, **options)
