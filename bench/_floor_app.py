"""The floor of a search over HTTP in this stack: uvicorn + FastAPI + the same SQL, nothing else.

No middleware, no authentication, rate limit, quota, cache or collection lookup: the route
embeds the query (the same LRU as the real route), runs the real route's SQL on the same kind
of pool, and returns the same JSON. ``bench/search.py`` times it beside the raw SQL and the real
route, to show how much of the route's time is the HTTP hop itself.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from pydantic import BaseModel

from atrium.config import get_settings
from atrium.embedding.query import embed_query
from atrium.kit.vectordb import create_pool
from atrium.retrieval import repository
from atrium.retrieval.schemas import SearchMode, SearchResponse, SearchTimings
from atrium.retrieval.service import _result


class FloorRequest(BaseModel):
    query: str
    top_k: int = 10


def create_app() -> FastAPI:
    settings = get_settings()
    pool = create_pool(settings.vector_conninfo, 4)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.open(wait=True)
        yield
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/floor/{tenant_id}")
    async def floor(tenant_id: uuid.UUID, body: FloorRequest) -> Any:
        vec, _ = await embed_query(settings, body.query, tenant_id=tenant_id)
        async with pool.connection() as conn:
            rows = await repository.vector_search(
                conn, tenant_id, vec, top_k=body.top_k, scope=repository.Scope()
            )
        response = SearchResponse(
            results=[_result(r, 1.0 - r.distance, None) for r in rows],
            mode=SearchMode.vector,
            timings=SearchTimings(),
        )
        return Response(response.model_dump_json(), media_type="application/json")

    return app
