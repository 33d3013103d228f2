"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.dependencies import RuntimeDep
from service.errors import error_responses
from service.schemas import Status

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status, summary="the process is alive (answers while the model loads too)")
async def healthz() -> Status:
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=error_responses(503),
            summary="the model is loaded and warmed and requests are taken (503 before, and while shutting down)")
async def readyz(runtime: RuntimeDep) -> Status:
    return Status(status="ready")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
