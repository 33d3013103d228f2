"""What model is being served."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import RuntimeDep
from service.errors import error_responses
from service.schemas import ModelInfo

router = APIRouter(tags=["model"])


@router.get("/v1/model", response_model=ModelInfo, responses=error_responses(503),
            summary="layers, exits, calibrated threshold, device, dtype and vocabulary of the loaded model")
async def model(runtime: RuntimeDep) -> ModelInfo:
    return ModelInfo.model_validate(runtime.describe_model())
