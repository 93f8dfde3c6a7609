"""Prometheus metrics: HTTP metrics from prometheus-fastapi-instrumentator plus Atrium's own.

Other domains record events through the objects and helpers here, never through
``prometheus_client`` directly, so names, labels and buckets stay in one place::

    from atrium.kit import metrics

    metrics.record_quota_rejection("documents")
    metrics.record_rate_limit_rejection("api_key")
    metrics.record_llm_tokens("openai/gpt-4o-mini", prompt=812, completion=96)
    with metrics.time_stage("embed"):
        ...

Documents processed and failed, chunks indexed, embedding tokens and ingestion stage latencies
are recorded from the result of the ``atrium.ingestion.process_document`` task (see
:func:`record_ingestion_outcome`); the pipeline does not call those counters itself.

Labels are a small closed set (stage, quota, limit, model, task); never a tenant, user or
document id, which would make one time series per customer.

Processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn.conf.py and ``atrium dev`` set it),
every process that shares the directory (API workers, and in ``atrium dev`` the Celery worker
too) writes its values there and ``/metrics`` adds them up. A Celery worker on another host
exposes its own with ``atrium worker --metrics-port``. The ingestion queue depth is read from the
broker at scrape time, so any API replica reports the whole cluster's queue.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import structlog
from celery.signals import task_failure, task_postrun, task_prerun, task_retry
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from redis.asyncio import Redis
from starlette.middleware import Middleware
from starlette.requests import Request as StarletteRequest

from atrium.config import get_settings
from atrium.kit.celery_app import get_celery
from atrium.kit.errors import Unauthorized

if TYPE_CHECKING:
    from atrium.config import Settings

log = structlog.get_logger("atrium.metrics")

#: Seconds; from a 5 ms stage (a vector search) to a 5 min one (embedding a large PDF).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: Stage names in use; ``time_stage`` accepts others, but dashboards are built on these.
INGESTION_STAGES = ("extract", "chunk", "embed", "store")
QUERY_STAGES = ("query_embed", "vector_search", "text_search", "fusion", "rerank", "answer")

documents_processed = Counter(
    "atrium_documents_processed",
    "Documents ingested successfully (status ready).",
)
documents_failed = Counter(
    "atrium_documents_failed",
    "Documents whose ingestion failed (status failed).",
)
chunks_indexed = Counter(
    "atrium_chunks_indexed",
    "Chunks written to the vector database.",
)
quota_rejections = Counter(
    "atrium_quota_rejections",
    "Requests refused because a plan quota was exhausted (HTTP 402/429).",
    ["quota"],
)
rate_limit_rejections = Counter(
    "atrium_rate_limit_rejections",
    "Requests refused by a rate limit (HTTP 429).",
    ["limit"],
)
llm_tokens = Counter(
    "atrium_llm_tokens",
    "Tokens sent to or received from LLM and embedding providers.",
    ["model", "kind"],
)
stage_seconds = Histogram(
    "atrium_stage_duration_seconds",
    "Latency of one stage of ingestion or query answering.",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
tasks = Counter(
    "atrium_tasks",
    "Celery tasks finished, by task name and outcome (success, failure, retry).",
    ["task", "outcome"],
)
task_seconds = Histogram(
    "atrium_task_duration_seconds",
    "Run time of Celery tasks.",
    ["task"],
    buckets=STAGE_BUCKETS,
)


def record_quota_rejection(quota: str) -> None:
    """Count one request refused by a quota (``documents``, ``storage``, ``queries``, ...)."""
    quota_rejections.labels(quota=quota).inc()


def record_rate_limit_rejection(limit: str) -> None:
    """Count one request refused by a rate limit (``api_key``, ``user``, ``ip``, ``login``)."""
    rate_limit_rejections.labels(limit=limit).inc()


def record_llm_tokens(
    model: str, *, prompt: int = 0, completion: int = 0, embedding: int = 0
) -> None:
    """Count tokens used with ``model`` (the litellm model id, or ``local`` for ONNX)."""
    for kind, n in (("prompt", prompt), ("completion", completion), ("embedding", embedding)):
        if n > 0:
            llm_tokens.labels(model=model, kind=kind).inc(n)


def observe_stage(stage: str, seconds: float) -> None:
    """Record how long one stage took."""
    stage_seconds.labels(stage=stage).observe(seconds)


@contextmanager
def time_stage(stage: str) -> Iterator[None]:
    """Time the ``with`` block as ``stage`` (recorded even when the block raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe_stage(stage, time.perf_counter() - start)


# Scrape-time collectors ------------------------------------------------------------------------

#: kombu's Redis transport keeps priorities 3, 6 and 9 in lists named queue + this + digit.
_PRIORITY_SEP = "\x06\x16"
#: Seconds a scrape waits for the broker before reporting atrium_broker_up 0.
BROKER_TIMEOUT = 2.0


def _broker_redis_url(broker_url: str) -> str | None:
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url[len("redis+socket://") :]
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    return None


def _queue_names() -> list[str]:
    conf = get_celery().conf
    names = {str(conf.task_default_queue)}
    for queue in conf.task_queues or []:
        names.add(str(queue.name))
    return sorted(names)


async def broker_queue_depths(broker_url: str) -> dict[str, int] | None:
    """Messages waiting in each Celery queue, plus ``unacked`` (taken, not yet acknowledged).

    Returns None when the broker is not Redis or does not answer within two seconds.
    """
    timeout = BROKER_TIMEOUT
    url = _broker_redis_url(broker_url)
    if url is None:
        return None
    queues = _queue_names()
    client = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for q in queues:
                for suffix in ("", f"{_PRIORITY_SEP}3", f"{_PRIORITY_SEP}6", f"{_PRIORITY_SEP}9"):
                    pipe.llen(q + suffix)
            pipe.hlen("unacked")
            values = await asyncio.wait_for(pipe.execute(), timeout)
    except Exception as exc:  # the scrape still answers; broker_up says what happened
        log.warning("metrics_broker_unreachable", detail=f"{type(exc).__name__}: {exc}"[:200])
        return None
    finally:
        await client.aclose()
    depths = {q: sum(int(v) for v in values[i * 4 : i * 4 + 4]) for i, q in enumerate(queues)}
    depths["unacked"] = int(values[-1])
    return depths


class _BrokerCollector:
    """Yields the queue depths fetched just before ``generate_latest`` runs."""

    def __init__(self, depths: dict[str, int] | None) -> None:
        self.depths = depths

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "atrium_broker_up", "1 when the Celery broker answered the last scrape."
        )
        up.add_metric([], 0.0 if self.depths is None else 1.0)
        yield up
        if self.depths is None:
            return
        depth = GaugeMetricFamily(
            "atrium_ingestion_queue_length",
            "Celery messages waiting in the broker, by queue (Redis LLEN).",
            labels=["queue"],
        )
        for queue, n in self.depths.items():
            if queue != "unacked":
                depth.add_metric([queue], float(n))
        yield depth
        unacked = GaugeMetricFamily(
            "atrium_tasks_unacked",
            "Celery messages taken by a worker and not yet acknowledged (running or lost).",
        )
        unacked.add_metric([], float(self.depths.get("unacked", 0)))
        yield unacked


def render_latest(depths: dict[str, int] | None = None) -> bytes:
    """The Prometheus text exposition of this process (or all processes in multiprocess mode)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extra = CollectorRegistry()
    extra.register(_BrokerCollector(depths))
    return body + generate_latest(extra)


class _CachedHandler(PrometheusInstrumentatorMiddleware):
    """prometheus-fastapi-instrumentator's middleware, remembering each path's handler.

    The library resolves the route template by matching the path against every route of
    the app on every request, before the app runs (it needs the label up front): a
    tenth of a millisecond on this app's ~100 routes, measurable on a 1 ms search. The
    answer depends only on the path, so it is kept in a bounded map.
    """

    _handlers: dict[tuple[str, str], tuple[str, bool]]

    def _get_handler(self, request: StarletteRequest) -> tuple[str, bool]:
        handlers = self.__dict__.setdefault("_handlers", {})
        key = (request.scope.get("root_path", ""), request.scope["path"])
        found = handlers.get(key)
        if found is None:
            found = super()._get_handler(request)
            if len(handlers) >= 10_000:
                handlers.clear()
            handlers[key] = found
        return found


@functools.cache
def _http_instrumentation() -> Any:
    """The library's default HTTP metrics, created once per process.

    Left to itself, each app's middleware creates them when the app first runs; the second app
    of a process then hits "Duplicated timeseries", which the library swallows by instrumenting
    nothing, so that app's requests went uncounted (seen with two apps in one test process).
    """
    return http_metrics.default()


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Instrument HTTP requests and serve ``GET /metrics`` (bearer token when configured)."""
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["^/metrics$", "^/healthz$"],
    ).add(_http_instrumentation()).instrument(app)
    # The same middleware, with its route lookup remembered per path (see _CachedHandler).
    # Cast: the arguments are the library's own middleware's, passed on untyped as they came.
    app.user_middleware = [
        Middleware(cast(Any, _CachedHandler), *m.args, **m.kwargs)
        if cast(Any, m.cls) is PrometheusInstrumentatorMiddleware
        else m
        for m in app.user_middleware
    ]
    token = settings.metrics_token.get_secret_value()

    @app.get(
        "/metrics",
        include_in_schema=False,
        responses={401: {"description": "ATRIUM_METRICS_TOKEN is set and was not sent"}},
    )
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format: HTTP, ingestion, quota, rate-limit, LLM and queue metrics."""
        if token:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                raise Unauthorized("Send Authorization: Bearer <ATRIUM_METRICS_TOKEN>")
        depths = await broker_queue_depths(settings.resolved_broker_url)
        return Response(render_latest(depths), media_type=CONTENT_TYPE_LATEST)


# Celery ---------------------------------------------------------------------------------------

#: The ingestion task; its return value is the document's outcome (see ingestion.tasks).
INGESTION_TASK = "atrium.ingestion.process_document"


def record_ingestion_outcome(outcome: dict[str, Any]) -> None:
    """Count the documents of one finished ingestion task from its result.

    ``{"documents": [<document>, ...]}`` (a task may process several documents), each
    ``{"status": "ready" | "failed" | "skipped" | "superseded" | "retry" | "requeued", "chunks": n,
    "tokens": n, "timings": {"extract_ms": ..., "chunk_ms": ..., "embed_ms": ...,
    "store_ms": ...}}``; a bare ``<document>`` counts as one. ``timings`` is optional.
    Recorded here, from the worker's task signal on success (a task that retries its own
    document calls it for the other documents of its run), so the pipeline itself does not
    call these counters (it would count twice).
    """
    documents = outcome.get("documents")
    if isinstance(documents, list):
        for document in documents:
            if isinstance(document, dict):
                record_ingestion_outcome(document)
        return
    status = outcome.get("status")
    if status == "ready":
        documents_processed.inc()
        chunks = int(outcome.get("chunks") or 0)
        if chunks:
            chunks_indexed.inc(chunks)
        tokens = int(outcome.get("tokens") or 0)
        if tokens:
            record_llm_tokens(get_settings().embedding_model, embedding=tokens)
    elif status == "failed":
        documents_failed.inc()
    timings = outcome.get("timings")
    if isinstance(timings, dict):
        for stage in INGESTION_STAGES:
            ms = timings.get(f"{stage}_ms")
            if isinstance(ms, int | float):
                observe_stage(stage, float(ms) / 1000)


_task_started: dict[str, float] = {}
_celery_installed: list[bool] = []


def install_celery_metrics() -> None:
    """Count and time every Celery task (the worker's main process calls it; idempotent)."""
    if _celery_installed:
        return
    _celery_installed.append(True)

    def _name(sender: Any) -> str:
        return str(getattr(sender, "name", None) or "unknown")

    def prerun(task_id: str = "", **_: Any) -> None:
        _task_started[task_id] = time.perf_counter()

    def postrun(
        sender: Any = None, task_id: str = "", state: str = "", retval: Any = None, **_: Any
    ) -> None:
        start = _task_started.pop(task_id, None)
        if start is not None:
            task_seconds.labels(task=_name(sender)).observe(time.perf_counter() - start)
        if state == "SUCCESS":
            tasks.labels(task=_name(sender), outcome="success").inc()
            if _name(sender) == INGESTION_TASK and isinstance(retval, dict):
                record_ingestion_outcome(retval)

    def failure(sender: Any = None, **_: Any) -> None:
        tasks.labels(task=_name(sender), outcome="failure").inc()

    def retry(sender: Any = None, **_: Any) -> None:
        tasks.labels(task=_name(sender), outcome="retry").inc()

    task_prerun.connect(prerun, weak=False)
    task_postrun.connect(postrun, weak=False)
    task_failure.connect(failure, weak=False)
    task_retry.connect(retry, weak=False)


def start_worker_metrics_server(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104  # nosec B104
    """Serve this worker's metrics on ``host:port`` (a Prometheus target per worker host)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)


def mark_process_dead(pid: int) -> None:
    """Forget a dead process's live gauges (gunicorn's ``child_exit`` hook calls this)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
