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


async def test_domain_counters_and_stage_latencies(client: httpx.AsyncClient) -> None:
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
    after = await _scrape(client)
    assert _value(after, "atrium_rate_limit_rejections_total", limit="login-email") - _value(
        before, "atrium_rate_limit_rejections_total", limit="login-email"
    ) == pytest.approx(1)
