"""Upper-confidence-bound policies over a grid of early-exit thresholds.

Each arm is a threshold. `select()` returns the arm to decode the next request with and `update()` turns
the decode's trace into rewards (reward.py). The four policies differ only in how much of the past they
remember, because request traffic drifts (clean photos, then noisy, then blurred ones):

* UCB1 (Auer et al. 2002; the paper's policy): all of it. Best when the traffic is stationary, slow to
  notice a change because old rewards outvote new ones.
* sliding-window UCB (Garivier & Moulines 2011): only the last `window` requests. Keeps O(window x arms)
  state, the price of being able to forget exactly.
* discounted UCB (Garivier & Moulines 2011): every past reward, weighted by gamma^age. O(arms) state;
  `1 / (1 - gamma)` is its effective memory in requests.
* change-detecting UCB (in the manner of M-UCB, Cao et al. 2019): all of it, until a two-sample test on each
  arm's recent rewards says they moved; then none. It pays for forgetting only when the traffic changed.

The index. Each policy remembers, per arm a, the (windowed or discounted) number of observations n_a, the
sum of their rewards and the sum of their squares, and H, the matching number of requests (all, the
window's, or the discounted count). The default `bonus="variance"` index is

    index_a = mean_a + c * sqrt(var_a * ln(H) / n_a),    var_a = max(s_a^2, min_std^2)

with s_a^2 the sample variance of the remembered rewards, (sum of squares - n_a * mean_a^2) / (n_a - 1)
(Bessel's correction; the discounted count stands in for the number of observations in D-UCB), and c the
`exploration`. This is the form of the bonus of UCB for Gaussian rewards with an estimated variance
(UCB1-Normal and UCB1-Tuned of Auer et al. 2002; compare UCB-V of Audibert, Munos & Szepesvari 2009): the
confidence interval of a mean is a multiple of its standard error, so the bonus scales with how much the
arm's reward actually varies between requests. Why not a bonus of the reward's range: a request's reward is
a mean over tokens of differences of confidences, and on the first default checkpoint arm means differ by 0.003-0.03
with per-request standard deviations of 0.003-0.023, while the reward could in principle span [-1 - mu, 1].
A bonus sized for a range is many times the gaps and the policy keeps paying for exploration it does not
need: on `capeen bench-drift` the range index earned 74% of the best fixed arms' gain over full depth, the
variance index 98%.

An arm needs more than one remembered observation for a variance: until then it is treated like an
unobserved arm. So the forgetting policies come back to an arm whose memory has faded to one observation
or less, whatever its last estimate; UCB1, which never forgets, relies on the min_std floor to keep a
bonus for an arm whose first rewards happened to agree.

`bonus="range"` keeps the former index `mean_a + c * sqrt(ln(H) / n_a)` (UCB1's, for rewards of a known
range; its default c is RANGE_EXPLORATION), for comparisons.

Arms not ready for the index (never observed; for the variance index, observed at most once in memory) come
first, the highest threshold first: with side observations one pull of a high threshold also observes every
lower one.

Side observations (Mannor & Shamir 2011; UCB-N of Caron et al. 2012): a decode with threshold tau also
tells the reward every lower threshold would have earned, on every request, so each update counts as an
observation of all arms at or below the pulled one. Higher thresholds are left out even on requests where
the trace does determine their reward: that happens exactly when they would have exited where the pulled
arm did, so those rewards are a sample biased by the request's content (missing not at random). In the
drifting simulator they held a 0.44-reward arm's estimate at 0.14 and locked D-UCB on a worse arm for a
whole phase. Learning from lower arms only keeps every estimate unbiased.

All public methods take one lock, so the HTTP service may call them from any thread; between a request's
`select()` and its `update()` other requests may update, which UCB tolerates (the arm is just chosen on
slightly older statistics). An update costs O(arms).
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np

from bandit.reward import DEFAULT_MU, ExitLayout, TraceLike, arm_rewards, request_reward
from bandit.store import SnapshotError, write_json_atomic

SNAPSHOT_FORMAT = "capeen-bandit-snapshot"
SNAPSHOT_VERSION = 2
"""2: the state holds every arm's sum of squared rewards (the variance index). 1 lacked it."""
_OLD_VERSIONS = {1: "written before the variance index: it lacks the sums of squared rewards"}

BONUSES = ("variance", "range")
"""The index's bonus: scaled by each arm's estimated standard deviation, or by a fixed reward range."""
DEFAULT_BONUS = "variance"
DEFAULT_EXPLORATION = 1.0
"""c of the variance index: UCB1-Tuned's constant (Auer et al. 2002), whose bonus is
sqrt(variance * ln t / n) and which they found to do better in practice than UCB1's provable sqrt(2) (they
prove no bound for it; nor is one claimed here). For Gaussian rewards a bound `c * sd * sqrt(ln H / n)` above
the mean is exceeded with probability about H^(-c^2 / 2): H^(-1/2) for c = 1, 1/H for sqrt(2). The smaller
constant suits policies that must learn again after every change: the forgetting policies' n is capped by
their memory, so a wider bonus makes them explore a fixed share of every window. UCB1-Tuned also inflates
the variance by sqrt(2 ln t / n), a term sized for rewards in [0, 1]; min_std takes its place here. c was
not tuned on the benchmarks (on the first default checkpoint's drift stream a smaller c does better still)."""
RANGE_EXPLORATION = 0.2
"""c of the range index (`bonus="range"`), its default before the variance index; `make_policy` says why."""
DEFAULT_MIN_STD = 0.005
"""Floor of an arm's standard deviation in the variance index, in reward units (confidence, a probability).

Half a percentage point of confidence. It sits below the per-request spread of nearly every arm measured
(0.003-0.023 on the first default checkpoint, 0.01-0.04 in the simulator), so the estimated variance governs the bonus;
the floor only keeps a bonus for an arm whose few remembered rewards happen to agree, whose estimate near
zero would otherwise never be questioned again. The bonus is thus never smaller than that of a range index
with c * min_std. Rewards with few distinct values (a Bernoulli arm that paid 0 twice) need a floor near
their true spread, or `bonus="range"`."""
DEFAULT_WINDOW = 1000
"""Sliding window in requests: a few minutes of traffic at a few requests per second."""
DEFAULT_GAMMA = 0.999
"""Discount per request; its effective memory 1 / (1 - gamma) = 1000 requests matches DEFAULT_WINDOW."""
DEFAULT_CHANGE_WINDOW = 100
"""CD-UCB's test window per arm: the last 100 rewards, 50 against 50. A lasting shift of an arm's reward is seen
within about 50 of its observations. The test's bar, z * s * sqrt(4 / 100), is s at z = 5: a shift must be about
one per-request standard deviation to be detected once a whole half has moved."""
DEFAULT_EXPLORE_EVERY = 0
"""CD-UCB's forced exploration (M-UCB's): one request in this many decoded with the highest threshold; 0: none.

Off by default. Side observations already show the detector every arm up to the one in use on every request,
and a drift of the images moves the confidences behind all of them (bench-drift: every arm's reward moved
with each distortion). Forced decodes only help with a change confined to arms above the one in use, and they
cost: on bench-drift, 1 in 50 lowered CD-UCB from 97.7% to 90.3% of the best fixed arms' reward, because the
extra samples of the deepest arms kept the index trying them. BENCHMARKS.md has the figures."""
DEFAULT_CHANGE_THRESHOLD = 5.0
"""CD-UCB's z: a chance crossing has probability about 6e-7 per test for Gaussian rewards."""


def default_exploration(bonus: str = DEFAULT_BONUS) -> float:
    """The exploration c a policy with `bonus` gets when none is given."""
    if bonus not in BONUSES:
        raise ValueError(f"unknown bonus {bonus!r}; choose one of {', '.join(BONUSES)}")
    return DEFAULT_EXPLORATION if bonus == "variance" else RANGE_EXPLORATION


def sample_variances(counts: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Per arm, the Bessel-corrected variance (squares - sums^2 / n) / (n - 1) of its remembered rewards.

    NaN where n <= 1 (no variance from one observation). Round-off can make the sum of squared deviations
    slightly negative when the rewards barely differ; it is clipped at 0.
    """
    variances = np.full(counts.shape, np.nan)
    ready = counts > 1.0
    n = counts[ready]
    deviations = np.maximum(squares[ready] - sums[ready] ** 2 / n, 0.0)
    variances[ready] = deviations / (n - 1.0)
    return variances


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
    if any(b - a <= 1e-9 for a, b in pairwise(grid)):
        raise ValueError(f"thresholds must be distinct, got {list(grid)}")
    return grid


def default_grid(calibrated: float | None = None) -> tuple[float, ...]:
    """0.50, 0.55, ..., 0.95 and 0.99 (the steep end where confidence saturates), plus `calibrated`.

    Its floor, 0.5, bounds how much caption quality the bandit may trade for speed (the reward sees only
    confidences, not quality); a grid that reaches lower (`parse_grid`) lets it exit earlier still.
    """
    return _grid([round(0.5 + 0.05 * k, 2) for k in range(10)] + [0.99], calibrated)


def parse_grid(text: str, calibrated: float | None = None) -> tuple[float, ...]:
    """A grid written as comma-separated thresholds ("0.3,0.4,0.5"), plus `calibrated`; ValueError says why not."""
    values = []
    for item in text.split(","):
        try:
            value = float(item.strip())
        except ValueError:
            raise ValueError(f"thresholds must be comma-separated numbers, got {item.strip()!r} in {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"thresholds must be finite, got {item.strip()!r}")
        values.append(value)
    return _grid(values, calibrated)


class Policy(ABC):
    """A UCB policy over thresholds; subclasses say how past rewards are remembered."""

    name: ClassVar[str]
    detects_changes: ClassVar[bool] = False
    """Whether the policy empties its memory when it detects that the rewards moved (`changes`)."""

    def __init__(
        self,
        thresholds: Sequence[float],
        *,
        exit_positions: Sequence[int],
        num_layers: int,
        exit_offsets: Sequence[float] = (),
        calibrated: float | None = None,
        exploration: float | None = None,
        bonus: str = DEFAULT_BONUS,
        min_std: float = DEFAULT_MIN_STD,
        mu: float = DEFAULT_MU,
        side_observations: bool = True,
        deferred_fill: bool = False,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """`context`: JSON values naming what else the rewards depend on (the service gives the model's name,
        its dtype and how it fills skipped layers); a snapshot restores only under an equal context."""
        if exploration is None:
            exploration = default_exploration(bonus)  # also rejects an unknown bonus
        elif bonus not in BONUSES:
            raise ValueError(f"unknown bonus {bonus!r}; choose one of {', '.join(BONUSES)}")
        if not (math.isfinite(exploration) and exploration >= 0):
            raise ValueError(f"exploration must be a finite number >= 0, got {exploration}")
        if not (math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"min_std must be a finite number >= 0, got {min_std}")
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu}")
        self.layout = ExitLayout(tuple(exit_positions), num_layers, tuple(float(o) for o in exit_offsets),
                                 bool(deferred_fill))
        self.context = dict(context or {})
        self.thresholds = _grid(thresholds, calibrated)
        self.arms = tuple(Arm(i, t) for i, t in enumerate(self.thresholds))
        self.calibrated = None if calibrated is None else float(calibrated)
        self.exploration = float(exploration)
        self.bonus = bonus
        self.min_std = float(min_std)
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
    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Fresh float arrays (counts n, sums of rewards, sums of squared rewards) of what is remembered, and
        the horizon H for the index. Called under the lock."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The remembered statistics as JSON values."""

    @abstractmethod
    def _parse_state(self, state: Mapping[str, Any], rounds: int, observations: np.ndarray) -> dict[str, Any]:
        """Attribute values rebuilt from `_state()` output, not yet assigned; raises SnapshotError."""

    def _extra_config(self) -> dict[str, Any]:
        return {}

    # --- public API --------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """Everything that defines what the statistics mean; a snapshot restores only into equal config."""
        offsets = self.layout.offset_array()
        return {
            "exit_positions": list(self.layout.exit_positions),
            "num_layers": self.layout.num_layers,
            # only when set, so that snapshots from before per-exit offsets still restore
            **({"exit_offsets": offsets.tolist()} if offsets.any() else {}),
            "calibrated": self.calibrated,
            "exploration": self.exploration,
            "bonus": self.bonus,
            "min_std": self.min_std,
            "mu": self.mu,
            "side_observations": self.side_observations,
            **({"deferred_fill": True} if self.layout.deferred_fill else {}),
            # only when set, so that snapshots of policies without one (simulations, bench-drift) still restore
            **({"context": self.context} if self.context else {}),
            **self._extra_config(),
        }

    @property
    def changes(self) -> list[int]:
        """The requests (1-based) at which a change was detected and memory emptied; none unless
        `detects_changes`."""
        return []

    @property
    def rounds(self) -> int:
        """Requests recorded so far."""
        with self._lock:
            return self._rounds

    def select(self) -> Arm:
        """The arm for the next request: an arm not ready for the index if any (highest first), else the arm
        of the highest index (module docstring)."""
        counts, sums, squares, horizon = self._moments_now()
        means = _means(counts, sums)
        if self.bonus == "variance":
            ready = counts > 1.0  # a variance needs two observations
            spread = np.sqrt(np.maximum(sample_variances(counts, sums, squares), self.min_std**2))
        else:
            ready, spread = counts > 0.0, np.ones_like(means)
        if not ready.all():
            return self.arms[int(np.flatnonzero(~ready)[-1])]
        scores = means + self.exploration * spread * np.sqrt(math.log(max(horizon, 1.0)) / counts)
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
            counts, sums, _, _ = self._moments()
            pulls, observations = self._pulls.tolist(), self._observations.tolist()
        means = _means(counts, sums)
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
        counts, sums, _, _ = self._moments_now()
        if np.any(counts > 0):
            return self.arms[int(np.argmax(np.where(counts > 0, _means(counts, sums), -np.inf)))]
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
        version = snapshot.get("version")
        if snapshot.get("format") == SNAPSHOT_FORMAT and type(version) is int and version in _OLD_VERSIONS:
            raise SnapshotError(f"snapshot version is {version!r}, this policy has {SNAPSHOT_VERSION!r} "
                                f"({_OLD_VERSIONS[version]})")
        expected = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "policy": self.name,
            "config": self.config,
            "thresholds": list(self.thresholds),
        }
        for key, value in expected.items():
            found = snapshot.get(key)
            if found != value and key == "config" and isinstance(found, Mapping):
                differ = sorted(k for k in {*found, *value} if found.get(k) != value.get(k))
                raise SnapshotError("snapshot config differs: " + ", ".join(
                    f"{k} {found.get(k)!r} in the snapshot, {value.get(k)!r} now" for k in differ))
            if found != value:
                raise SnapshotError(f"snapshot {key} is {found!r}, this policy has {value!r}")
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
        # every request observes its own arm's reward, and each arm's at most once
        if np.any(observations < pulls) or np.any(observations > rounds):
            raise SnapshotError("snapshot observations must lie between each arm's pulls and the rounds")
        # Everything is parsed before anything is assigned, so a bad state leaves this policy untouched.
        parsed = self._parse_state(state, rounds, observations)
        with self._lock:
            self._rounds, self._pulls, self._observations = rounds, pulls, observations
            self.__dict__.update(parsed)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `snapshot()` to `path` atomically (store.write_json_atomic)."""
        write_json_atomic(path, self.snapshot())

    # --- internals ---------------------------------------------------------------------------------

    @property
    def _reward_bound(self) -> float:
        """Rewards lie in [-(1 + mu), 1]: C_i - C_1 is in [-1, 1] and mu * cost_i in [0, mu]."""
        return 1.0 + self.mu

    def _is_reward(self, value: Any) -> bool:
        return _is_finite_number(value) and -self._reward_bound - 1e-9 <= value <= 1.0 + 1e-9

    def _check_arm(self, arm: Arm) -> None:
        if not (isinstance(arm, Arm) and 0 <= arm.index < len(self.arms) and self.arms[arm.index] == arm):
            raise ValueError(f"{arm!r} is not an arm of this policy's grid {self.thresholds}")

    def _moments_now(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        with self._lock:
            return self._moments()

    def _record(self, arm: Arm, rewards: np.ndarray) -> None:
        with self._lock:
            self._rounds += 1
            self._pulls[arm.index] += 1
            self._observations += ~np.isnan(rewards)
            self._add(rewards)


def _is_finite_number(value: Any) -> bool:
    """A JSON number that fits a float (JSON integers are unbounded: 10**400 is one, and no float holds it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _float_array(state: Mapping[str, Any], key: str, length: int) -> np.ndarray:
    value = state.get(key)
    if not isinstance(value, list) or len(value) != length:
        raise SnapshotError(f"snapshot {key} is not a list of {length} numbers")
    if not all(_is_finite_number(v) for v in value):
        raise SnapshotError(f"snapshot {key} holds a value that is not a finite number")
    return np.asarray(value, dtype=float)


def _means(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Mean reward per arm; 0 where nothing is remembered."""
    return sums / np.where(counts > 0, counts, 1.0)


def _squares(state: Mapping[str, Any], sums: np.ndarray, counts: np.ndarray, bound: float) -> np.ndarray:
    """The snapshot's sums of squared rewards, checked with its sums against its counts. A reward lies in
    [-bound, 1] (bound = 1 + mu), so n rewards sum to at most n * bound in size and their squares to n * bound^2:
    an impossible sum (a tampered file, a bug) would pin the policy on one arm for good."""
    slack = counts * 1e-9 + 1e-9
    if np.any(np.abs(sums) > counts * bound + slack):
        raise SnapshotError(f"snapshot sums exceed what its counts of rewards in [-{bound:g}, 1] can add up to")
    squares = _float_array(state, "squares", len(sums))
    if np.any(squares < 0) or np.any(squares > counts * bound**2 + slack * bound):
        raise SnapshotError(f"snapshot squares exceed what its counts of rewards in [-{bound:g}, 1] can add up to")
    # Cauchy-Schwarz, sum^2 <= n * sum of squares: the variance may not be negative beyond round-off, which
    # grows with the count (n equal rewards added one by one drift by about n machine epsilons).
    if np.any(sums**2 > counts * squares * (1 + 1e-9 + 4e-16 * counts) + 1e-12):
        raise SnapshotError("snapshot squares do not fit its sums and counts (a negative variance)")
    return squares


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
        self._squares = np.zeros(len(self.arms))

    def _add(self, rewards: np.ndarray) -> None:
        seen = ~np.isnan(rewards)
        self._sums[seen] += rewards[seen]
        self._squares[seen] += rewards[seen] ** 2

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        counts = self._observations.astype(float)
        return counts, self._sums.copy(), self._squares.copy(), float(self._rounds)

    def _state(self) -> dict[str, Any]:
        return {"sums": self._sums.tolist(), "squares": self._squares.tolist()}

    def _parse_state(self, state: Mapping[str, Any], rounds: int, observations: np.ndarray) -> dict[str, Any]:
        sums = _float_array(state, "sums", len(self.arms))
        return {"_sums": sums, "_squares": _squares(state, sums, observations.astype(float), self._reward_bound)}


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
        self._squares = np.zeros(len(self.arms))
        self._counts = np.zeros(len(self.arms))
        self._horizon = 0.0

    def _add(self, rewards: np.ndarray) -> None:
        seen = ~np.isnan(rewards)
        self._sums *= self.gamma
        self._squares *= self.gamma
        self._counts *= self.gamma
        self._horizon = self.gamma * self._horizon + 1.0
        self._sums[seen] += rewards[seen]
        self._squares[seen] += rewards[seen] ** 2
        self._counts[seen] += 1.0

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        return self._counts.copy(), self._sums.copy(), self._squares.copy(), self._horizon

    def _state(self) -> dict[str, Any]:
        return {"sums": self._sums.tolist(), "squares": self._squares.tolist(), "counts": self._counts.tolist(),
                "horizon": self._horizon}

    def _parse_state(self, state: Mapping[str, Any], rounds: int, observations: np.ndarray) -> dict[str, Any]:
        counts = _float_array(state, "counts", len(self.arms))
        horizon = state.get("horizon")
        if not _is_finite_number(horizon) or not 0 <= horizon <= rounds:
            raise SnapshotError(f"snapshot horizon is {horizon!r}")
        if np.any(counts < 0) or np.any(counts > horizon + 1e-9):
            raise SnapshotError("snapshot counts must lie between 0 and the horizon")
        sums = _float_array(state, "sums", len(self.arms))
        return {"_sums": sums, "_squares": _squares(state, sums, counts, self._reward_bound), "_counts": counts,
                "_horizon": float(horizon)}


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
        self._squares = np.zeros(len(self.arms))
        self._counts = np.zeros(len(self.arms), dtype=np.int64)

    def _add(self, rewards: np.ndarray) -> None:
        if len(self._history) == self.window:
            old = self._history.popleft()
            seen = ~np.isnan(old)
            self._sums[seen] -= old[seen]
            self._squares[seen] -= old[seen] ** 2
            self._counts -= seen
            gone = self._counts == 0  # no float residue on arms that left the window
            self._sums[gone] = self._squares[gone] = 0.0
        seen = ~np.isnan(rewards)
        self._history.append(rewards)
        self._sums[seen] += rewards[seen]
        self._squares[seen] += rewards[seen] ** 2
        self._counts += seen

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        return self._counts.astype(float), self._sums.copy(), self._squares.copy(), float(len(self._history))

    def _state(self) -> dict[str, Any]:
        # The running sums are saved too, so a restored policy continues bit for bit.
        history = [[None if math.isnan(v) else v for v in row.tolist()] for row in self._history]
        return {"history": history, "sums": self._sums.tolist(), "squares": self._squares.tolist()}

    def _parse_state(self, state: Mapping[str, Any], rounds: int, observations: np.ndarray) -> dict[str, Any]:
        rows = state.get("history")
        if not isinstance(rows, list) or len(rows) > min(rounds, self.window):
            raise SnapshotError(f"snapshot history must be a list of at most min(rounds, {self.window}) rows")
        history: deque[np.ndarray] = deque()
        for row in rows:
            if not isinstance(row, list) or len(row) != len(self.arms):
                raise SnapshotError(f"snapshot history rows must list {len(self.arms)} rewards")
            if not all(v is None or self._is_reward(v) for v in row):
                raise SnapshotError(f"snapshot history holds a value that is not a reward in [-{self._reward_bound:g}, 1]")
            history.append(np.array([np.nan if v is None else v for v in row], dtype=float))
        matrix = np.array(history).reshape(len(history), len(self.arms))
        seen = ~np.isnan(matrix)
        known = np.where(seen, matrix, 0.0)
        parsed = {"_history": history, "_counts": seen.sum(axis=0).astype(np.int64)}
        for key, total in (("sums", known.sum(axis=0)), ("squares", (known**2).sum(axis=0))):
            value = _float_array(state, key, len(self.arms))
            if not np.allclose(value, total, rtol=1e-9, atol=1e-9):
                raise SnapshotError(f"snapshot {key} do not match its history")
            parsed[f"_{key}"] = value
        return parsed


class ChangeDetectingUCB(Policy):
    """CD-UCB: UCB1's whole memory, emptied when a change is detected (in the manner of M-UCB, Cao et al. 2019).

    Forgetting on a schedule (SW-UCB, D-UCB) costs exploration in every window whether or not the traffic
    changed. CD-UCB remembers everything, as UCB1 does, and tests instead, after every update, each arm whose
    last `change_window` rewards are all remembered: the older half's mean against the newer half's. If

        |mean_new - mean_old| > z * s * sqrt(4 / change_window),   s^2 = the two halves' pooled variance,
                                                                       floored at min_std^2

    (a two-sample z-test; z is `change_threshold`), the rewards have moved: every statistic is emptied and
    learning starts again with that request. For Gaussian rewards a test crosses z = 5 by chance with
    probability 6e-7; the buffers are tested after each request in which they change, so false alarms are rare
    but tests are not independent of one another (each half is reused), which makes them rarer still. Side
    observations feed the test of every lower arm on every request, so a shift of the traffic is seen on the
    low arms even while the best arm is pulled. Per update: O(arms x change_window), a constant window.
    """

    name = "cd-ucb"
    detects_changes = True

    def __init__(self, thresholds: Sequence[float], *, change_window: int = DEFAULT_CHANGE_WINDOW,
                 change_threshold: float = DEFAULT_CHANGE_THRESHOLD, explore_every: int = DEFAULT_EXPLORE_EVERY,
                 **kwargs: Any) -> None:
        if isinstance(explore_every, bool) or not isinstance(explore_every, int) or explore_every < 0:
            raise ValueError(f"explore_every must be an integer >= 0, got {explore_every!r}")
        self.explore_every = explore_every
        if isinstance(change_window, bool) or not isinstance(change_window, int) or change_window < 4 \
                or change_window % 2:
            raise ValueError(f"change_window must be an even integer >= 4, got {change_window!r}")
        if not (math.isfinite(change_threshold) and change_threshold > 0):
            raise ValueError(f"change_threshold must be a finite number > 0, got {change_threshold}")
        self.change_window = change_window
        self.change_threshold = float(change_threshold)
        super().__init__(thresholds, **kwargs)
        self._changes: list[int] = []  # the request (1-based) at which each change was detected

    def _extra_config(self) -> dict[str, Any]:
        return {"change_window": self.change_window, "change_threshold": self.change_threshold,
                "explore_every": self.explore_every}

    def select(self) -> Arm:
        """Every `explore_every`-th request since the last change: the highest arm, which observes every arm
        (side observations; without them the arms take turns), so that a change among arms the index no
        longer picks is seen too. Otherwise UCB's choice."""
        with self._lock:
            horizon = self._horizon
        if self.explore_every and horizon % self.explore_every == self.explore_every - 1:
            if self.side_observations:
                return self.arms[-1]
            return self.arms[(horizon // self.explore_every) % len(self.arms)]
        return super().select()

    @property
    def changes(self) -> list[int]:
        with self._lock:
            return list(self._changes)

    def _reset(self) -> None:
        arms = len(self.arms)
        self._sums = np.zeros(arms)
        self._squares = np.zeros(arms)
        self._counts = np.zeros(arms, dtype=np.int64)
        self._horizon = 0
        self._recent = np.full((arms, self.change_window), np.nan)  # per arm, its last rewards, oldest first

    def _add(self, rewards: np.ndarray) -> None:
        seen = ~np.isnan(rewards)
        self._recent[seen, :-1] = self._recent[seen, 1:]
        self._recent[seen, -1] = rewards[seen]
        if self._changed(seen):
            self._changes.append(self._rounds)
            self._reset()
            self._recent[seen, -1] = rewards[seen]
        self._horizon += 1
        self._sums[seen] += rewards[seen]
        self._squares[seen] += rewards[seen] ** 2
        self._counts += seen

    def _changed(self, seen: np.ndarray) -> bool:
        full = seen & ~np.isnan(self._recent[:, 0])
        if not full.any():
            return False
        half = self.change_window // 2
        older, newer = self._recent[full, :half], self._recent[full, half:]
        pooled = (older.var(axis=1, ddof=1) + newer.var(axis=1, ddof=1)) / 2
        spread = np.sqrt(np.maximum(pooled, self.min_std**2))
        shift = np.abs(newer.mean(axis=1) - older.mean(axis=1))
        return bool(np.any(shift > self.change_threshold * spread * math.sqrt(2 / half)))

    def _moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        return self._counts.astype(float), self._sums.copy(), self._squares.copy(), float(self._horizon)

    def _state(self) -> dict[str, Any]:
        recent = [[None if math.isnan(v) else v for v in row.tolist()] for row in self._recent]
        return {"sums": self._sums.tolist(), "squares": self._squares.tolist(), "counts": self._counts.tolist(),
                "horizon": self._horizon, "recent": recent, "changes": list(self._changes)}

    def _parse_state(self, state: Mapping[str, Any], rounds: int, observations: np.ndarray) -> dict[str, Any]:
        horizon = state.get("horizon")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or not 0 <= horizon <= rounds:
            raise SnapshotError(f"snapshot horizon is {horizon!r}")
        counts = _int_array(state, "counts", len(self.arms))
        if np.any(counts > horizon) or np.any(counts > observations):
            raise SnapshotError("snapshot counts exceed its horizon or its observations")
        sums = _float_array(state, "sums", len(self.arms))
        rows = state.get("recent")
        if not isinstance(rows, list) or len(rows) != len(self.arms):
            raise SnapshotError(f"snapshot recent must list {len(self.arms)} rows")
        recent = np.full((len(self.arms), self.change_window), np.nan)
        for arm, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != self.change_window:
                raise SnapshotError(f"snapshot recent rows must hold {self.change_window} rewards")
            known = [v is not None for v in row]
            if any(a and not b for a, b in pairwise(known)) or sum(known) > counts[arm]:
                raise SnapshotError("snapshot recent rows must end with at most their arm's count of rewards")
            if not all(v is None or self._is_reward(v) for v in row):
                raise SnapshotError(f"snapshot recent holds a value that is not a reward in [-{self._reward_bound:g}, 1]")
            recent[arm] = [np.nan if v is None else v for v in row]
        changes = state.get("changes")
        if not isinstance(changes, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 < c <= rounds for c in changes) \
                or any(b <= a for a, b in pairwise(changes)):
            raise SnapshotError("snapshot changes must be increasing request numbers up to its rounds")
        return {"_sums": sums, "_squares": _squares(state, sums, counts.astype(float), self._reward_bound),
                "_counts": counts,
                "_horizon": horizon, "_recent": recent, "_changes": list(changes)}


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (UCB1, SlidingWindowUCB, DiscountedUCB, ChangeDetectingUCB)
}


def make_policy(
    name: str,
    thresholds: Sequence[float] | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    gamma: float = DEFAULT_GAMMA,
    change_window: int = DEFAULT_CHANGE_WINDOW,
    change_threshold: float = DEFAULT_CHANGE_THRESHOLD,
    explore_every: int = DEFAULT_EXPLORE_EVERY,
    **options: Any,
) -> Policy:
    """Build policy `name` ("ucb1", "sw-ucb", "d-ucb" or "cd-ucb") over `thresholds` (default: `default_grid`).

    `options` are `Policy`'s keywords: exit_positions and num_layers (required), exit_offsets, calibrated, exploration,
    bonus, min_std, mu, side_observations, deferred_fill, context. `window` is used by sw-ucb only, `gamma` by d-ucb only, and
    `change_window`, `change_threshold` and `explore_every` by cd-ucb only.

    The default bonus is "variance" with c = DEFAULT_EXPLORATION = 1 (the module docstring and the constants
    say why). With `bonus="range"` the default c is RANGE_EXPLORATION = 0.2, far below UCB1's textbook
    sqrt(2), which assumes rewards spread over [0, 1]: the bonus should be about sqrt(2) times the reward's
    standard deviation, and a request's reward, a mean over its tokens, varies by 0.01-0.04 between requests
    in the simulator; 0.2 leaves a margin of several times that. On the first default checkpoint the spread is smaller
    still (0.003-0.023), which is what the variance index adapts to without a hand-set c.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    memory = {"sw-ucb": {"window": window}, "d-ucb": {"gamma": gamma},
              "cd-ucb": {"change_window": change_window, "change_threshold": change_threshold,
                         "explore_every": explore_every}}.get(name, {})
    grid = default_grid(options.get("calibrated")) if thresholds is None else thresholds
    return POLICIES[name](grid, **memory, **options)
