"""The quota engine: exact under concurrency, reservations given back on failure, MySQL as the
source of truth (Redis rebuilt after a flush), monthly rollover by the beat task."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import select, update

from atrium.billing.quota import (
    Metric,
    Quota,
    QuotaExceeded,
    add_months,
    period_containing,
    reservations_key,
    usage_key,
)
from atrium.kit import ratelimit
from atrium.kit.db import unit_of_work
from atrium.kit.errors import TooManyRequests
from atrium.models.billing import BillingAccount, UsageCounter
from tests.conftest import drain_background_writes
from tests.support.quota import (
    build_quota_app,
    serve_http,
    set_plan,
    superuser_headers,
    tenant_with_owner,
    usage_of,
)


@pytest.fixture(scope="module")
async def quota_app(test_env: dict[str, Any]) -> AsyncIterator[Any]:
    app = build_quota_app()
    async with LifespanManager(app, startup_timeout=60):
        yield app


@pytest.fixture
async def qclient(quota_app: Any, clean_state: None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=quota_app, client=("127.0.0.1", 50001))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c
    await drain_background_writes(quota_app)


async def _limited_tenant(
    app: Any, client: httpx.AsyncClient, **overrides: int | None
) -> tuple[Any, dict[str, str]]:
    tenant, _, headers = await tenant_with_owner(app)
    admin = await superuser_headers(app)
    # Per-user rate limit off: these tests are about quotas, not request rates.
    await set_plan(
        client,
        admin,
        tenant.id,
        "free",
        {"requests_per_minute_per_user": None, **overrides},
    )
    return tenant, headers


async def _db_used(app: Any, tenant_id: uuid.UUID, metric: Metric) -> int:
    async with app.state.sessionmaker() as s:
        rows = (
            await s.execute(
                select(UsageCounter.used).where(
                    UsageCounter.tenant_id == tenant_id, UsageCounter.metric == metric.value
                )
            )
        ).scalars()
        return sum(int(v) for v in rows)


async def test_64_concurrent_http_requests_admit_exactly_what_is_left(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    tenant, headers = await _limited_tenant(quota_app, qclient, searches_per_month=12)
    # Two searches already used this period: 10 are left.
    for _ in range(2):
        r = await qclient.post(f"/v1/tenants/{tenant.id}/_quota_test/search", headers=headers)
        assert r.status_code == 200, r.text

    async with (
        serve_http(quota_app) as base_url,
        httpx.AsyncClient(
            base_url=base_url,
            timeout=60,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        ) as http,
    ):
        url = f"/v1/tenants/{tenant.id}/_quota_test/search?delay=0.05"
        responses = await asyncio.gather(*[http.post(url, headers=headers) for _ in range(64)])

    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 10, statuses
    assert statuses.count(402) == 54, statuses
    refused = next(r for r in responses if r.status_code == 402).json()
    assert refused["error"] == "QuotaExceeded"
    detail = refused["detail"]
    assert detail["metric"] == "searches"
    assert detail["limit"] == 12
    assert 10 <= detail["used"] <= 12
    assert dt.datetime.fromisoformat(detail["resets_at"]) > dt.datetime.now(dt.UTC)

    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    searches = usage_of(usage, "searches")
    assert (searches["used"], searches["reserved"], searches["limit"]) == (12, 0, 12)
    assert searches["percent"] == 100.0
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 12


async def test_failed_work_gives_its_reservation_back(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    tenant, headers = await _limited_tenant(quota_app, qclient, searches_per_month=5)
    url = f"/v1/tenants/{tenant.id}/_quota_test/search"
    # Five at once take the whole quota, fail, and give it back; then three more, one by one.
    failures = await asyncio.gather(
        *[qclient.post(url + "?fail=true", headers=headers) for _ in range(5)]
    )
    failures += [await qclient.post(url + "?fail=true", headers=headers) for _ in range(3)]
    assert [r.status_code for r in failures] == [502] * 8
    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    assert (usage_of(usage, "searches")["used"], usage_of(usage, "searches")["reserved"]) == (0, 0)
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 0
    # Nothing was lost: the whole quota is still there, and no more.
    for _ in range(5):
        assert (await qclient.post(url, headers=headers)).status_code == 200
    assert (await qclient.post(url, headers=headers)).status_code == 402


async def test_settle_records_the_actual_amount(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    tenant, headers = await _limited_tenant(quota_app, qclient, llm_tokens_per_month=1000)
    url = f"/v1/tenants/{tenant.id}/_quota_test/tokens"
    r = await qclient.post(url, params={"reserve_n": 600, "actual": 37}, headers=headers)
    assert r.status_code == 200
    # Failed before the model answered: nothing counted.
    r = await qclient.post(
        url, params={"reserve_n": 600, "actual": 500, "fail": "before"}, headers=headers
    )
    assert r.status_code == 502
    # Failed after the tokens were spent (settled): they count.
    r = await qclient.post(
        url, params={"reserve_n": 600, "actual": 100, "fail": "after"}, headers=headers
    )
    assert r.status_code == 502
    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    tokens = usage_of(usage, "llm_tokens")
    assert (tokens["used"], tokens["reserved"]) == (137, 0)
    # 863 left: a reservation of 900 does not fit.
    r = await qclient.post(url, params={"reserve_n": 900, "actual": 1}, headers=headers)
    assert r.status_code == 402
    assert r.json()["detail"]["used"] == 137
    assert await _db_used(quota_app, tenant.id, Metric.llm_tokens) == 137


async def test_levels_go_up_and_down(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    tenant, headers = await _limited_tenant(quota_app, qclient, documents=2)
    url = f"/v1/tenants/{tenant.id}/_quota_test/documents"
    assert (await qclient.post(url, params={"size": 1000}, headers=headers)).status_code == 200
    assert (await qclient.post(url, params={"size": 500}, headers=headers)).status_code == 200
    refused = await qclient.post(url, headers=headers)
    assert refused.status_code == 402
    assert refused.json()["detail"] == {
        "metric": "documents",
        "limit": 2,
        "used": 2,
        "resets_at": None,
        "message": refused.json()["detail"]["message"],
    }
    # The refused document reserved its bytes first? No: the documents reservation failed
    # first, so stored bytes are exactly what the two documents hold.
    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    assert usage_of(usage, "stored_bytes")["used"] == 1500
    assert usage_of(usage, "documents")["resets_at"] is None
    assert (await qclient.delete(url, params={"size": 1000}, headers=headers)).status_code == 200
    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    assert usage_of(usage, "documents")["used"] == 1
    assert usage_of(usage, "stored_bytes")["used"] == 500
    assert (await qclient.post(url, headers=headers)).status_code == 200


async def test_an_abandoned_reservation_lapses(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    tenant, _ = await _limited_tenant(quota_app, qclient, answers_per_month=3)
    quota = Quota.of(quota_app)
    # A worker that died mid-work never settles nor releases: its hold expires.
    before_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    held = quota.reserve(tenant.id, Metric.answers, 3, ttl_seconds=600)
    await held.acquire()
    after_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    with pytest.raises(QuotaExceeded):
        await quota.reserve(tenant.id, Metric.answers, 1).acquire()
    # The hold is a member of the reservations set scored with its expiry: ttl_seconds on.
    billing = await quota.billing(tenant.id)
    tag = billing.period.start.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S")
    holds = reservations_key(tenant.id, tag, Metric.answers)
    expiry = await quota_app.state.redis.zscore(holds, held.member)
    assert before_ms + 600_000 <= expiry <= after_ms + 600_000
    # Ten minutes later (the expiry moved into the past instead of waiting for it), the next
    # reservation finds the hold lapsed and gets the whole quota.
    moved = await quota_app.state.redis.zadd(holds, {held.member: before_ms - 1}, xx=True, ch=True)
    assert moved == 1  # the hold existed and its expiry changed
    async with quota.reserve(tenant.id, Metric.answers, 3):
        pass
    assert (await quota.usage_of(tenant.id, Metric.answers)).used == 3
    assert await quota_app.state.redis.zscore(holds, held.member) is None


async def test_counters_are_rebuilt_from_mysql_after_a_redis_flush(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    tenant, headers = await _limited_tenant(quota_app, qclient, searches_per_month=10)
    url = f"/v1/tenants/{tenant.id}/_quota_test/search"
    docs = f"/v1/tenants/{tenant.id}/_quota_test/documents"
    for _ in range(7):
        assert (await qclient.post(url, headers=headers)).status_code == 200
    assert (await qclient.post(docs, params={"size": 4096}, headers=headers)).status_code == 200
    before = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()

    await quota_app.state.redis.flushdb()

    after = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    assert after["metrics"] == before["metrics"]
    assert usage_of(after, "searches")["used"] == 7
    assert usage_of(after, "stored_bytes")["used"] == 4096
    # The Redis counters themselves are back, and enforcement continues exactly.
    tag = dt.datetime.fromisoformat(after["period_start"]).strftime("%Y%m%dT%H%M%S")
    assert await quota_app.state.redis.hget(usage_key(tenant.id, tag), "searches") == "7"
    for _ in range(3):
        assert (await qclient.post(url, headers=headers)).status_code == 200
    assert (await qclient.post(url, headers=headers)).status_code == 402


async def test_period_rolls_over_by_the_beat_task(
    quota_app: Any, qclient: httpx.AsyncClient, celery_worker: Any
) -> None:
    from atrium.worker import celery_app

    entry = celery_app.conf.beat_schedule["billing-roll-periods"]
    assert entry["task"] == "atrium.billing.roll_periods"
    assert entry["schedule"] <= 60

    tenant, headers = await _limited_tenant(quota_app, qclient, searches_per_month=3)
    url = f"/v1/tenants/{tenant.id}/_quota_test/search"
    docs = f"/v1/tenants/{tenant.id}/_quota_test/documents"
    for _ in range(3):
        assert (await qclient.post(url, headers=headers)).status_code == 200
    assert (await qclient.post(docs, headers=headers)).status_code == 200
    assert (await qclient.post(url, headers=headers)).status_code == 402

    # Put the tenant in a period that ended an hour ago, as if a month had passed.
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    new_start = now - dt.timedelta(hours=1)
    old_start = add_months(new_start, -1)
    async with quota_app.state.sessionmaker() as s:
        await s.execute(
            update(BillingAccount)
            .where(BillingAccount.tenant_id == tenant.id)
            .values(period_anchor=new_start, period_start=old_start, period_end=new_start)
        )
        await s.execute(
            update(UsageCounter)
            .where(UsageCounter.tenant_id == tenant.id, UsageCounter.metric == "searches")
            .values(period_start=old_start)
        )
        # A members level that drifted (a seat counted for a commit that then failed).
        await s.execute(
            update(UsageCounter)
            .where(UsageCounter.tenant_id == tenant.id, UsageCounter.metric == "members")
            .values(used=5)
        )
        await s.commit()
    await Quota.of(quota_app).forget_billing(tenant.id)

    result = await asyncio.to_thread(
        lambda: celery_app.send_task("atrium.billing.roll_periods").get(timeout=60)
    )
    assert str(tenant.id) in result["rolled"]

    usage = (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()
    assert dt.datetime.fromisoformat(usage["period_start"]) == new_start
    assert dt.datetime.fromisoformat(usage["period_end"]) == add_months(new_start, 1)
    searches = usage_of(usage, "searches")
    assert searches["used"] == 0
    assert dt.datetime.fromisoformat(searches["resets_at"]) == dt.datetime.fromisoformat(
        usage["period_end"]
    )
    # Levels do not reset; the members level is recounted from the memberships.
    assert usage_of(usage, "documents")["used"] == 1
    assert usage_of(usage, "members")["used"] == 1
    # The new period has its full quota; the old one stays on record in MySQL.
    for _ in range(3):
        assert (await qclient.post(url, headers=headers)).status_code == 200
    assert (await qclient.post(url, headers=headers)).status_code == 402
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 6

    # Running it again changes nothing.
    again = await asyncio.to_thread(
        lambda: celery_app.send_task("atrium.billing.roll_periods").get(timeout=60)
    )
    assert str(tenant.id) not in again["rolled"]


def test_periods_follow_the_anchor_day_clamped_to_short_months() -> None:
    anchor = dt.datetime(2026, 1, 31, 9, 30, tzinfo=dt.UTC)
    assert add_months(anchor, 1) == dt.datetime(2026, 2, 28, 9, 30, tzinfo=dt.UTC)
    assert add_months(anchor, 2) == dt.datetime(2026, 3, 31, 9, 30, tzinfo=dt.UTC)
    assert add_months(anchor, 13) == dt.datetime(2027, 2, 28, 9, 30, tzinfo=dt.UTC)
    p = period_containing(anchor, dt.datetime(2026, 3, 5, tzinfo=dt.UTC))
    assert (p.start, p.end) == (
        dt.datetime(2026, 2, 28, 9, 30, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 31, 9, 30, tzinfo=dt.UTC),
    )
    p = period_containing(anchor, dt.datetime(2026, 3, 31, 9, 30, tzinfo=dt.UTC))
    assert p.start == dt.datetime(2026, 3, 31, 9, 30, tzinfo=dt.UTC)
    p = period_containing(anchor, dt.datetime(2026, 1, 31, 9, 29, tzinfo=dt.UTC))
    assert p.end == anchor


async def _wait_db_used(app: Any, tenant_id: uuid.UUID, metric: Metric, want: int) -> int:
    deadline = asyncio.get_running_loop().time() + 10
    got = await _db_used(app, tenant_id, metric)
    while got != want and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        got = await _db_used(app, tenant_id, metric)
    return got


async def test_batched_settlements_hold_capacity_until_written(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    """Searches are written to MySQL in batches; until then their reservations hold the
    capacity, so the limit is exact in the gap, and the timer writes them without any read."""
    tenant, _ = await _limited_tenant(quota_app, qclient, searches_per_month=5)
    other, _ = await _limited_tenant(quota_app, qclient, searches_per_month=None)
    quota = Quota.of(quota_app)
    for _ in range(3):
        await (await quota.reserve(tenant.id, Metric.searches, 1).acquire()).record_later()
    for _ in range(4):
        await (await quota.reserve(other.id, Metric.searches, 1).acquire()).record_later()
    # Queued, not yet written: MySQL has nothing, Redis still holds the three as reserved.
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 0
    admitted = 0
    for _ in range(4):
        try:
            await (await quota.reserve(tenant.id, Metric.searches, 1).acquire()).record_later()
            admitted += 1
        except QuotaExceeded:
            pass
    assert admitted == 2
    # The timer writes both tenants' settlements in one batch.
    assert await _wait_db_used(quota_app, tenant.id, Metric.searches, 5) == 5
    assert await _wait_db_used(quota_app, other.id, Metric.searches, 4) == 4
    figures = await quota.usage_of(tenant.id, Metric.searches)
    assert (figures.used, figures.reserved) == (5, 0)


async def test_a_batch_survives_a_database_outage_and_a_deleted_tenant(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    from atrium.kit.db import create_engine, create_sessionmaker
    from atrium.models import Tenant

    tenant, _ = await _limited_tenant(quota_app, qclient, searches_per_month=None)
    gone, _ = await _limited_tenant(quota_app, qclient, searches_per_month=None)
    quota = Quota.of(quota_app)
    await (await quota.reserve(gone.id, Metric.searches, 1).acquire()).record_later()
    await (await quota.reserve(tenant.id, Metric.searches, 2).acquire()).record_later()
    async with quota_app.state.sessionmaker() as s:
        await s.execute(Tenant.__table__.delete().where(Tenant.id == gone.id))
        await s.commit()

    # The billing database is unreachable (a real connection refused, nothing mocked): the
    # batch is kept, not lost.
    real = quota.sessionmaker
    broken = create_engine("mysql+aiomysql://nobody@127.0.0.1:9/none", pool_size=1)
    quota.sessionmaker = create_sessionmaker(broken)
    try:
        await quota.flush()
    finally:
        quota.sessionmaker = real
        await broken.dispose()
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 0
    # Back up: the kept batch is written; the deleted tenant's share does not hold it up.
    await quota.flush()
    assert await _db_used(quota_app, tenant.id, Metric.searches) == 2
    assert await _db_used(quota_app, gone.id, Metric.searches) == 0


async def test_a_reservation_with_reads_alongside_survives_a_script_flush(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    """Search reserves and reads its cache versions in one pipeline (EVALSHA by hash): a Redis
    that lost its scripts (restart, SCRIPT FLUSH) still admits exactly."""
    tenant, _ = await _limited_tenant(quota_app, qclient, searches_per_month=2)
    quota = Quota.of(quota_app)
    redis = quota_app.state.redis
    await redis.hset(f"probe:{tenant.id}", mapping={"a": "1"})
    await redis.script_flush()
    held = await quota.reserve(tenant.id, Metric.searches, 1).acquire(
        [("HGETALL", f"probe:{tenant.id}")]
    )
    assert held.replies == [{"a": "1"}]
    await held.record_later()
    await (await quota.reserve(tenant.id, Metric.searches, 1).acquire()).record_later()
    with pytest.raises(QuotaExceeded):
        await quota.reserve(tenant.id, Metric.searches, 1).acquire([("HGETALL", "x")])
    assert (await quota.usage_of(tenant.id, Metric.searches)).used == 2
    await redis.delete(f"probe:{tenant.id}")


async def test_a_rate_limit_checked_with_a_hold_is_counted_once_and_holds_nothing_when_over(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    """A metered request's rate-limit check runs in its hold's script (``lua/admit.lua``).
    It is counted once even when the hold is retried (Redis lost the plan snapshot, the
    counters and the scripts), a request the plan refuses still counts, and a request over
    the limit is refused before anything is held."""
    tenant, _ = await _limited_tenant(quota_app, qclient, searches_per_month=1)
    quota = Quota.of(quota_app)
    redis = quota_app.state.redis
    bucket = ratelimit.Bucket(f"atrium:t:{tenant.id}:rl:key:probe", 3, 60, "tenant-key")
    await (await quota.reserve(tenant.id, Metric.searches, 1).acquire()).release()
    await redis.flushdb()
    await redis.script_flush()
    states: list[ratelimit.RateLimitState] = []
    held = await quota.reserve(tenant.id, Metric.searches, 1).acquire(
        [("GET", "nothing")], rate_limit=bucket, rate_limits=states
    )
    assert held.replies == [None]
    assert [s.remaining for s in states] == [2]
    assert await redis.zcard(bucket.key) == 1
    await held.record_later()
    for left in (1, 0):
        with pytest.raises(QuotaExceeded):
            await quota.reserve(tenant.id, Metric.searches, 1).acquire(
                rate_limit=bucket, rate_limits=states
            )
        assert states[-1].remaining == left
    with pytest.raises(TooManyRequests) as over:
        await quota.reserve(tenant.id, Metric.searches, 1).acquire(
            rate_limit=bucket, rate_limits=states
        )
    assert over.value.headers is not None and int(over.value.headers["Retry-After"]) > 0
    assert await redis.zcard(bucket.key) == 3
    figures = await quota.usage_of(tenant.id, Metric.searches)
    assert (figures.used, figures.reserved) == (1, 0)


async def test_a_hold_of_several_metrics_is_all_or_none_and_sees_plan_changes(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    """``Quota.hold`` (a document's tokens and chunks in one script): nothing is held when one
    metric does not fit, a counter lost in Redis is rebuilt, and the plan snapshot it keeps in
    the process is dropped as soon as the plan changes."""
    tenant, _ = await _limited_tenant(
        quota_app, qclient, embedding_tokens_per_month=1000, chunks=10
    )
    quota = Quota.of(quota_app)
    tokens, chunks = await quota.hold(
        tenant.id, [(Metric.embedding_tokens, 600), (Metric.chunks, 4)]
    )
    await tokens.record_later()
    await chunks.record_later()
    await quota.flush()
    assert await _db_used(quota_app, tenant.id, Metric.embedding_tokens) == 600
    assert await _db_used(quota_app, tenant.id, Metric.chunks) == 4
    # Chunks fit, tokens do not: neither is held.
    with pytest.raises(QuotaExceeded) as refused:
        await quota.hold(tenant.id, [(Metric.chunks, 1), (Metric.embedding_tokens, 401)])
    assert refused.value.metric is Metric.embedding_tokens
    for metric in (Metric.chunks, Metric.embedding_tokens):
        assert (await quota.usage_of(tenant.id, metric)).reserved == 0
    # Released work counts nothing; a zero amount holds nothing.
    tokens, chunks = await quota.hold(
        tenant.id, [(Metric.embedding_tokens, 400), (Metric.chunks, 0)]
    )
    await tokens.release()
    await chunks.record_later()
    assert (await quota.usage_of(tenant.id, Metric.embedding_tokens)).reserved == 0
    # Redis lost the counters: rebuilt from MySQL, still exact.
    await quota.redis.flushdb()
    with pytest.raises(QuotaExceeded):
        await quota.hold(tenant.id, [(Metric.chunks, 7)])
    # A plan change applies to the very next hold.
    admin = await superuser_headers(quota_app)
    await set_plan(
        qclient, admin, tenant.id, "free", {"requests_per_minute_per_user": None, "chunks": 20}
    )
    (held,) = await quota.hold(tenant.id, [(Metric.chunks, 7)])
    await held.release()


async def test_a_batch_written_within_a_unit_of_work_follows_its_outcome(
    quota_app: Any, qclient: httpx.AsyncClient
) -> None:
    """``flush(within=...)``: the figures commit with the caller's rows; a rollback queues
    the work again (still held), and Redis shows it only once MySQL has it."""
    tenant, _ = await _limited_tenant(quota_app, qclient, embedding_tokens_per_month=100)
    quota = Quota(quota_app.state.redis, quota_app.state.sessionmaker, quota_app.state.settings)
    (held,) = await quota.hold(tenant.id, [(Metric.embedding_tokens, 60)])
    await held.record_later()

    async def fails_after_the_flush() -> None:
        async with unit_of_work(quota_app.state.sessionmaker) as session:
            await quota.flush(within=session)
            raise RuntimeError("the caller's own write failed")

    with pytest.raises(RuntimeError):
        await fails_after_the_flush()
    assert await _db_used(quota_app, tenant.id, Metric.embedding_tokens) == 0
    figures = await quota.usage_of(tenant.id, Metric.embedding_tokens)  # flushes the requeued
    assert (figures.used, figures.reserved) == (60, 0)
    (held,) = await quota.hold(tenant.id, [(Metric.embedding_tokens, 40)])
    await held.record_later()
    async with unit_of_work(quota_app.state.sessionmaker) as session:
        await quota.flush(within=session)
        # Not committed yet: the hold still keeps the capacity, MySQL does not have it.
        with pytest.raises(QuotaExceeded):
            await quota.hold(tenant.id, [(Metric.embedding_tokens, 1)])
    assert await _db_used(quota_app, tenant.id, Metric.embedding_tokens) == 100
    figures = await quota.usage_of(tenant.id, Metric.embedding_tokens)
    assert (figures.used, figures.reserved) == (100, 0)
    await quota.close()
