"""GET /metrics: HTTP metrics, Atrium's own counters, queue depth from the real broker."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from kombu import Queue
from prometheus_client.parser import text_string_to_metric_families

from atrium.app import create_app
from atrium.config import load_settings
from atrium.kit import metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _scrape(client: httpx.AsyncClient) -> dict[Any, float]:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return _samples(r.text)


async def test_http_requests_are_counted(client: httpx.AsyncClient) -> None:
    before = await _scrape(client)
    for _ in range(3):
        assert (await client.get("/openapi.json")).status_code == 200
    after = await _scrape(client)
    key = {"handler": "/openapi.json", "method": "GET", "status": "200"}
    assert _value(after, "http_requests_total", **key) - _value(
        before, "http_requests_total", **key
    ) == pytest.approx(3)
    # /metrics itself and /healthz are not counted: scrapes and probes would drown real traffic.
    assert not any(k[0] == "http_requests_total" and ("handler", "/metrics") in k[1] for k in after)


async def test_recording_helpers_use_the_documented_names_and_labels(
    client: httpx.AsyncClient,
) -> None:
    """The helpers of ``atrium.kit.metrics`` land under the names and labels metrics.md lists.

    This only checks the helpers; that real requests and real tasks call them is proven by the
    tests below, which drive the API and the Celery worker and never touch a counter.
    """
    before = await _scrape(client)
    metrics.documents_processed.inc()
    metrics.documents_failed.inc(2)
    metrics.chunks_indexed.inc(40)
    metrics.record_quota_rejection("documents")
    metrics.record_rate_limit_rejection("api_key")
    metrics.record_llm_tokens("openai/test", prompt=120, completion=30)
    metrics.record_llm_tokens("local", embedding=500)
    with metrics.time_stage("embed"):
        pass
    metrics.observe_stage("vector_search", 0.002)
    after = await _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("atrium_documents_processed_total") == 1
    assert delta("atrium_documents_failed_total") == 2
    assert delta("atrium_chunks_indexed_total") == 40
    assert delta("atrium_quota_rejections_total", quota="documents") == 1
    assert delta("atrium_rate_limit_rejections_total", limit="api_key") == 1
    assert delta("atrium_llm_tokens_total", model="openai/test", kind="prompt") == 120
    assert delta("atrium_llm_tokens_total", model="openai/test", kind="completion") == 30
    assert delta("atrium_llm_tokens_total", model="local", kind="embedding") == 500
    assert delta("atrium_stage_duration_seconds_count", stage="embed") == 1
    assert delta("atrium_stage_duration_seconds_count", stage="vector_search") == 1
    assert delta("atrium_stage_duration_seconds_bucket", stage="vector_search", le="0.005") == 1


async def test_queue_depth_is_read_from_the_broker(
    client: httpx.AsyncClient, test_env: dict[str, Any], settings: Any
) -> None:
    from atrium.worker import celery_app

    # A queue no worker consumes, so the count cannot change under the test.
    name = "atrium-test-metrics"
    broker = redis.Redis.from_url(settings.resolved_broker_url)
    saved = celery_app.conf.task_queues
    celery_app.conf.task_queues = [Queue("celery"), Queue(name)]
    try:
        broker.delete(name, name + "\x06\x169")
        broker.rpush(name, "a", "b", "c")
        broker.rpush(name + "\x06\x169", "d")  # a priority-9 message lives in its own list
        samples = await _scrape(client)
    finally:
        celery_app.conf.task_queues = saved
        broker.delete(name, name + "\x06\x169")
        broker.close()
    assert _value(samples, "atrium_broker_up") == 1
    assert _value(samples, "atrium_ingestion_queue_length", queue=name) == 4
    assert ("atrium_ingestion_queue_length", (("queue", "celery"),)) in samples
    assert ("atrium_tasks_unacked", ()) in samples


async def test_an_unreachable_broker_still_answers(settings: Any) -> None:
    bad = load_settings(**{**settings.model_dump(), "celery_broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(bad)
    async with LifespanManager(app, startup_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            samples = await _scrape(c)
    assert _value(samples, "atrium_broker_up") == 0
    assert not any(k[0] == "atrium_ingestion_queue_length" for k in samples)


async def test_metrics_token_is_required_when_set(settings: Any) -> None:
    secured = load_settings(**{**settings.model_dump(), "metrics_token": "scrape-me-please"})
    app = create_app(secured)
    async with LifespanManager(app, startup_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/metrics")
            assert r.status_code == 401
            assert r.json()["error"] == "Unauthorized"
            assert "ATRIUM_METRICS_TOKEN" in r.json()["detail"]
            r = await c.get("/metrics", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = await c.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
            assert r.status_code == 200
            assert "atrium_documents_processed_total" in r.text


def test_celery_tasks_are_counted_by_outcome(settings: Any) -> None:
    from atrium.worker import celery_app

    @celery_app.task(name="tests.metrics.ok")
    def ok() -> int:
        return 1

    @celery_app.task(name="tests.metrics.boom")
    def boom() -> None:
        raise RuntimeError("boom")

    metrics.install_celery_metrics()
    metrics.install_celery_metrics()  # idempotent: a second call must not double count

    def count(task: str, outcome: str) -> float:
        return metrics.tasks.labels(task=task, outcome=outcome)._value.get()

    ok_before, boom_before = (
        count("tests.metrics.ok", "success"),
        count("tests.metrics.boom", "failure"),
    )
    timed_before = metrics.task_seconds.labels(task="tests.metrics.ok")._sum.get()
    assert ok.apply().get() == 1
    assert ok.apply().get() == 1
    result = boom.apply()
    assert result.failed()
    assert count("tests.metrics.ok", "success") - ok_before == 2
    assert count("tests.metrics.boom", "failure") - boom_before == 1
    assert metrics.task_seconds.labels(task="tests.metrics.ok")._sum.get() > timed_before


def test_ingestion_outcomes_are_counted_from_the_task_result(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atrium.worker import celery_app

    monkeypatch.setattr(metrics, "INGESTION_TASK", "tests.metrics.ingest")

    @celery_app.task(name="tests.metrics.ingest")
    def ingest(status: str) -> dict[str, Any]:
        return {
            "status": status,
            "chunks": 7 if status == "ready" else 0,
            "tokens": 900 if status == "ready" else 0,
            "timings": {"extract_ms": 4.0, "chunk_ms": 1, "embed_ms": 250.0, "store_ms": 30.5},
        }

    metrics.install_celery_metrics()

    def value(metric: Any, **labels: str) -> float:
        return float((metric.labels(**labels) if labels else metric)._value.get())

    model = settings.embedding_model
    before = (
        value(metrics.documents_processed),
        value(metrics.documents_failed),
        value(metrics.chunks_indexed),
        value(metrics.llm_tokens, model=model, kind="embedding"),
        metrics.stage_seconds.labels(stage="embed")._sum.get(),
    )
    ingest.apply(kwargs={"status": "ready"})
    ingest.apply(kwargs={"status": "failed"})
    ingest.apply(kwargs={"status": "superseded"})  # neither processed nor failed
    after = (
        value(metrics.documents_processed),
        value(metrics.documents_failed),
        value(metrics.chunks_indexed),
        value(metrics.llm_tokens, model=model, kind="embedding"),
        metrics.stage_seconds.labels(stage="embed")._sum.get(),
    )
    assert after[0] - before[0] == 1
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 7
    assert after[3] - before[3] == 900
    assert after[4] - before[4] == pytest.approx(0.75)  # three runs x 250 ms


async def test_every_rate_limit_refusal_is_counted(client: httpx.AsyncClient) -> None:
    # Route limits (login, register, verify, plans, invitations...) were not counted before:
    # only the per-key and per-user tenant buckets were.
    import uuid

    email = f"counted-{uuid.uuid4().hex[:12]}@example.com"
    before = await _scrape(client)
    codes = [
        (
            await client.post(
                "/v1/auth/login", data={"username": email, "password": "wrong-password-1"}
            )
        ).status_code
        for _ in range(11)  # login-email allows 10 per 5 minutes per address
    ]
    assert codes[-1] == 429, codes
    registrations = [
        (
            await client.post(
                "/v1/auth/register", json={"email": email, "password": "a sturdy passphrase 4"}
            )
        ).status_code
        for _ in range(6)  # register-email allows 5 per hour per address
    ]
    assert registrations[0] == 201 and registrations[-1] == 429, registrations
    after = await _scrape(client)
    for limit in ("login-email", "register-email"):
        assert _value(after, "atrium_rate_limit_rejections_total", limit=limit) - _value(
            before, "atrium_rate_limit_rejections_total", limit=limit
        ) == pytest.approx(1), limit


# Real traffic ---------------------------------------------------------------------------------
# The tests below never call a recording helper: requests go through the app and documents
# through the session's Celery worker, and only /metrics (the API's, the worker's) is read.


async def test_real_requests_move_the_http_quota_rate_limit_and_stage_metrics(
    app: Any, client: httpx.AsyncClient
) -> None:
    from tests.support.quota import set_plan, superuser_headers
    from tests.support.retrieval import create_collection, make_tenant

    world = await make_tenant(app, client)
    await create_collection(client, world, "docs")  # with none, a search has nothing to run
    await set_plan(
        client, await superuser_headers(app), world.tenant_id, "free", {"searches_per_month": 1}
    )
    r = await client.post(
        world.url("api-keys"),
        json={"name": "slow", "scopes": ["collections:read"], "rate_limit_per_minute": 1},
        headers=world.headers,
    )
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['key']}"}

    before = await _scrape(client)
    search = await client.post(
        world.url("search"), json={"query": "lighthouse keepers"}, headers=world.headers
    )
    assert search.status_code == 200, search.text
    refused = await client.post(
        world.url("search"), json={"query": "lighthouse keepers"}, headers=world.headers
    )
    assert refused.status_code == 402, refused.text
    assert refused.json()["detail"]["metric"] == "searches"
    assert (await client.get(world.url("collections"), headers=key)).status_code == 200
    limited = await client.get(world.url("collections"), headers=key)
    assert limited.status_code == 429, limited.text
    after = await _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    search_route = "/v1/tenants/{tenant_id}/search"
    collections_route = "/v1/tenants/{tenant_id}/collections"
    # Counted under the route template, by status: never one series per tenant id.
    assert delta("http_requests_total", handler=search_route, method="POST", status="200") == 1
    assert delta("http_requests_total", handler=search_route, method="POST", status="402") == 1
    assert delta("http_requests_total", handler=collections_route, method="GET", status="200") == 1
    assert delta("http_requests_total", handler=collections_route, method="GET", status="429") == 1
    assert not any(str(world.tenant_id) in str(k) for k in after)
    assert delta("atrium_quota_rejections_total", quota="searches") == 1
    assert delta("atrium_rate_limit_rejections_total", limit="api_key") == 1
    # The one search that ran embedded the query and searched the tenant's partition.
    assert delta("atrium_stage_duration_seconds_count", stage="query_embed") == 1
    # (hybrid, the default mode: the vector and the BM25 ranking in one statement)
    assert delta("atrium_stage_duration_seconds_count", stage="text_search") == 1


async def test_a_real_ingestion_moves_the_worker_metrics(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    """The worker's own counters after a document went through upload, the Celery task and the
    vector store: read from the worker's multiprocess directory, the way ``atrium worker
    --metrics-port`` and ``atrium dev``'s /metrics read them."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from atrium.kit.metrics import INGESTION_TASK
    from tests.support.documents import prose
    from tests.support.retrieval import create_collection, make_tenant, upload, wait_ready

    def scrape_worker() -> dict[Any, float]:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=celery_worker.env["PROMETHEUS_MULTIPROC_DIR"]
        )
        return _samples(generate_latest(registry).decode())

    before = scrape_worker()
    world = await make_tenant(app, client)
    await create_collection(client, world, "docs")
    doc_id = await upload(client, world, "docs", "Lighthouses", prose(600), {})
    doc = await wait_ready(client, world, "docs", doc_id)
    assert doc["chunk_count"] > 1 and doc["token_count"] > 0, doc

    def delta(samples: dict[Any, float], name: str, **labels: str) -> float:
        return _value(samples, name, **labels) - _value(before, name, **labels)

    # The task's result is counted in its postrun signal, just after the row turned ready.
    deadline = time.monotonic() + 60
    after = scrape_worker()
    while delta(after, "atrium_documents_processed_total") < 1:
        assert time.monotonic() < deadline, "the worker never counted the document"
        await asyncio.sleep(0.1)
        after = scrape_worker()

    assert delta(after, "atrium_documents_processed_total") == 1
    assert delta(after, "atrium_documents_failed_total") == 0
    assert delta(after, "atrium_chunks_indexed_total") == doc["chunk_count"]
    tokens = delta(
        after, "atrium_llm_tokens_total", model=settings.embedding_model, kind="embedding"
    )
    assert tokens == doc["token_count"]
    assert delta(after, "atrium_tasks_total", task=INGESTION_TASK, outcome="success") >= 1
    assert delta(after, "atrium_task_duration_seconds_count", task=INGESTION_TASK) >= 1
    for stage in ("extract", "chunk", "embed", "store"):
        assert delta(after, "atrium_stage_duration_seconds_count", stage=stage) == 1, stage
