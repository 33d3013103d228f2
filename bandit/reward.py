"""Label-free reward of one decode, and of every threshold the decode's trace can speak for.

A token that leaves the decoder at exit i earns

    r = C_i - C_1 - mu * p_i / L

    C_i   confidence (max softmax probability) at the exit the token left at
    C_1   confidence at the first exit: the cheapest answer the model could have given
    p_i   the decoder layers computed for the token, so p_i / L is the fraction of the decoder computed
          (the final layer, p = L, costs 1): the 1-based layer of its exit, and, when the skipped layers'
          keys and values are filled later (kv_fill="deferred", `ExitLayout.deferred_fill`), the layers it
          skipped that a later, deeper token made the decoder compute: p_i = max(its exit, the deepest exit
          of the tokens after it)
    L     num_layers, the decoder's depth
    mu    the price of running the whole decoder, in units of confidence

and a request earns the mean of r over its T tokens, R = (1/T) * sum_t r_t.

Deferred fill's catch-up follows from the exit layers alone, so every arm's is known from its own exits, and a
side observation charges it as the decoder would have (`layers_computed`).

Why this reward: C_i - C_1 is the confidence the extra layers bought over exiting at once, and it needs no
reference caption, so it is known the moment the decode ends. The cost term converts compute into the
same unit: with mu = 0.1 running all L layers pays only if it lifts a token's confidence by more than 0.1
over the first exit, i.e. each layer must buy more than mu / L (0.0083 for L = 12). A larger mu pushes the
bandit to lower thresholds (faster, less sure captions); mu = 0 makes deeper always look better.

Side observations: the trace holds the confidence at every exit the decode evaluated, so the reward of
another threshold is known exactly whenever that threshold would have stopped every token at an exit the
decode evaluated: a lower threshold always, a higher one only if each token either ran to the final layer
or met the higher threshold at the very exit it left at. `arm_rewards` reports every reward the trace
determines; the policies learn only from the lower thresholds' (policies.py says why). One caveat: tokens
after the first are those the pulled threshold generated; another threshold could have produced a
different prefix, so its side reward is the reward of its exit rule on these hidden states, not of its
own decode.

Per-exit offsets: a calibrated engine may add an offset o_k to the threshold at exit k (a schedule of
per-exit thresholds). A threshold t then stops a token at the first exit k with C_k >= t + o_k; the layout
carries the offsets so that the side observations follow the same rule as the decoder.

A trace is any object with attributes `exit_confidences` (per token, the confidences of the exits
evaluated, in order; the last is the exit the token left at) and `exit_layers` (per token, the 1-based
layer it left at), or a mapping with those two keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

DEFAULT_MU = 0.1
"""Compute price: the full decoder is worth 0.1 confidence (see the module docstring)."""
MAX_MU = 100.0  # beyond it every reward is the price alone, and far beyond, rewards overflow

# Stands in for exits a token never reached. It exceeds every threshold (thresholds lie in [0, 1]), so the
# first exit meeting a threshold is found among the evaluated exits or lands on a padded one (= unknown).
_NOT_EVALUATED = 2.0


class TraceLike(Protocol):
    """What the bandit reads from a decode trace (the engine's trace object satisfies it)."""

    exit_confidences: Sequence[Sequence[float]]
    exit_layers: Sequence[int]


@dataclass(frozen=True)
class ExitLayout:
    """Where the decoder can exit: `exit_positions` are 1-based layers, the last one is `num_layers`.

    `offsets`, one per exit position, are what the decoder adds to a threshold at each exit (empty: none;
    the final layer's is ignored, since every token that reaches it leaves there).
    """

    exit_positions: tuple[int, ...]
    num_layers: int
    offsets: tuple[float, ...] = ()
    deferred_fill: bool = False  # the decoder computes skipped layers later (kv_fill="deferred"): charge them

    def __post_init__(self) -> None:
        positions = self.exit_positions
        if not positions:
            raise ValueError("exit_positions is empty; it must at least hold the final layer")
        if any(not isinstance(p, (int, np.integer)) or isinstance(p, bool) for p in positions):
            raise ValueError(f"exit_positions must be integers, got {positions!r}")
        if positions[0] < 1 or any(b <= a for a, b in zip(positions, positions[1:])):
            raise ValueError(f"exit_positions must be strictly increasing 1-based layers, got {positions!r}")
        if positions[-1] != self.num_layers:
            raise ValueError(
                f"the last exit position must be the final layer {self.num_layers}, got {positions[-1]}"
            )
        if self.offsets:
            if len(self.offsets) != len(positions):
                raise ValueError(f"got {len(self.offsets)} offsets for {len(positions)} exit positions")
            if not all(np.isfinite(o) for o in self.offsets):
                raise ValueError(f"offsets must be finite numbers, got {self.offsets!r}")

    def offset_array(self) -> np.ndarray:
        """The offsets as an array, zeros when there are none and at the final layer."""
        offsets = np.zeros(len(self.exit_positions))
        if self.offsets:
            offsets[:-1] = self.offsets[:-1]
        return offsets


def layers_computed(exit_layers: np.ndarray, deferred_fill: bool) -> np.ndarray:
    """Decoder layers computed for each token (axis 0: tokens in order; further axes: arms).

    With deferred fill, a token that left at layer e is caught up, when a later token runs deeper, to that
    token's depth, since the deeper token attends to its keys and values there: the token's layers are the
    deepest exit of itself and every token after it. Without it (propagate), skipped layers are copied, not
    computed."""
    exit_layers = np.asarray(exit_layers)
    if not deferred_fill:
        return exit_layers
    return np.maximum.accumulate(exit_layers[::-1], axis=0)[::-1]  # the deepest exit from each token on


def _confidence_matrix(trace: TraceLike | Mapping[str, Any], layout: ExitLayout) -> tuple[np.ndarray, np.ndarray]:
    """The trace as a (tokens x exits) matrix padded with `_NOT_EVALUATED`, and each token's exit count.

    Raises ValueError on a trace that does not fit the layout, so a bad engine/bandit pairing is loud.
    """
    if isinstance(trace, Mapping):
        try:
            confidences, layers = trace["exit_confidences"], trace["exit_layers"]
        except KeyError as exc:
            raise ValueError(f"trace mapping lacks key {exc}") from None
    else:
        try:
            confidences, layers = trace.exit_confidences, trace.exit_layers
        except AttributeError as exc:
            raise ValueError(f"trace object lacks an attribute: {exc}") from None
    if len(confidences) != len(layers):
        raise ValueError(f"trace has {len(confidences)} confidence lists but {len(layers)} exit layers")
    if len(confidences) == 0:
        raise ValueError("trace has no tokens; a request's reward is a mean over its tokens")
    positions = layout.exit_positions
    matrix = np.full((len(confidences), len(positions)), _NOT_EVALUATED)
    lengths = np.empty(len(confidences), dtype=np.int64)
    for t, (token, layer) in enumerate(zip(confidences, layers)):
        m = len(token)
        if not 1 <= m <= len(positions):
            raise ValueError(f"token {t} has {m} confidences; the layout has {len(positions)} exits")
        if layer != positions[m - 1]:
            raise ValueError(
                f"token {t} left at layer {layer}, but its {m} confidences end at exit layer {positions[m - 1]}"
            )
        matrix[t, :m] = token
        lengths[t] = m
    evaluated = matrix[matrix != _NOT_EVALUATED]
    if not np.all(np.isfinite(evaluated)) or evaluated.min() < 0.0 or evaluated.max() > 1.0:
        raise ValueError("trace confidences must be probabilities in [0, 1]")
    return matrix, lengths


def request_reward(trace: TraceLike | Mapping[str, Any], layout: ExitLayout, mu: float = DEFAULT_MU) -> float:
    """The reward R the decode in `trace` earned, as it actually happened."""
    matrix, lengths = _confidence_matrix(trace, layout)
    rows = np.arange(len(lengths))
    left_at = lengths - 1
    cost = layers_computed(np.asarray(layout.exit_positions)[left_at], layout.deferred_fill) / layout.num_layers
    return float(np.mean(matrix[rows, left_at] - matrix[:, 0] - mu * cost))


def arm_rewards(
    trace: TraceLike | Mapping[str, Any],
    layout: ExitLayout,
    thresholds: np.ndarray,
    mu: float = DEFAULT_MU,
) -> np.ndarray:
    """The reward each threshold would have earned on this trace; NaN where the trace cannot tell.

    Work is one vectorised pass of tokens x thresholds x exits; exits are a constant of the model.
    """
    matrix, lengths = _confidence_matrix(trace, layout)
    num_exits = len(layout.exit_positions)
    # A token stops at the first exit whose confidence reaches the threshold: the number of exits before
    # it is the number of leading entries whose running maximum is still below the threshold.
    # With offsets, "reaches t + o_k" is "C_k - o_k reaches t"; padding stays above every threshold.
    adjusted = np.where(matrix == _NOT_EVALUATED, _NOT_EVALUATED, matrix - layout.offset_array()[None, :])
    running_max = np.maximum.accumulate(adjusted, axis=1)
    first = (running_max[:, None, :] < thresholds[None, :, None]).sum(axis=2)  # tokens x arms
    # Known if it stops at an evaluated exit, or if the token ran to the final layer (no threshold can
    # then take it further). Tokens that miss every exit leave at the final layer.
    known = (first < lengths[:, None]) | (lengths[:, None] == num_exits)
    exit_index = np.minimum(first, num_exits - 1)
    rows = np.arange(len(lengths))[:, None]
    cost = layers_computed(np.asarray(layout.exit_positions)[exit_index], layout.deferred_fill) / layout.num_layers
    per_token = matrix[rows, exit_index] - matrix[:, :1] - mu * cost
    return np.where(known.all(axis=0), per_token.mean(axis=0), np.nan)
