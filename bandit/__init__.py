"""A-CAPEEN's online choice of the early-exit threshold: a UCB bandit whose reward needs no labels.

The service calls `select()` before decoding a request and `update(arm, trace)` after it. Each arm is a
confidence threshold; a token that leaves the decoder at exit i earns

    r = C_i - C_1 - mu * p_i / L

where C_i is the confidence (max softmax probability) at the exit the token left at, C_1 the confidence
at the first exit, p_i the decoder layers computed for the token (the 1-based layer of its exit; with deferred
kv fill, the deepest exit of it and the tokens after it, which catch its skipped layers up), L the number of
decoder layers and mu the price
of running the whole decoder in units of confidence (default 0.1). A request earns the mean of r over
its tokens. reward.py explains the choice; policies.py the UCB1, sliding-window, discounted and
change-detecting policies and their index, whose exploration bonus scales with each arm's estimated reward variance;
store.py the crash-safe snapshot; simulate.py the synthetic traffic used to measure regret.

Pure Python and numpy: importing this package never imports torch or a web framework.
"""

from bandit.policies import (
    BONUSES,
    DEFAULT_BONUS,
    DEFAULT_CHANGE_THRESHOLD,
    DEFAULT_CHANGE_WINDOW,
    DEFAULT_EXPLORATION,
    DEFAULT_EXPLORE_EVERY,
    DEFAULT_GAMMA,
    DEFAULT_MIN_STD,
    DEFAULT_WINDOW,
    POLICIES,
    RANGE_EXPLORATION,
    UCB1,
    Arm,
    ChangeDetectingUCB,
    DiscountedUCB,
    Policy,
    SlidingWindowUCB,
    default_exploration,
    default_grid,
    parse_grid,
    make_policy,
)
from bandit.reward import DEFAULT_MU, MAX_MU, ExitLayout, TraceLike, arm_rewards, layers_computed, request_reward
from bandit.store import LoadResult, SnapshotError, load_or_new, write_json_atomic

__all__ = [
    "BONUSES",
    "DEFAULT_BONUS",
    "DEFAULT_CHANGE_THRESHOLD",
    "DEFAULT_CHANGE_WINDOW",
    "DEFAULT_EXPLORATION",
    "DEFAULT_EXPLORE_EVERY",
    "DEFAULT_GAMMA",
    "DEFAULT_MIN_STD",
    "DEFAULT_MU",
    "MAX_MU",
    "DEFAULT_WINDOW",
    "POLICIES",
    "RANGE_EXPLORATION",
    "UCB1",
    "Arm",
    "ChangeDetectingUCB",
    "DiscountedUCB",
    "ExitLayout",
    "LoadResult",
    "Policy",
    "SlidingWindowUCB",
    "SnapshotError",
    "TraceLike",
    "arm_rewards",
    "default_exploration",
    "layers_computed",
    "default_grid",
    "parse_grid",
    "load_or_new",
    "make_policy",
    "request_reward",
    "write_json_atomic",
]
