"""GET /v1/adapters: the LoRA adapters and few-step presets this deployment serves (app/adapters.py)."""

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app import adapters
from app import openapi as oas
from app.deps import PrincipalDep, SettingsDep
from app.schemas import AdapterList

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=oas.V1)


@router.get(
    "",
    operation_id="list_adapters",
    response_model=AdapterList,
    response_model_exclude_none=True,
    responses={200: oas.success("Adapters (name, base, file sha256 and size, scale range), then presets (their "
                                "adapter, scheduler, steps and guidance)")},
    summary="The LoRA adapters (`loras`) and few-step presets (`preset`) a request may name",
)
async def list_adapters(settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    # a thread: the first listing after a file changed hashes it
    return {"data": await run_in_threadpool(adapters.listing, settings), "max_loras": settings.max_loras}
