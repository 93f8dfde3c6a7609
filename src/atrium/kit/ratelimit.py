"""Rate limits: fastapi-limiter 0.2 on pyrate-limiter's Redis bucket, one bucket per identifier.

fastapi-limiter 0.2 hands every identifier to ONE pyrate-limiter bucket unless the limiter's
bucket factory routes each identifier to its own bucket, and it answers 429 without
``Retry-After``. This module keeps its ``RateLimiter`` interface (limiter, identifier, callback)
and fixes both: :class:`PerIdentifierRedisBucketFactory` gives every identifier its own Redis
sorted set (pyrate-limiter's sliding-window log and its atomic Lua check-and-insert), and every
limited response carries::

    X-RateLimit-Limit      requests allowed per window
    X-RateLimit-Remaining  requests left in the current window
    X-RateLimit-Reset      seconds until Remaining next goes up (the oldest counted request
                           leaves the window)
    Retry-After            on 429 only: seconds to wait before retrying

Use it two ways:

* anonymous and account routes::

      @router.post("/auth/login", dependencies=[
          Depends(rate_limit("login", 20, 60)),                                  # per IP
          Depends(rate_limit("login-email", 5, 300, key=by_field("username"))),  # per account
      ])

  The identifiers (:func:`~atrium.kit.ratelimit_identifiers.by_ip`, the default, and
  :func:`~atrium.kit.ratelimit_identifiers.by_field`) are in ``kit.ratelimit_identifiers``.

* tenant routes: :func:`tenant_bucket` once the caller is known (per API key, with the key's
  own ``rate_limit_per_minute`` when set, else per user; billing supplies the plan's limits),
  counted by :func:`hit` and :func:`admit`, or, on the metered search and answer routes,
  inside the quota hold's own Redis script (:mod:`atrium.billing.quota.reserving`): one round
  trip for both.

Redis keys: ``atrium:rl:<name>:<identifier>`` for anonymous limits and
``atrium:t:<tenant_id>:rl:<kind>:<id>`` for tenant limits, so a tenant purge that deletes
``atrium:t:<tenant_id>:*`` removes its buckets. Identifiers that are personal data (e-mail
addresses) are hashed before they reach Redis (``kit.ratelimit_identifiers``).
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import Request
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import BucketFactory, Duration, Limiter, Rate, RateItem, RedisBucket
from pyrate_limiter.abstracts.algorithm import SlidingWindowLog
from pyrate_limiter.buckets.redis_bucket import LuaScript
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from atrium.kit import metrics
from atrium.kit.errors import TooManyRequests
from atrium.kit.ratelimit_identifiers import Identifier, by_ip

log = structlog.get_logger("atrium.ratelimit")

#: pyrate-limiter's default policy (the one ``RedisBucket`` uses): an exact sliding window.
_ALGORITHM = SlidingWindowLog()

#: Where the outcome of each limit checked for this request is kept (``scope["state"]``).
STATE_KEY = "atrium_ratelimit"


@dataclass(frozen=True)
class RateLimitState:
    """The outcome of one limit for one request.

    Attributes:
        name: which limit (``login``, ``tenant-key``...).
        limit: requests allowed per window.
        remaining: requests left in the window after this one.
        reset_seconds: seconds until ``remaining`` goes up.
        retry_after: seconds to wait, when the request was refused; else None.
    """

    name: str
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int | None = None

    @property
    def allowed(self) -> bool:
        """Whether the request was admitted."""
        return self.retry_after is None

    def headers(self) -> dict[str, str]:
        """The ``X-RateLimit-*`` headers (and ``Retry-After`` when refused)."""
        out = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_seconds),
        }
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        return out


#: pyrate-limiter's check-and-insert script, run as is, then the bookkeeping a check needs
#: (trim what left the window, count, oldest entry for the reset time, expiry) in the same
#: script: one EVALSHA per check instead of a pipeline of five commands. Extra arguments:
#: ARGV[8] the newest score to trim, ARGV[9] the key's expiry in ms.
#: Returns {failing rate (-1: admitted), blocking timestamp, count, oldest score or -1}.
HIT_SCRIPT = (
    "local verdict = (function()\n"
    + LuaScript.PUT_ITEM
    + """
end)()
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[8])
local count = redis.call('ZCOUNT', KEYS[1], ARGV[5], '+inf')
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], ARGV[9])
return {verdict[1], verdict[2], count, oldest[2] or -1}
"""
)


class PerIdentifierRedisBucketFactory(BucketFactory):
    """A pyrate-limiter bucket factory that gives every identifier its own Redis bucket.

    The item's name is the full Redis key of the identifier's bucket. Buckets are cheap views
    (a key, the rates and the loaded script hash): a fresh one per check means no shared
    mutable state between concurrent requests (pyrate's buckets remember the last verdict).
    Nothing is scheduled for leaking: :func:`hit` trims and expires the key itself, so idle
    identifiers cost nothing.
    """

    def __init__(self, redis: Redis | None, rates: list[Rate]) -> None:
        self.redis = redis
        self.rates = rates
        self._script_hash: str | None = None
        self._hit_hash: str | None = None

    async def hit_script_hash(self, *, reload: bool = False) -> str:
        """The SHA of :data:`HIT_SCRIPT` (pyrate's check-and-insert plus the bookkeeping)."""
        assert self.redis is not None, "a factory without a Redis client cannot load scripts"
        if self._hit_hash is None or reload:
            self._hit_hash = str(await self.redis.script_load(HIT_SCRIPT))
        return self._hit_hash

    async def script_hash(self, *, reload: bool = False) -> str:
        """The SHA of pyrate-limiter's check-and-insert script, loaded into Redis once."""
        assert self.redis is not None, "a factory without a Redis client cannot load scripts"
        if self._script_hash is None or reload:
            self._script_hash = str(await self.redis.script_load(LuaScript.PUT_ITEM))
        return self._script_hash

    def wrap_item(self, name: str, weight: int = 1) -> RateItem:
        """Stamp the item with the current time in milliseconds (the bucket's clock)."""
        return RateItem(name, time.time_ns() // 1_000_000, weight=weight)

    def get(self, item: RateItem) -> RedisBucket:
        """The bucket of ``item.name`` (call :meth:`script_hash` first)."""
        assert self.redis is not None and self._script_hash is not None, "script_hash() first"
        return RedisBucket(self.rates, self.redis, item.name, self._script_hash)


_factories: dict[tuple[int, int, int], PerIdentifierRedisBucketFactory] = {}


@functools.lru_cache(maxsize=1024)
def _factory_rates(times: int, seconds: int) -> PerIdentifierRedisBucketFactory:
    # The rate and the clock of a check, without a client: computing a check's arguments
    # needs no connection (a metered route sends them inside its quota hold's script).
    return PerIdentifierRedisBucketFactory(None, [Rate(times, Duration.SECOND * seconds)])


def _factory(redis: Redis, times: int, seconds: int) -> PerIdentifierRedisBucketFactory:
    # One factory per (client, rate): the script hash is loaded once per Redis client.
    key = (id(redis), times, seconds)
    factory = _factories.get(key)
    if factory is None or factory.redis is not redis:
        factory = PerIdentifierRedisBucketFactory(redis, [Rate(times, Duration.SECOND * seconds)])
        _factories[key] = factory
    return factory


@dataclass(frozen=True, slots=True)
class Bucket:
    """One identifier's sliding-window bucket: ``times`` requests per ``seconds``.

    Attributes:
        key: the bucket's Redis key (a sorted set).
        times: requests allowed per window.
        seconds: the window.
        name: the limit's name, for logs, metrics and headers.
    """

    key: str
    times: int
    seconds: int
    name: str


@dataclass(frozen=True, slots=True)
class Check:
    """The arguments of one check of :data:`HIT_SCRIPT`, stamped with the time it was made."""

    bucket: Bucket
    now_ms: int
    args: tuple[str | int, ...]


def prepare(bucket: Bucket) -> Check:
    """The script arguments of a check of ``bucket`` now (one request of weight 1).

    They are what pyrate-limiter's sliding-window algorithm computes for its ``RedisBucket``,
    plus the bookkeeping's two: the newest score to trim and the key's expiry in ms.
    """
    factory = _factory_rates(bucket.times, bucket.seconds)
    rate = factory.rates[0]
    item = factory.wrap_item(bucket.key)
    now = item.timestamp
    window_start = _ALGORITHM.window_start(rate, now)
    offset = _ALGORITHM.blocking_offset(rate, item.weight)
    args: tuple[str | int, ...] = (
        now,
        item.weight,
        # Members must be unique in the sorted set (pyrate's own convention).
        f"{bucket.key}:{uuid.uuid4().hex[:16]}:",
        1,
        window_start,
        rate.limit,
        -1 if offset is None else offset,
        window_start - 1,
        bucket.seconds * 1000 + 1000,
    )
    return Check(bucket, now, args)


def outcome(check: Check, verdict: Sequence[Any]) -> RateLimitState:
    """The state of a check from the script's reply ``{failing, blocking, count, oldest}``."""
    bucket = check.bucket
    rate = _factory_rates(bucket.times, bucket.seconds).rates[0]
    interval_ms = bucket.seconds * 1000
    count, oldest = int(verdict[2]), verdict[3]
    failing, blocking = int(verdict[0]), int(verdict[1])
    remaining = max(0, bucket.times - count)
    oldest_ms = int(float(oldest))
    reset_ms = max(0, oldest_ms + interval_ms - check.now_ms) if oldest_ms >= 0 else 0
    retry_after = None
    if failing >= 0:
        retry_ms = _ALGORITHM.retry_after(rate, check.now_ms, blocking if blocking >= 0 else None)
        # Never tell a client to retry in 0 s: it would spin.
        retry_after = max(1, math.ceil(max(retry_ms, reset_ms) / 1000))
    return RateLimitState(
        name=bucket.name or bucket.key,
        limit=bucket.times,
        remaining=remaining,
        reset_seconds=math.ceil(reset_ms / 1000),
        retry_after=retry_after,
    )


async def hit(redis: Redis, bucket: Bucket) -> RateLimitState:
    """Count one request against ``bucket`` (sliding window).

    The check-and-insert is pyrate-limiter's ``RedisBucket`` Lua script with the arguments its
    sliding-window algorithm computes: atomic in Redis, so concurrent requests on any number
    of API replicas never exceed ``times``; a refused request is not counted. It runs in one
    script with the bookkeeping (trim, count, oldest entry, expiry): one command per check.
    (A metered tenant route runs the same script inside its quota hold's instead:
    :mod:`atrium.billing.quota.reserving`.)

    Args:
        redis: the app's Redis client.
        bucket: the identifier's bucket.

    Returns:
        The state to report in headers; ``retry_after`` is set when refused.
    """
    factory = _factory(redis, bucket.times, bucket.seconds)
    check = prepare(bucket)
    for attempt in range(2):
        sha = await factory.hit_script_hash(reload=attempt > 0)
        try:
            verdict = await redis.evalsha(sha, 1, bucket.key, *check.args)
            break
        except NoScriptError:
            # Redis restarted (or SCRIPT FLUSH): load the script again and retry once.
            if attempt:
                raise
    return outcome(check, verdict)


def record_state(request: Request, state: RateLimitState) -> None:
    """Remember ``state`` so the response reports it (:func:`response_headers`)."""
    request_states(request).append(state)


#: ``atrium_rate_limit_rejections_total`` labels of the per-key and per-user tenant buckets.
_METRIC_LABELS = {"tenant-key": "api_key", "tenant-user": "user"}


def raise_if_refused(state: RateLimitState) -> None:
    """Raise 429 with ``Retry-After`` and the ``X-RateLimit-*`` headers when refused.

    Every rate-limit 429 goes through here, so every one is counted in
    ``atrium_rate_limit_rejections_total`` (label: the limit's name).

    Raises:
        TooManyRequests: when ``state`` refused the request.
    """
    if state.allowed:
        return
    metrics.record_rate_limit_rejection(_METRIC_LABELS.get(state.name, state.name))
    raise TooManyRequests(
        f"Too many requests; retry in {state.retry_after} s",
        detail={
            "message": f"Too many requests; retry in {state.retry_after} s",
            "limit": state.limit,
            "retry_after": state.retry_after,
        },
        headers=state.headers(),
    )


# The dependency --------------------------------------------------------------------------------


async def _refuse(request: Request, state: RateLimitState) -> None:
    raise_if_refused(state)


class RateLimit(RateLimiter):
    """A fastapi-limiter ``RateLimiter`` with a Redis bucket per identifier and full headers.

    Prefer :func:`rate_limit` to build one.
    """

    def __init__(self, name: str, times: int, seconds: int, key: Identifier = by_ip) -> None:
        if times < 1 or seconds < 1:
            raise ValueError("a rate limit needs times >= 1 and seconds >= 1")
        self.name = name
        self.times = times
        self.seconds = seconds
        # The pyrate Limiter is kept for fastapi-limiter's interface, over a per-identifier
        # factory (a Limiter built from bare rates would start a leaker thread per limit);
        # checks go through :func:`hit` (the Limiter would serialise them behind one lock).
        rates = [Rate(times, Duration.SECOND * seconds)]
        limiter = Limiter(PerIdentifierRedisBucketFactory(None, rates))
        super().__init__(limiter=limiter, identifier=key, callback=_refuse, blocking=False)

    def __repr__(self) -> str:
        return f"rate_limit({self.name!r}, {self.times}, {self.seconds})"

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        identifier = await self.identifier(request)
        if identifier is None:
            return
        redis: Redis = request.app.state.redis
        bucket = Bucket(f"atrium:rl:{self.name}:{identifier}", self.times, self.seconds, self.name)
        state = await hit(redis, bucket)
        record_state(request, state)
        if not state.allowed:
            log.info("rate_limited", limit=self.name, identifier=identifier)
            await self.callback(request, state)


def rate_limit(name: str, times: int, seconds: int, key: Identifier = by_ip) -> RateLimit:
    """A route dependency: at most ``times`` requests per ``seconds`` per identifier.

    Args:
        name: the limit's name, unique per purpose (``login``, ``login-email``...); requests
            with the same name and identifier share a bucket, whatever the route.
        times: requests allowed in the window.
        seconds: the sliding window.
        key: how to identify the caller (``kit.ratelimit_identifiers``): :func:`by_ip` (default)
            or :func:`~atrium.kit.ratelimit_identifiers.by_field`.

    Example:
        ``dependencies=[Depends(rate_limit("forgot-password", 5, 3600, key=by_field("email")))]``
    """
    return RateLimit(name, times, seconds, key)


def tenant_bucket(
    *, tenant_id: uuid.UUID | str, kind: str, subject_id: uuid.UUID | str, per_minute: int | None
) -> Bucket | None:
    """The per-minute bucket of a tenant route's caller, or None when it is unlimited.

    Args:
        tenant_id: the tenant of the path (part of the Redis key).
        kind: ``key`` (API key) or ``user``.
        subject_id: the API key's or the user's id.
        per_minute: requests per minute; None means unlimited.
    """
    if per_minute is None:
        return None
    return Bucket(
        f"atrium:t:{tenant_id}:rl:{kind}:{subject_id}",
        max(1, per_minute),
        60,
        f"tenant-{kind}",
    )


def admit(state: RateLimitState, states: list[RateLimitState], **fields: str) -> None:
    """Report ``state`` on the response (``states``: the request's list) and refuse when over
    (``fields``: what the log line of a refusal says about the caller).

    Raises:
        TooManyRequests: over the limit (with ``Retry-After`` and the ``X-RateLimit-*`` headers).
    """
    states.append(state)
    if not state.allowed:
        log.info("rate_limited", limit=state.name, **fields)
    raise_if_refused(state)


def request_states(request: Request) -> list[RateLimitState]:
    """The request's limit outcomes, which its response reports (:func:`response_headers`)."""
    states: list[RateLimitState] = request.scope.setdefault("state", {}).setdefault(STATE_KEY, [])
    return states


# Headers on every limited response --------------------------------------------------------------


def _most_restrictive(states: list[RateLimitState]) -> RateLimitState:
    refused = [s for s in states if not s.allowed]
    if refused:
        return max(refused, key=lambda s: s.retry_after or 0)
    return min(states, key=lambda s: (s.remaining, -s.reset_seconds))


def response_headers(state: dict[str, Any], present: set[bytes]) -> list[tuple[bytes, bytes]]:
    """The ``X-RateLimit-*`` headers (and ``Retry-After``) of a response, from the limits the
    request was counted against (``scope["state"]``), minus those it already carries.

    Dependencies cannot set headers on error responses or on responses the endpoint builds
    itself (streams, files), so the limits record their outcome in the request state and the
    request middleware (:class:`atrium.kit.logging.RequestContextMiddleware`) writes the most
    restrictive one into the response start of every limited route, errors included.
    """
    states: list[RateLimitState] = state.get(STATE_KEY) or []
    if not states:
        return []
    out = []
    for name, value in _most_restrictive(states).headers().items():
        raw = name.lower().encode("latin-1")
        if raw not in present:
            out.append((raw, value.encode("latin-1")))
    return out
