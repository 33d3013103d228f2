"""FastAPI dependencies: the runtime (503 until it is ready) and the admin token check.

All are `async def`: FastAPI would run plain functions in a worker thread, a hop per request for nothing.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError
from service.runtime import Runtime
from service.settings import Settings

RETRY_AFTER = {"Retry-After": "1"}


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is not None and runtime.batcher.closing:
        raise ServiceError(503, "shutting_down", "the service is shutting down: it finishes the requests it has "
                           "queued and takes no new ones", headers=RETRY_AFTER)
    if runtime is None:
        raise ServiceError(503, "not_ready", "the model is not loaded and warmed yet", headers=RETRY_AFTER)
    if not runtime.ready:  # a batch worker has stopped
        raise ServiceError(503, "not_ready", "the service cannot caption now", headers=RETRY_AFTER)
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_bearer = HTTPBearer(auto_error=False, description="CAPEEN_ADMIN_TOKEN, when the service has one")


async def require_admin(settings: SettingsDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """No check without CAPEEN_ADMIN_TOKEN; with it, 401 without a bearer token and 403 for a wrong one."""
    if settings.admin_token is None:
        return
    if credentials is None:
        raise ServiceError(401, "unauthorized", "this route needs the header Authorization: Bearer <admin token>",
                           headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(), settings.admin_token.get_secret_value().encode()):
        raise ServiceError(403, "forbidden", "the admin token is wrong")

