"""The one reserve path: admitting reservations against a tenant's limits in one Redis script.

The plan snapshot is kept in the engine and checked in the same script (the JSON in Redis must
still have the SHA-1 it had): a plan change, which drops that key, is seen by the next
reservation, without a read of its own.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import NoScriptError

from atrium.billing.quota.metrics import QuotaExceeded
from atrium.billing.quota.periods import period_of, utcnow
from atrium.billing.quota.snapshot import (
    TenantBilling,
    billing_cache_key,
    reservations_key,
    usage_key,
)
from atrium.kit import metrics as prometheus
from atrium.kit import ratelimit
from atrium.kit.ratelimit import Bucket, RateLimitState

if TYPE_CHECKING:
    from atrium.billing.quota.engine import Quota
    from atrium.billing.quota.reservation import Reservation

log = structlog.get_logger("atrium.billing.quota")

#: Tries of the reservation script before giving up (each retry follows a plan change or a
#: rebuild of a counter that Redis lost).
_PLACE_ATTEMPTS = 5


async def place(
    quota: Quota,
    tenant_id: uuid.UUID,
    reservations: Sequence[Reservation],
    alongside: Sequence[tuple[str, ...]] = (),
    replies: list[Any] | None = None,
    *,
    writes: Sequence[tuple[Any, ...]] = (),
    rate_limit: Bucket | None = None,
    rate_limits: list[RateLimitState] | None = None,
) -> None:
    """Admit ``reservations`` of ``tenant_id`` (all or none) with ``lua/reserve.lua``.

    Args:
        quota: the engine.
        tenant_id: whose quota.
        reservations: of that tenant, not placed yet; an amount of 0 holds nothing.
        alongside: Redis commands sent in the same round trip; their replies are appended
            to ``replies``.
        replies: where the replies of ``alongside`` go.
        writes: best-effort Redis writes sent in the same round trip (a search's queued
            result-cache fills); their replies are dropped, a failure is logged.
        rate_limit: a rate-limit bucket to count the request against first, in the same
            script (``lua/admit.lua``): a refused request holds nothing.
        rate_limits: where the rate limit's outcome goes (the request's ``X-RateLimit-*``).

    Raises:
        TooManyRequests: ``rate_limit`` refused the request (then nothing is held).
        QuotaExceeded: for the first metric that does not fit (then nothing is held).
    """
    live = [r for r in reservations if r.amount > 0]
    reads = list(alongside)
    out = replies if replies is not None else []
    states = rate_limits if rate_limits is not None else []
    check = None
    if rate_limit is not None:
        if live:
            check = ratelimit.prepare(rate_limit)
        else:  # nothing to hold: the check on its own
            state = await ratelimit.hit(quota.redis, rate_limit)
            ratelimit.admit(state, states, tenant_id=str(tenant_id))
    stale = False
    for _ in range(_PLACE_ATTEMPTS):
        digest, billing = await verified_billing(quota, tenant_id, stale=stale)
        stale = False
        if not live:
            if reads:
                async with quota.redis.pipeline(transaction=False) as pipe:
                    for command in reads:
                        pipe.execute_command(*command)
                    for command in writes:
                        pipe.execute_command(*command)
                    done = await pipe.execute(raise_on_error=False)
                out.extend(_checked(done[: len(reads)]))
                _dropped(done[len(reads) :])
            elif writes:
                await _send(quota, writes)
            break
        now_ms = int(utcnow().timestamp() * 1000)
        keys: list[str] = [billing_cache_key(tenant_id)]
        args: list[Any] = [digest, now_ms]
        limits: list[int | None] = []
        for r in live:
            limit = billing.limit(quota.catalog, r.metric.limit)
            tag, _ = period_of(billing.period, r.metric)
            keys += [usage_key(tenant_id, tag), reservations_key(tenant_id, tag, r.metric)]
            args += [
                r.metric.value,
                r.amount,
                -1 if limit is None else limit,
                now_ms + r.ttl * 1000,
                r.member,
                r.ttl * 1000 + 60_000,
            ]
            limits.append(limit)
        reply = await _run(quota, keys, args, reads, out, check, writes)
        reads, writes = [], []  # sent once, with the first try
        if check is not None:
            # Counted once, with the first try: a retry (a plan change, a rebuilt counter)
            # only holds.
            state = ratelimit.outcome(check, reply[0])
            ratelimit.admit(state, states, tenant_id=str(tenant_id))
            reply = reply[1]
            check = None
        status = int(reply[0])
        if status == -2:
            stale = True
            continue
        if status == -1:
            await quota.ensure_loaded(billing, live[int(reply[1]) - 1].metric)
            continue
        if status == 0:
            index = int(reply[1]) - 1
            refused, limit = live[index], limits[index]
            assert limit is not None
            prometheus.record_quota_rejection(refused.metric.value)
            raise QuotaExceeded(
                refused.metric,
                limit,
                int(reply[2]) + int(reply[3]),
                None if refused.metric.is_level else billing.period.end,
                billing.plan,
            )
        for r in live:
            r.held = True
        break
    else:
        raise RuntimeError("quota holds could not be placed (counters or plan kept changing)")
    for r in reservations:
        r.billing = billing


async def verified_billing(
    quota: Quota, tenant_id: uuid.UUID, *, stale: bool
) -> tuple[str, TenantBilling]:
    """The snapshot reservations are checked against, with the SHA-1 of its JSON in Redis."""
    now = utcnow()
    entry = None if stale else quota.snapshots.verified(tenant_id, now)
    if entry is not None:
        return entry
    raw = await quota.redis.get(billing_cache_key(tenant_id))
    snapshot = TenantBilling.from_json(str(raw)) if raw else None
    if snapshot is None or snapshot.period.end <= now:
        # Loads it from MySQL and puts exactly this JSON in Redis.
        snapshot = await quota.billing(tenant_id, fresh=True)
        raw = snapshot.to_json()
    digest = hashlib.sha1(str(raw).encode(), usedforsecurity=False).hexdigest()
    return quota.snapshots.verify(digest, snapshot)


async def _run(
    quota: Quota,
    keys: list[str],
    args: list[Any],
    reads: list[tuple[str, ...]],
    out: list[Any],
    check: ratelimit.Check | None = None,
    writes: Sequence[tuple[Any, ...]] = (),
) -> Any:
    """The reservation script, with ``reads`` and ``writes`` in the same round trip.

    With a rate-limit ``check``: ``lua/admit.lua`` (the check, then the reservation), whose
    reply is ``[verdict]`` or ``[verdict, reservation reply]``.
    """
    script = quota.scripts.reserve
    if check is not None:
        script = quota.scripts.admit
        keys = [check.bucket.key, *keys]
        args = [*check.args, *args]
    if not reads and not writes:
        return await script(keys=keys, args=args)
    # EVALSHA, not the Script object: in a pipeline that would first ask SCRIPT EXISTS (a
    # round trip).
    async with quota.redis.pipeline(transaction=False) as pipe:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        for command in reads:
            pipe.execute_command(*command)
        for command in writes:
            pipe.execute_command(*command)
        replies = await pipe.execute(raise_on_error=False)
    out.extend(_checked(replies[1 : 1 + len(reads)]))
    _dropped(replies[1 + len(reads) :])
    if isinstance(replies[0], NoScriptError):
        # Redis lost its scripts (a restart, SCRIPT FLUSH): the Script object loads it.
        return await script(keys=keys, args=args)
    if isinstance(replies[0], Exception):
        raise replies[0]
    return replies[0]


def _checked(replies: Sequence[Any]) -> list[Any]:
    """The replies of reads, raising the first error among them."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


def _dropped(replies: Sequence[Any]) -> None:
    """Best-effort writes: a failure is logged, never raised to the caller."""
    failed = [r for r in replies if isinstance(r, Exception)]
    if failed:
        log.warning("carried_write_failed", writes=len(failed), error=str(failed[0]))


async def _send(quota: Quota, writes: Sequence[tuple[Any, ...]]) -> None:
    """Best-effort writes in a round trip of their own (nothing else was sent)."""
    try:
        async with quota.redis.pipeline(transaction=False) as pipe:
            for command in writes:
                pipe.execute_command(*command)
            _dropped(await pipe.execute(raise_on_error=False))
    except Exception as exc:  # a best-effort write is never worth a failure
        log.warning("carried_write_failed", writes=len(writes), error=str(exc))
