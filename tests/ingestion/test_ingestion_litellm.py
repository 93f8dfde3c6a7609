"""The pipeline with the hosted-embedding provider (LiteLLM against an OpenAI-compatible server):
a refusal fails the document at once with the reason; an outage is retried with backoff until
the provider is back."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.documents import chunk_rows, prose, setup_tenant, wait_document
from tests.support.llm_server import LLMServer
from tests.support.services import WorkerProcess


@pytest.fixture
def litellm_worker(
    celery_worker: WorkerProcess, test_env: dict[str, Any], llm_server: LLMServer
) -> Iterator[WorkerProcess]:
    """A worker embedding through LiteLLM, while the shared (local-model) one is stopped."""
    celery_worker.stop()
    env = {
        **os.environ,
        "ATRIUM_EMBEDDING_PROVIDER": "litellm",
        "ATRIUM_EMBEDDING_MODEL": "openai/test-embedding",
        "ATRIUM_EMBEDDING_API_BASE": llm_server.base_url,
        "ATRIUM_EMBEDDING_API_KEY": "sk-test",
        "ATRIUM_EMBEDDING_MAX_TOKENS": "512",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    worker = WorkerProcess(env, test_env["data_dir"] / "litellm-worker.log")
    worker.start()
    llm_server.behaviour.clear()
    try:
        yield worker
    finally:
        llm_server.behaviour.clear()
        worker.stop()
        celery_worker.start()


async def test_hosted_embeddings_refusal_and_outage(
    app: Any,
    client: httpx.AsyncClient,
    litellm_worker: WorkerProcess,
    llm_server: LLMServer,
    settings: Any,
) -> None:
    ctx = await setup_tenant(app, client)

    # The provider works: the document is ready, embedded by the hosted model.
    r = await client.post(ctx.docs, json={"text": prose(400)}, headers=ctx.headers)
    ok = await wait_document(client, ctx, r.json()["documents"][0]["id"], timeout=120)
    assert ok["status"] == "ready", ok
    assert len(await chunk_rows(settings, ok["id"])) == ok["chunk_count"]
    assert any(req["path"].endswith("/embeddings") for req in llm_server.requests)

    # A refusal (400: bad request) will not get better: failed at once, with the reason.
    llm_server.behaviour["status"] = 400
    r = await client.post(ctx.docs, json={"text": "Refused. " + prose(100)}, headers=ctx.headers)
    refused = await wait_document(client, ctx, r.json()["documents"][0]["id"], timeout=120)
    assert refused["status"] == "failed"
    assert "embedding provider refused" in refused["error"]
    assert refused["attempts"] == 1

    # An outage (503) is retried: the document goes back to queued, saying why, and becomes
    # ready once the provider answers again.
    llm_server.behaviour["status"] = 503
    r = await client.post(ctx.docs, json={"text": "Outage. " + prose(100)}, headers=ctx.headers)
    doc_id = r.json()["documents"][0]["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = (await client.get(f"{ctx.docs}/{doc_id}", headers=ctx.headers)).json()
        if body["status"] == "queued" and body["error"]:
            break
        assert body["status"] in ("queued", "processing"), body
        await asyncio.sleep(0.3)
    else:
        raise AssertionError("the document was never put back in the queue for a retry")
    assert "Retrying in" in body["error"] and "temporary problem" in body["error"]
    llm_server.behaviour.clear()
    final = await wait_document(client, ctx, doc_id, timeout=180)
    assert final["status"] == "ready", final
    assert final["error"] is None and final["attempts"] >= 2
    assert len(await chunk_rows(settings, doc_id)) == final["chunk_count"]
