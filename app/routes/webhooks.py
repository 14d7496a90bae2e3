"""GET /v1/generations/{id}/webhooks: every delivery attempt of the generation's webhooks."""

import json
from typing import Any

from fastapi import APIRouter

from app import openapi as oas
from app.deps import PrincipalDep, ServiceDep
from app.routes.generations import GenId
from app.schemas import WebhookAttemptList
from common.contract import keys

router = APIRouter(prefix="/v1/generations", tags=["webhooks"], responses=oas.V1)


@router.get(
    "/{gen_id}/webhooks",
    operation_id="list_generation_webhook_attempts",
    response_model=WebhookAttemptList,
    responses={200: oas.success("Every delivery attempt, oldest first"),
               **oas.generation_not_found(f"/v1/generations/{oas.GEN}/webhooks")},
    summary="Webhook delivery attempts (time, status code, latency, error), oldest first",
)
async def list_webhook_attempts(gen_id: GenId, service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    await service.record(gen_id, principal)  # owner check: another key's generation is a 404
    raw = await service.ar.lrange(keys.webhook_log(gen_id), 0, -1)  # type: ignore[misc]
    return {"data": [json.loads(item) for item in raw]}
