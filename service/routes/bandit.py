"""The A-CAPEEN bandit: what it has learnt, and a reset for operators."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends

from service.adaptive import AdaptiveThreshold
from service.dependencies import RuntimeDep, require_admin
from service.errors import error_responses
from service.schemas import ArmStats, BanditState

router = APIRouter(prefix="/v1/bandit", tags=["bandit"])
log = logging.getLogger(__name__)


def _state(bandit: AdaptiveThreshold) -> BanditState:
    policy = bandit.policy
    arms = [ArmStats(arm=index, **stats) for index, stats in enumerate(policy.stats())]
    return BanditState(policy=policy.name, rounds=policy.rounds, arms=arms, best=arms[policy.best().index])


@router.get("", response_model=BanditState, responses=error_responses(503),
            summary="the policy, every arm's threshold, pulls and mean reward, and the best arm")
async def bandit(runtime: RuntimeDep) -> BanditState:
    return _state(runtime.bandit)


@router.post("/reset", response_model=BanditState, responses=error_responses(401, 403, 503),
             dependencies=[Depends(require_admin)],
             summary="forget everything learnt (needs Authorization: Bearer <CAPEEN_ADMIN_TOKEN> when it is set)")
async def reset(runtime: RuntimeDep) -> BanditState:
    runtime.bandit.reset()
    try:  # at once: after a crash, the state an operator threw away must not come back from the old snapshot
        await asyncio.to_thread(runtime.bandit.save)
    except OSError as exc:
        log.error("could not write the bandit snapshot %s after the reset: %s", runtime.bandit.state_path, exc)
    return _state(runtime.bandit)
