"""GET /v1/usage: the calling key's images and GPU time per UTC day (app/usage.py)."""

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app import openapi as oas
from app.deps import PrincipalDep, UsageDep
from app.schemas import UsageReport
from app.usage import DEFAULT_DAYS

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=oas.V1)


@router.get(
    "",
    operation_id="get_usage",
    response_model=UsageReport,
    responses={200: oas.success("The key's figures per UTC day of the range, oldest first, and their totals")},
    summary="Your API key's usage: images and GPU seconds per UTC day, and its daily quota",
)
async def get_usage(
    usage: UsageDep,
    principal: PrincipalDep,
    first: Annotated[dt.date | None, Query(
        alias="from", description=f"First UTC day (`YYYY-MM-DD`), within the kept days "
        f"(`SDXL_USAGE_RETENTION_DAYS` back from today; 422 otherwise); default: {DEFAULT_DAYS} days back from "
        "today (`to` itself when `to` is older), never before the oldest kept day")] = None,
    last: Annotated[dt.date | None, Query(
        alias="to", description="Last UTC day (`YYYY-MM-DD`), at most today; default: today")] = None,
) -> dict[str, Any]:
    return await usage.report(principal, first, last)
