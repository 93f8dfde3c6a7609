"""The quota engine (:class:`Quota`): snapshots, reservations, level changes and figures.

One engine per process side: the app builds its own in the lifespan (:func:`open_quota`), a
worker task builds one from its :class:`~atrium.kit.runtime.Resources`. The engine owns its
state (snapshot caches, the batch of settled work); nothing is kept at module level.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from atrium.billing.plans import Limit, PlanCatalog, get_catalog
from atrium.billing.quota import repository, reserving
from atrium.billing.quota.alerts import maybe_alert
from atrium.billing.quota.batching import Batch
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.periods import hash_ttl_ms, period_of, utcnow
from atrium.billing.quota.reservation import Reservation
from atrium.billing.quota.scripts import Scripts
from atrium.billing.quota.snapshot import (
    BILLING_CACHE_SECONDS,
    MetricUsage,
    SnapshotCache,
    TenantBilling,
    billing_cache_key,
    reservations_key,
    usage_key,
)
from atrium.config import Settings
from atrium.kit.db import create_engine, create_sessionmaker, write_session
from atrium.kit.ratelimit import Bucket, RateLimitState

if TYPE_CHECKING:
    from atrium.kit.runtime import Resources

log = structlog.get_logger("atrium.billing.quota")

#: Seconds a reservation holds capacity when its holder never settles nor releases it.
DEFAULT_RESERVATION_TTL = 600


class Quota:
    """Reservations, settlements and figures for every tenant.

    Get the app's with :meth:`of`, a worker task's with :meth:`for_resources`.
    """

    def __init__(
        self,
        redis: Redis,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        catalog: PlanCatalog | None = None,
        *,
        snapshots: SnapshotCache | None = None,
    ) -> None:
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.catalog = catalog or get_catalog()
        self.scripts = Scripts.on(redis)
        self.snapshots = snapshots or SnapshotCache()
        #: Settled work waiting for its write (see :meth:`Reservation.record_later`).
        self.batch = Batch(self)

    @classmethod
    def of(cls, source: HTTPConnection | Starlette) -> Quota:
        """The app's engine, from a request (or websocket) or the app itself."""
        app: Starlette = source.app if isinstance(source, HTTPConnection) else source
        quota: Quota | None = getattr(app.state, "quota", None)
        # Built in the lifespan; built here for an app used without it (a test calling a
        # service on an app whose lifespan has ended).
        return quota if quota is not None else open_quota(app)

    @classmethod
    def for_resources(cls, res: Resources) -> Quota:
        """An engine for a worker task, on the task's pools."""
        return cls(res.redis, res.sessionmaker, res.settings)

    def with_own_batch(self) -> Quota:
        """An engine sharing this one's connections and snapshot caches, with a batch of its
        own (a document's settlements are written with its own row, not with its neighbours')."""
        return Quota(
            self.redis, self.sessionmaker, self.settings, self.catalog, snapshots=self.snapshots
        )

    # Billing snapshot ---------------------------------------------------------------------------

    async def billing(self, tenant_id: uuid.UUID, *, fresh: bool = False) -> TenantBilling:
        """The tenant's plan, overrides and current period (cached; rolls the period over when
        beat has not yet).

        Raises:
            NotFound: when the tenant does not exist.
        """
        now = utcnow()
        if not fresh:
            recent = self.snapshots.recent(tenant_id, now)
            if recent is not None:
                return recent
            raw = await self.redis.get(billing_cache_key(tenant_id))
            if raw:
                cached = TenantBilling.from_json(str(raw))
                if cached.period.end > now:
                    self.snapshots.remember(cached)
                    return cached

        async def load() -> TenantBilling:
            async with self.sessionmaker() as session:
                loaded = await repository.load_billing(session, tenant_id, now)
                await session.commit()
                return loaded

        snapshot = await repository.with_retry(load)
        ttl = min(BILLING_CACHE_SECONDS, int((snapshot.period.end - now).total_seconds()) + 1)
        await self.redis.set(billing_cache_key(tenant_id), snapshot.to_json(), ex=max(1, ttl))
        self.snapshots.remember(snapshot)
        return snapshot

    async def forget_billing(self, tenant_id: uuid.UUID | str) -> None:
        """Drop the cached snapshot (after a plan change, an override or a rollover)."""
        self.snapshots.forget(tenant_id)
        await self.redis.delete(billing_cache_key(tenant_id))

    async def limits(self, tenant_id: uuid.UUID) -> dict[Limit, int | None]:
        """The tenant's effective limits."""
        return (await self.billing(tenant_id)).limits(self.catalog)

    # Reservations -------------------------------------------------------------------------------

    def reserve(
        self,
        tenant_id: uuid.UUID,
        metric: Metric,
        amount: int,
        *,
        ttl_seconds: int = DEFAULT_RESERVATION_TTL,
        defer_to: AsyncSession | None = None,
    ) -> Reservation:
        """A reservation of ``amount`` of ``metric``; use it as ``async with``.

        On entry it is admitted or raises :class:`QuotaExceeded` (402). On a clean exit the
        settled amount (default: ``amount``) is recorded; when the block raises before
        :meth:`Reservation.settle` was called, the reservation is given back.

        Args:
            tenant_id: whose quota.
            metric: what is used.
            amount: how much to hold.
            ttl_seconds: how long the hold lasts if the holder dies without settling.
            defer_to: on SQLite, the request's unit of work whose commit the record waits for.
        """
        return Reservation(self, tenant_id, metric, amount, ttl_seconds, defer_to)

    async def hold(
        self,
        tenant_id: uuid.UUID,
        holds: Sequence[tuple[Metric, int]],
        *,
        ttl_seconds: int = DEFAULT_RESERVATION_TTL,
    ) -> list[Reservation]:
        """Hold several metrics at once, all or none, in one Redis round trip.

        For work that knows all its amounts up front (a document: its embedding tokens and
        chunks). Settle or release each returned reservation as usual; an amount of 0 holds
        nothing.

        Raises:
            QuotaExceeded: for the first metric that does not fit (then nothing is held).
        """
        reservations = [Reservation(self, tenant_id, m, a, ttl_seconds) for m, a in holds]
        await self.place(tenant_id, reservations)
        return reservations

    async def place(
        self,
        tenant_id: uuid.UUID,
        reservations: Sequence[Reservation],
        alongside: Sequence[tuple[str, ...]] = (),
        replies: list[Any] | None = None,
        *,
        writes: Sequence[tuple[Any, ...]] = (),
        rate_limit: Bucket | None = None,
        rate_limits: list[RateLimitState] | None = None,
    ) -> None:
        """Admit ``reservations`` (all or none) in one script: the one reserve path (see
        :func:`atrium.billing.quota.reserving.place`, which also counts ``rate_limit``).

        Raises:
            TooManyRequests: ``rate_limit`` refused the request (then nothing is held).
            QuotaExceeded: for the first metric that does not fit (then nothing is held).
        """
        await reserving.place(
            self,
            tenant_id,
            reservations,
            alongside,
            replies,
            writes=writes,
            rate_limit=rate_limit,
            rate_limits=rate_limits,
        )

    async def ensure_loaded(self, billing: TenantBilling, metric: Metric) -> None:
        """Rebuild the Redis hash of ``metric``'s period from MySQL if Redis lost it."""
        tag, period_start = period_of(billing.period, metric)
        key = usage_key(billing.tenant_id, tag)
        if await self.redis.hexists(key, "_loaded"):
            return
        async with self.sessionmaker() as session:
            rows = await repository.read_counters(session, billing.tenant_id, period_start)
        args: list[Any] = [hash_ttl_ms(billing.period, metric)]
        for name, used, version in rows:
            args.extend([name, used, version])
        if await self.scripts.load(keys=[key], args=args):
            log.info(
                "usage_rebuilt", tenant_id=str(billing.tenant_id), period=tag, metrics=len(rows)
            )

    # Levels -------------------------------------------------------------------------------------

    async def adjust(self, tenant_id: uuid.UUID, metric: Metric, delta: int) -> int:
        """Change a level without a limit check (``-1`` when a document is deleted...).

        Returns:
            The new figure.
        """
        if delta == 0:
            return (await self.usage_of(tenant_id, metric)).used
        return await self._apply(await self.billing(tenant_id), metric, delta)

    async def set_level(self, tenant_id: uuid.UUID, metric: Metric, value: int) -> int:
        """Set a level to a value counted from the real rows (reconciliation)."""
        if not metric.is_level:
            raise ValueError(f"{metric} is a monthly total; only levels can be set")
        return await self._apply(await self.billing(tenant_id), metric, value, absolute=True)

    async def _apply(
        self, billing: TenantBilling, metric: Metric, delta: int, *, absolute: bool = False
    ) -> int:
        """Record a change that settles no reservation in MySQL, then mirror it in Redis."""
        tag, period_start = period_of(billing.period, metric)

        async def write() -> tuple[int, int]:
            async with write_session(self.sessionmaker) as session:
                used, version = await repository.add_to_counter(
                    session, billing.tenant_id, metric, period_start, delta, absolute=absolute
                )
                await repository.record_daily(session, billing.tenant_id, metric, delta, used)
                await session.commit()
                return used, version

        used, version = await repository.with_retry(write)
        await self.scripts.settle(
            keys=[
                usage_key(billing.tenant_id, tag),
                reservations_key(billing.tenant_id, tag, metric),
            ],
            args=[metric.value, "", used, version, hash_ttl_ms(billing.period, metric)],
        )
        if delta > 0 or absolute:
            await maybe_alert(self, billing, metric, used)
        return used

    # Batched writes -----------------------------------------------------------------------------

    async def flush(self, within: AsyncSession | None = None) -> None:
        """Write the settled work queued so far (see :meth:`Batch.flush`)."""
        await self.batch.flush(within)

    async def close(self) -> None:
        """Write what is queued and wait for writes in flight (at shutdown)."""
        await self.batch.close()

    # Figures ------------------------------------------------------------------------------------

    async def usage_of(self, tenant_id: uuid.UUID, metric: Metric) -> MetricUsage:
        """One metric's figures (rebuilding Redis from MySQL if needed)."""
        return (await self.usage(tenant_id, [metric]))[0]

    async def usage(
        self, tenant_id: uuid.UUID, metrics: list[Metric] | None = None
    ) -> list[MetricUsage]:
        """Every metric's used, reserved, limit and reset time, from the Redis counters
        (rebuilt from MySQL when Redis lost them)."""
        await self.flush()
        billing = await self.billing(tenant_id)
        limits = billing.limits(self.catalog)
        metrics = metrics or list(Metric)
        # One rebuild check per period hash (levels, this month), then one round trip.
        for kind in {m.is_level: m for m in metrics}.values():
            await self.ensure_loaded(billing, kind)
        now_ms = int(utcnow().timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for metric in metrics:
                tag, _ = period_of(billing.period, metric)
                pipe.hget(usage_key(tenant_id, tag), metric.value)
                pipe.zrangebyscore(reservations_key(tenant_id, tag, metric), now_ms, "+inf")
            replies = await pipe.execute()
        out: list[MetricUsage] = []
        for i, metric in enumerate(metrics):
            used_raw, members = replies[2 * i], replies[2 * i + 1]
            out.append(
                MetricUsage(
                    metric=metric,
                    used=int(used_raw or 0),
                    reserved=sum(int(m.rsplit(":", 1)[1]) for m in members),
                    limit=limits[metric.limit],
                    resets_at=None if metric.is_level else billing.period.end,
                )
            )
        return out


# The app's engine --------------------------------------------------------------------------------


def open_quota(app: Starlette) -> Quota:
    """Build the app's engine on its own small pool and keep both on ``app.state``.

    Quota writes use their own pool: a request already holds a connection of the main pool
    for its whole unit of work, and borrowing a second one from the same pool deadlocks once
    every connection is held by a request waiting for its second.
    """
    settings: Settings = app.state.settings
    # On SQLite a quota write waits at most a few seconds for the write lock, so a write that
    # can never get it (see context.sqlite_unit_of_work) fails loudly instead of stalling the
    # request for the default 30 s per attempt.
    engine = create_engine(settings.resolved_database_url, pool_size=5, busy_timeout=5.0)
    app.state.quota_engine = engine
    app.state.quota_sessionmaker = create_sessionmaker(engine)
    quota = Quota(app.state.redis, app.state.quota_sessionmaker, settings)
    app.state.quota = quota
    return quota


async def close_quota(app: Starlette) -> None:
    """Write the queued settlements, then dispose the quota pool (at shutdown)."""
    quota: Quota | None = getattr(app.state, "quota", None)
    if quota is not None:
        await quota.close()
    engine = getattr(app.state, "quota_engine", None)
    if engine is not None:
        await engine.dispose()
        app.state.quota_engine = None
        app.state.quota_sessionmaker = None
        app.state.quota = None
