"""Liveness (/health) and readiness (/ready: database, PostgREST and object storage)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ext.deps import PoolDep, SettingsDep
from ext.observability import metrics_response, refresh_pipeline_gauges
from ext.storage import bucket_reachable

router = APIRouter(tags=["health"])


@router.get("/health", summary="The process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Every dependency answers (database, PostgREST, object storage)")
async def ready(request: Request, pool: PoolDep, settings: SettingsDep) -> JSONResponse:
    async def database() -> bool:
        async with pool.connection(timeout=settings.ready_timeout_s) as conn:
            await conn.execute("select 1")
        return True

    async def postgrest() -> bool:
        async with httpx.AsyncClient(timeout=settings.ready_timeout_s) as client:
            r = await client.get(f"{settings.postgrest_url}/ready")
            return r.status_code == 200

    async def storage() -> bool:
        return await bucket_reachable(request.app.state.s3, settings.s3_bucket)

    async def run(check: Any) -> str:
        try:
            ok = await asyncio.wait_for(check(), settings.ready_timeout_s + 0.5)
            return "ok" if ok else "down"
        except Exception:
            return "down"

    names = ("database", "postgrest", "object_storage")
    results = dict(zip(names, await asyncio.gather(run(database), run(postgrest), run(storage)), strict=True))
    if all(v == "ok" for v in results.values()):
        return JSONResponse({"status": "ok", "checks": results})
    down = [k for k, v in results.items() if v != "ok"]
    return JSONResponse(
        {"code": "TP503", "message": "not ready", "details": f"down: {', '.join(down)}", "hint": None,
         "checks": results},
        status_code=503, headers={"Retry-After": "1"},
    )


@router.get("/metrics", summary="Prometheus metrics of every ext worker (ext's port only; not routed by the proxy)",
            include_in_schema=False)
async def metrics(request: Request) -> Response:
    await refresh_pipeline_gauges(request.app.state.identity_pool)
    body, content_type = metrics_response()
    return Response(body, media_type=content_type)
