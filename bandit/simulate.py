"""Seeded simulators to measure the policies' regret without a model or a GPU.

Two environments, both serving one request per step to a policy and reporting every arm's value on that
request (the truth regret is measured against):

* `TraceEnvironment`: synthetic decode traces. Each token has a difficulty d ~ Beta(a, b); its confidence
  at layer p rises toward a ceiling 1 - drop * d as `ceiling - (ceiling - 0.1) * exp(-rise * (1 - d/2) * p / L)`
  plus Gaussian jitter, clipped to [0, 1]. Phases (CLEAN -> NOISY -> BLURRED -> CLEAN) move the
  best threshold (0.95, 0.8, 0.55 with mu = 0.1 and the default grid). The policy gets the trace its
  threshold would produce and learns through `update()`, side observations included; the values are every
  threshold's reward on the same token confidences. The simulator assumes a token's confidences do not
  depend on the threshold, which makes side observations exact here (in a real decode they are exact for
  the first token only; see reward.py).
* `BernoulliEnvironment`: each arm pays 1 with a fixed probability that can switch between phases; the
  policy learns through `observe()` about the pulled arm only. Values are the expected rewards, so regret
  is the pseudo-regret of the bandit literature. Fast, for the regret-shape tests.

`run` drives a policy for a number of steps; `RunResult.regret()` is the cumulative regret against the
best fixed arm in hindsight (of the whole run, or of each phase) and `RunResult.detection_delay()` how long after a change the new best arm
became the most pulled one. `python -m bandit.simulate` prints the figures quoted in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bandit.policies import POLICIES, UCB1, Arm, Policy, default_grid, make_policy
from bandit.reward import ExitLayout, arm_rewards


@dataclass(frozen=True)
class Phase:
    """One stretch of traffic: how hard its tokens are and how their confidence evolves with depth."""

    name: str
    difficulty: tuple[float, float]  # Beta(a, b) of per-token difficulty d in [0, 1]
    drop: float  # ceiling of the hardest token (d = 1) is 1 - drop
    rise: float  # how fast confidence approaches its ceiling, per decoder depth
    noise: float  # standard deviation of the per-exit jitter
    tokens: tuple[int, int] = (8, 16)  # caption length range [low, high)


CLEAN = Phase("clean", difficulty=(2.0, 8.0), drop=0.2, rise=7.0, noise=0.02)
NOISY = Phase("noisy", difficulty=(3.0, 3.0), drop=0.45, rise=6.0, noise=0.08)
BLURRED = Phase("blurred", difficulty=(6.0, 2.0), drop=0.55, rise=14.0, noise=0.03)


def drifting_schedule(steps_per_phase: int) -> list[tuple[int, Phase]]:
    """clean -> noisy -> blurred -> clean, `steps_per_phase` requests each."""
    return [(steps_per_phase, phase) for phase in (CLEAN, NOISY, BLURRED, CLEAN)]


def token_confidences(rng: np.random.Generator, phase: Phase, layout: ExitLayout) -> np.ndarray:
    """(tokens x exits) confidences of one request, at every exit."""
    n_tokens = int(rng.integers(*phase.tokens))
    difficulty = rng.beta(*phase.difficulty, size=(n_tokens, 1))
    depth = np.asarray(layout.exit_positions) / layout.num_layers
    ceiling = 1.0 - phase.drop * difficulty
    confidence = ceiling - (ceiling - 0.1) * np.exp(-phase.rise * (1.0 - 0.5 * difficulty) * depth)
    return np.clip(confidence + rng.normal(0.0, phase.noise, size=confidence.shape), 0.0, 1.0)


def decode_trace(confidences: np.ndarray, layout: ExitLayout, threshold: float) -> dict[str, list]:
    """The trace an engine would report decoding these tokens with `threshold` (the dict form)."""
    exit_confidences, exit_layers = [], []
    for token in confidences:
        hits = np.flatnonzero(token >= threshold)
        stop = int(hits[0]) if hits.size else len(token) - 1
        exit_confidences.append(token[: stop + 1].tolist())
        exit_layers.append(layout.exit_positions[stop])
    return {"exit_confidences": exit_confidences, "exit_layers": exit_layers}


class Environment(Protocol):
    """Serves request `step` with `arm`, feeds the outcome to `policy`, returns every arm's value."""

    def serve(self, step: int, arm: Arm, policy: Policy) -> np.ndarray: ...


def _phase_at(schedule: Sequence[tuple[int, Any]], step: int) -> Any:
    for length, phase in schedule:
        if step < length:
            return phase
        step -= length
    return schedule[-1][1]


class TraceEnvironment:
    """Synthetic decode traces following `schedule` ((steps, Phase) pairs; the last phase persists)."""

    def __init__(self, layout: ExitLayout, schedule: Sequence[tuple[int, Phase]], seed: int) -> None:
        self.layout = layout
        self.schedule = list(schedule)
        self.rng = np.random.default_rng(seed)

    def serve(self, step: int, arm: Arm, policy: Policy) -> np.ndarray:
        confidences = token_confidences(self.rng, _phase_at(self.schedule, step), self.layout)
        policy.update(arm, decode_trace(confidences, self.layout, arm.threshold))
        # Every token ran to the final layer in this trace, so every threshold's reward is known.
        full = decode_trace(confidences, self.layout, np.inf)
        return arm_rewards(full, self.layout, np.asarray(policy.thresholds), policy.mu)


class BernoulliEnvironment:
    """Arm i pays 1 with probability means[i]; `schedule` is (steps, means) pairs, the last persists."""

    def __init__(self, schedule: Sequence[tuple[int, Sequence[float]]], seed: int) -> None:
        self.schedule = [(steps, np.asarray(means, dtype=float)) for steps, means in schedule]
        self.rng = np.random.default_rng(seed)

    def serve(self, step: int, arm: Arm, policy: Policy) -> np.ndarray:
        means = _phase_at(self.schedule, step)
        policy.observe(arm, {arm.index: float(self.rng.random() < means[arm.index])})
        return means


class UniformRandom(UCB1):
    """Baseline that pulls arms uniformly at random (it keeps UCB1's statistics, never uses them)."""

    name = "uniform"

    def __init__(self, thresholds: Sequence[float], *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(thresholds, **kwargs)
        self._rng = np.random.default_rng(seed)

    def select(self) -> Arm:
        with self._lock:
            return self.arms[int(self._rng.integers(len(self.arms)))]


@dataclass(frozen=True)
class RunResult:
    """Which arm each step pulled and every arm's value at that step."""

    choices: np.ndarray  # (steps,) arm indices
    values: np.ndarray  # (steps, arms)

    def regret(self, phases: Sequence[int] | None = None) -> np.ndarray:
        """Cumulative regret after each step against the best fixed arm in hindsight.

        With `phases` (consecutive phase lengths) the best arm is taken per phase: the regret against an
        oracle that knows when the traffic changed, the yardstick for the drifting policies.
        """
        pulled = self.values[np.arange(len(self.choices)), self.choices]
        best = np.empty_like(pulled)
        start = 0
        for length in phases or [len(self.choices)]:
            segment = self.values[start : start + length]
            best[start : start + length] = segment[:, int(np.argmax(segment.sum(axis=0)))]
            start += length
        return np.cumsum(best - pulled)

    def detection_delay(self, change: int, new_best: int, window: int = 200) -> int | None:
        """Steps after `change` until `new_best` is the most pulled arm of the trailing `window` steps.

        Ties count against it; None if it never is.
        """
        counts = np.zeros(self.values.shape[1], dtype=np.int64)
        for step, arm in enumerate(self.choices):
            counts[arm] += 1
            if step >= window:
                counts[self.choices[step - window]] -= 1
            if step >= change and counts[new_best] > np.delete(counts, new_best).max():
                return step - change
        return None


def run(policy: Policy, environment: Environment, steps: int) -> RunResult:
    """Let `policy` serve `steps` requests from `environment`."""
    choices = np.empty(steps, dtype=np.int64)
    values = []
    for step in range(steps):
        arm = policy.select()
        choices[step] = arm.index
        values.append(environment.serve(step, arm, policy))
    return RunResult(choices, np.array(values))


# --- the experiments behind the tests and the README figures -------------------------------------------

PAPER_LAYOUT = ExitLayout(tuple(range(1, 13)), 12)
"""Exits after every decoder layer of the 12-layer decoder (the final layer included)."""
STATIONARY_MEANS = (0.2, 0.4, 0.5, 0.6, 0.7)
CHANGE_BEFORE = (0.7, 0.5, 0.4, 0.3, 0.2)
CHANGE_AFTER = (0.65, 0.5, 0.4, 0.8, 0.2)  # arm 3 becomes best; the old best stays second
BERNOULLI_EXPLORATION = 2**-0.5  # sqrt(2) * 0.5, the sub-Gaussian scale of a Bernoulli reward


def label_grid(arms: int) -> list[float]:
    """`arms` evenly spaced thresholds, for environments where a threshold is only an arm's label."""
    return [round(0.5 + 0.4 * i / max(arms - 1, 1), 6) for i in range(arms)]


def _layout_kwargs(layout: ExitLayout = PAPER_LAYOUT) -> dict[str, Any]:
    return {"exit_positions": layout.exit_positions, "num_layers": layout.num_layers}


def trace_regret(name: str, side_observations: bool, schedule: Sequence[tuple[int, Phase]], seed: int) -> float:
    """Final regret of policy `name` (default settings) on synthetic traces, per-phase best arm as yardstick."""
    policy = make_policy(name, default_grid(0.8), side_observations=side_observations, **_layout_kwargs())
    phases = [steps for steps, _ in schedule]
    result = run(policy, TraceEnvironment(PAPER_LAYOUT, schedule, seed), sum(phases))
    return float(result.regret(phases)[-1])


def stationary_regret(policy_name: str, steps: int, seed: int) -> np.ndarray:
    """Regret curve of "ucb1" or "uniform" on the STATIONARY_MEANS Bernoulli arms."""
    grid = label_grid(len(STATIONARY_MEANS))
    if policy_name == "uniform":
        policy: Policy = UniformRandom(grid, seed=seed, **_layout_kwargs())
    else:
        policy = make_policy(policy_name, grid, exploration=BERNOULLI_EXPLORATION, **_layout_kwargs())
    return run(policy, BernoulliEnvironment([(steps, STATIONARY_MEANS)], seed), steps).regret()


def change_delay(name: str, change: int, after: int, seed: int, window: int, gamma: float) -> int:
    """Steps until policy `name` makes the new best arm of CHANGE_AFTER its most pulled; `after` if never."""
    policy = make_policy(
        name, label_grid(len(CHANGE_BEFORE)), exploration=BERNOULLI_EXPLORATION, window=window, gamma=gamma,
        **_layout_kwargs(),
    )
    environment = BernoulliEnvironment([(change, CHANGE_BEFORE), (after, CHANGE_AFTER)], seed)
    delay = run(policy, environment, change + after).detection_delay(change, int(np.argmax(CHANGE_AFTER)))
    return after if delay is None else delay


def main() -> None:
    """Print the figures quoted in the README: the test scenarios, more seeds (about a minute)."""
    seeds = range(5)
    print("Trace simulator, UCB1 (default c, mu), regret against the best arm of each phase:")
    for label, schedule in (("clean, 5000 requests", [(5000, CLEAN)]), ("noisy, 5000 requests", [(5000, NOISY)]),
                            ("clean>noisy>blurred>clean, 4 x 2500", drifting_schedule(2500))):
        on = [trace_regret("ucb1", True, schedule, seed) for seed in seeds]
        off = [trace_regret("ucb1", False, schedule, seed) for seed in seeds]
        print(f"  {label:36s} side observations on {np.mean(on):6.1f}   off {np.mean(off):6.1f}")
    print("Drifting traces, side observations on, per policy (default window / gamma):")
    for name in POLICIES:
        values = [trace_regret(name, True, drifting_schedule(2500), seed) for seed in seeds]
        print(f"  {name:6s} regret {np.mean(values):6.1f}  (seeds: {np.round(values, 1).tolist()})")
    print(f"Bernoulli arms {list(STATIONARY_MEANS)}, c = {BERNOULLI_EXPLORATION:.3f}:")
    for name in ("ucb1", "uniform"):
        curve = np.mean([stationary_regret(name, 10_000, seed) for seed in seeds], axis=0)
        print(f"  {name:7s} R(1000) {curve[999]:7.1f}  R(5000) {curve[4999]:7.1f}  R(10000) {curve[9999]:7.1f}")
    print(f"Bernoulli {list(CHANGE_BEFORE)} -> {list(CHANGE_AFTER)} after 5000 steps; window 500, gamma 0.998:")
    for name in POLICIES:
        delays = [change_delay(name, 5000, 3000, seed, window=500, gamma=0.998) for seed in seeds]
        print(f"  {name:6s} steps until the new best arm leads the last 200 pulls: {delays}")


if __name__ == "__main__":
    main()
