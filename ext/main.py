"""ext's FastAPI application: clients and pools are created in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ext import db, errors, maintenance, observability, tus
from ext.config import ExtSettings
from ext.db import make_identity_pool, make_pool
from ext.routers import api_keys, auth, docs, examples, health, pipeline, sessions
from ext.storage import ObjectStore, make_client
from ext.tokens import KeySet


def create_app(settings: ExtSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or ExtSettings()
        app.state.settings = s
        db.ROLE_SETTINGS_TTL_S = s.db_role_settings_ttl_s
        app.state.keys = KeySet.load(s.jwt_keys_dir, s.jwt_issuer, s.jwt_audience, s.jwt_leeway_s,
                                     s.jwt_verified_cache_size)
        app.state.s3 = make_client(s)
        app.state.store = ObjectStore(app.state.s3, s)
        app.state.pool = make_pool(s)
        app.state.identity_pool = make_identity_pool(s)
        app.state.tus_pool = tus.make_lock_pool(s)
        await app.state.pool.open(wait=False)
        await app.state.identity_pool.open(wait=False)
        await app.state.tus_pool.open(wait=False)
        housekeeping = asyncio.create_task(maintenance.run_forever(app.state))
        try:
            yield
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await app.state.tus_pool.close()
            await app.state.identity_pool.close()
            await app.state.pool.close()

    observability.configure_logging()
    # /docs and /openapi.json are docs.router's: the whole API (ext and PostgREST), not ext's alone.
    app = FastAPI(title="Tracepipe ext", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None,
                  description="Identity, uploads and streams of Tracepipe. Errors: {code, message, details, hint}.")
    errors.install(app)
    app.add_middleware(observability.RequestLog)
    # Matched in this order, route by route: the pipeline's calls (a worker's every few
    # milliseconds) and health probes first, the docs last.
    app.include_router(pipeline.router)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(api_keys.router)
    app.include_router(sessions.router)
    app.include_router(examples.router)
    app.include_router(tus.router)
    app.include_router(docs.router)
    return app


app = create_app()
