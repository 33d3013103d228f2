"""Seeded simulators to measure the policies' regret without a model or a GPU.

Three environments, all serving one request per step to a policy and reporting every arm's value on that
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
  is the pseudo-regret of the bandit literature. Fast, for the regret-shape tests. These runs use the range
  index (`bonus="range"`): a reward of known range [0, 1] is its case, and a variance estimated from a few
  0/1 rewards can be 0 (an arm that paid 0 twice would keep no bonus).
* `GaussianEnvironment`: arm i pays N(mean_i, std_i^2), independently of the other arms, with means and
  standard deviations that can switch between phases; the policy learns through `observe()` about the
  pulled arm and, with side observations, every lower one. Values are the means (pseudo-regret). With
  SHIPPED_MEANS / SHIPPED_STDS it mimics the small reward spread of the first default checkpoint, the case the
  variance index is for, and `small_spread_run` compares it there with the range index.

`run` drives a policy for a number of steps; `RunResult.regret()` is the cumulative regret against the
best fixed arm in hindsight (of the whole run, or of each phase) and `RunResult.detection_delay()` how long
after a change the new best arm became the most pulled one. `python -m bandit.simulate` prints the figures
quoted in BENCHMARKS.md.
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


class GaussianEnvironment:
    """Arm i pays N(means[i], stds[i]^2); `schedule` is (steps, means, stds) triples, the last persists."""

    def __init__(self, schedule: Sequence[tuple[int, Sequence[float], Sequence[float]]], seed: int) -> None:
        self.schedule = [(steps, (np.asarray(means, dtype=float), np.asarray(stds, dtype=float)))
                         for steps, means, stds in schedule]
        self.rng = np.random.default_rng(seed)

    def serve(self, step: int, arm: Arm, policy: Policy) -> np.ndarray:
        means, stds = _phase_at(self.schedule, step)
        draws = self.rng.normal(means, stds)
        # The pulled arm and every lower one, as a decode tells; observe() keeps the lower ones only with
        # side observations on.
        policy.observe(arm, {i: float(draws[i]) for i in range(arm.index + 1)})
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
BERNOULLI_INDEX = {"bonus": "range", "exploration": BERNOULLI_EXPLORATION}
"""The index of the Bernoulli runs: the range bonus, c for rewards in [0, 1] (module docstring)."""
SMALL_SPREAD_STD = 0.02
"""Standard deviation of every arm in the Gaussian change scenario: the spread of the first default
checkpoint's rewards."""
SMALL_SPREAD_SCALE = 0.1
"""The Gaussian change scenario's means are CHANGE_BEFORE / CHANGE_AFTER times this: gaps of 0.005-0.05."""
SHIPPED_MEANS = (-0.0414, -0.0444, -0.0459, -0.0472, -0.0485, -0.0500, -0.0513, -0.0537, -0.0567, -0.0613, -0.0669)
SHIPPED_STDS = (0.0093, 0.0103, 0.0110, 0.0121, 0.0134, 0.0151, 0.0161, 0.0173, 0.0189, 0.0220, 0.0230)
"""Mean and standard deviation of the per-request reward of thresholds 0.5, 0.55, ..., 0.95, 0.99 on the first
default checkpoint (commit 34c0470; mu 0.1): the first 250 requests (clean images) of
`capeen bench-drift --phase-length 250`, read off the full-depth traces. The gaps between arms (0.003-0.026)
are about the size of the spread."""
SHIPPED_FULL_DEPTH = -0.0967
"""Per-request reward of decoding at full depth on the same stream: F of bench-drift's % of gain."""
BENCH_WINDOW, BENCH_GAMMA = 125, 0.992
"""bench-drift's defaults for phases of 250 requests: half a phase, and gamma = 1 - 1 / window."""


def label_grid(arms: int) -> list[float]:
    """`arms` evenly spaced thresholds, for environments where a threshold is only an arm's label."""
    return [round(0.5 + 0.4 * i / max(arms - 1, 1), 6) for i in range(arms)]


def _layout_kwargs(layout: ExitLayout = PAPER_LAYOUT) -> dict[str, Any]:
    return {"exit_positions": layout.exit_positions, "num_layers": layout.num_layers}


def trace_regret(name: str, side_observations: bool, schedule: Sequence[tuple[int, Phase]], seed: int,
                 **options: Any) -> float:
    """Final regret of policy `name` on synthetic traces, per-phase best arm as yardstick.

    Default settings unless `options` (make_policy's keywords, e.g. bonus="range") say otherwise.
    """
    policy = make_policy(name, default_grid(0.8), side_observations=side_observations, **options,
                         **_layout_kwargs())
    phases = [steps for steps, _ in schedule]
    result = run(policy, TraceEnvironment(PAPER_LAYOUT, schedule, seed), sum(phases))
    return float(result.regret(phases)[-1])


def stationary_regret(policy_name: str, steps: int, seed: int) -> np.ndarray:
    """Regret curve of "ucb1" or "uniform" on the STATIONARY_MEANS Bernoulli arms."""
    grid = label_grid(len(STATIONARY_MEANS))
    if policy_name == "uniform":
        policy: Policy = UniformRandom(grid, seed=seed, **_layout_kwargs())
    else:
        policy = make_policy(policy_name, grid, **BERNOULLI_INDEX, **_layout_kwargs())
    return run(policy, BernoulliEnvironment([(steps, STATIONARY_MEANS)], seed), steps).regret()


def change_delay(name: str, change: int, after: int, seed: int, window: int, gamma: float,
                 gaussian: bool = False, **options: Any) -> int:
    """Steps until policy `name` makes the new best arm of CHANGE_AFTER its most pulled; `after` if never.

    Bernoulli arms with the range index, or with `gaussian` the small-spread Gaussian arms (means scaled by
    SMALL_SPREAD_SCALE, std SMALL_SPREAD_STD) with the default (variance) index and side observations.
    `options` go to `make_policy` (e.g. cd-ucb's explore_every).
    """
    grid, memory = label_grid(len(CHANGE_BEFORE)), {"window": window, "gamma": gamma, **options}
    if gaussian:
        policy = make_policy(name, grid, **memory, **_layout_kwargs())
        stds = [SMALL_SPREAD_STD] * len(CHANGE_BEFORE)
        before, after_means = (np.multiply(SMALL_SPREAD_SCALE, m) for m in (CHANGE_BEFORE, CHANGE_AFTER))
        environment: Environment = GaussianEnvironment([(change, before, stds), (after, after_means, stds)], seed)
    else:
        policy = make_policy(name, grid, **memory, **BERNOULLI_INDEX, **_layout_kwargs())
        environment = BernoulliEnvironment([(change, CHANGE_BEFORE), (after, CHANGE_AFTER)], seed)
    delay = run(policy, environment, change + after).detection_delay(change, int(np.argmax(CHANGE_AFTER)))
    return after if delay is None else delay


def small_spread_run(name: str, steps: int, seed: int, **options: Any) -> RunResult:
    """Policy `name` ("uniform" too) on SHIPPED_MEANS / SHIPPED_STDS Gaussian arms, side observations on.

    `options` go to `make_policy` (bonus, exploration, min_std, ...); window and gamma default to
    bench-drift's BENCH_WINDOW and BENCH_GAMMA.
    """
    grid = default_grid()
    if name == "uniform":
        policy: Policy = UniformRandom(grid, seed=seed, **_layout_kwargs())
    else:
        options = {"window": BENCH_WINDOW, "gamma": BENCH_GAMMA, **options}
        policy = make_policy(name, grid, **options, **_layout_kwargs())
    return run(policy, GaussianEnvironment([(steps, SHIPPED_MEANS, SHIPPED_STDS)], seed), steps)


def gain_share(result: RunResult) -> float:
    """bench-drift's % of gain on SHIPPED arms: 100 (R - F) / (B - F), F the full-depth reward."""
    steps = len(result.choices)
    best, full = max(SHIPPED_MEANS) * steps, SHIPPED_FULL_DEPTH * steps
    return float(100.0 * (best - result.regret()[-1] - full) / (best - full))


def main() -> None:
    """Print the figures quoted in the README: the test scenarios, more seeds (about two minutes)."""
    seeds = range(5)
    print("Trace simulator, UCB1 (default index), regret against the best arm of each phase:")
    for label, schedule in (("clean, 5000 requests", [(5000, CLEAN)]), ("noisy, 5000 requests", [(5000, NOISY)]),
                            ("clean>noisy>blurred>clean, 4 x 2500", drifting_schedule(2500))):
        on = [trace_regret("ucb1", True, schedule, seed) for seed in seeds]
        off = [trace_regret("ucb1", False, schedule, seed) for seed in seeds]
        print(f"  {label:36s} side observations on {np.mean(on):6.1f}   off {np.mean(off):6.1f}")
    indexes = {"variance": {}, "range": {"bonus": "range"}}  # each with its default c and min_std
    print("Drifting traces (4 x 2500), side observations on, per policy (default window / gamma), regret:")
    for label, options in indexes.items():
        for name in POLICIES:
            values = [trace_regret(name, True, drifting_schedule(2500), seed, **options) for seed in seeds]
            print(f"  {label:8s} index  {name:6s} {np.mean(values):6.1f}  (seeds: {np.round(values, 1).tolist()})")
    print(f"Bernoulli arms {list(STATIONARY_MEANS)}, range index, c = {BERNOULLI_EXPLORATION:.3f}:")
    for name in ("ucb1", "uniform"):
        curve = np.mean([stationary_regret(name, 10_000, seed) for seed in seeds], axis=0)
        print(f"  {name:7s} R(1000) {curve[999]:7.1f}  R(5000) {curve[4999]:7.1f}  R(10000) {curve[9999]:7.1f}")
    print(f"Bernoulli {list(CHANGE_BEFORE)} -> {list(CHANGE_AFTER)} after 5000 steps, range index; window 500, "
          "gamma 0.998:")
    for name in POLICIES:
        delays = [change_delay(name, 5000, 3000, seed, window=500, gamma=0.998) for seed in seeds]
        print(f"  {name:6s} steps until the new best arm leads the last 200 pulls: {delays}")
    print(f"The same means x {SMALL_SPREAD_SCALE:g} as Gaussian arms (std {SMALL_SPREAD_STD:g}), variance index, "
          "side observations on:")
    for name in POLICIES:
        delays = [change_delay(name, 5000, 3000, seed, window=500, gamma=0.998, gaussian=True) for seed in seeds]
        print(f"  {name:6s} steps until the new best arm leads the last 200 pulls: {delays}")
    for every in (20, 50):
        delays = [change_delay("cd-ucb", 5000, 3000, seed, window=500, gamma=0.998, gaussian=True,
                               explore_every=every) for seed in seeds]
        print(f"  cd-ucb, forced exploration 1 in {every}: {delays}")
    print("Small reward spread: Gaussian arms with the first default checkpoint's per-request means and spreads "
          "(SHIPPED_*):")
    for name in ("ucb1", "uniform"):
        curve = np.mean([small_spread_run(name, 10_000, seed).regret() for seed in seeds], axis=0)
        label = "ucb1, variance index" if name == "ucb1" else name
        print(f"  {label:20s}  R(1000) {curve[999]:6.2f}  R(5000) {curve[4999]:6.2f}  R(10000) {curve[9999]:6.2f}")
    print(f"  1000 requests, window {BENCH_WINDOW}, gamma {BENCH_GAMMA} (bench-drift's), regret and % of gain "
          "(bench-drift's measure):")
    for label, options in indexes.items():
        for name in POLICIES:
            results = [small_spread_run(name, 1000, seed, **options) for seed in seeds]
            regret = np.mean([r.regret()[-1] for r in results])
            gain = [gain_share(r) for r in results]
            print(f"  {label:8s} index  {name:6s} regret {regret:5.2f}  % of gain {np.mean(gain):5.1f} "
                  f"(min {np.min(gain):5.1f})")


if __name__ == "__main__":
    main()
