"""POST /api-keys: create a key as the caller (api.create_api_key decides, with RLS)."""

from __future__ import annotations

import json
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel, Field, FutureDatetime

from ext.db import as_caller
from ext.deps import CallerDep, PoolDep, RequestIdDep

router = APIRouter(tags=["api-keys"])


# A key's suites travel in every token it is exchanged for: bounded, so a token stays within
# the proxy's header limit (16k; ~55 bytes of token per suite) and its verification cache.
MAX_KEY_SUITES = 100


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    suites: list[UUID] | None = Field(None, max_length=MAX_KEY_SUITES,
                                      description=f"limit the key to these suites (at most {MAX_KEY_SUITES}); "
                                                  "omitted: every suite of its owner")
    access: Literal["read", "write"] = "write"
    expires_at: FutureDatetime | None = None  # a past one is 422 naming it (was the database's 400)


@router.post("/api-keys", status_code=201, summary="Create an API key; the secret is shown once")
async def create_api_key(body: NewKey, caller: CallerDep, pool: PoolDep, rid: RequestIdDep) -> dict[str, Any]:
    async with as_caller(pool, caller, rid) as conn:
        cur = await conn.execute(
            "select api.create_api_key(%s, %s, %s, %s) as key",
            [body.name, body.suites, body.access, body.expires_at],
        )
        row = await cur.fetchone()
    assert row is not None
    key = row["key"]
    return dict(key if isinstance(key, dict) else json.loads(key))
