"""The API-key authenticator, the hot path: every request that carries an ``atr_...`` key.

A well-formed key costs one Redis round trip (``MGET`` of the cached key record and the
tenant's cached status); the database is read only on a cache miss and never written.
Revocation and rotation overwrite the cached record (:mod:`atrium.apikeys.cache`, which lists
the Redis keys), so a revoked key is refused on the very next request, and expiry is checked
against the cached record on every request. ``last_used_at`` is written by a Celery task at
most once a minute per key (a Redis ``SET NX`` debounce decides who sends it).

Creating, rotating and revoking keys is :mod:`atrium.apikeys.service`.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import structlog
from fastapi import Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from atrium.apikeys import repository
from atrium.apikeys.cache import (
    FOREIGN,
    NEGATIVE_TTL_SECONDS,
    RECORD_TTL_SECONDS,
    UNKNOWN,
    encode_record,
    record_cache_key,
    shared_reader,
    touch_cache_key,
    unknown_key_cache_key,
)
from atrium.apikeys.policy import scope_permissions
from atrium.apikeys.secrets import current_secret, is_well_formed, key_digest
from atrium.auth.subject import AuthSubject
from atrium.config import Settings
from atrium.kit.enqueue import send_now
from atrium.kit.errors import NotFound, Unauthorized
from atrium.models import TenantStatus, utcnow
from atrium.tenants.status import ensure_tenant_usable, load_status, status_cache_key

log = structlog.get_logger("atrium.apikeys")

#: ``last_used_at`` is written at most this often per key.
TOUCH_INTERVAL_SECONDS = 60

TOUCH_TASK = "atrium.apikeys.record_last_used"


async def _load_record(
    session: AsyncSession | None,
    sessionmaker: Any,
    redis: Redis,
    settings: Settings,
    token: str,
    digest: str,
    tenant_id: uuid.UUID,
) -> str:
    """Read the key from the database and cache what we learnt (``SET NX``: never over a
    record a concurrent revocation just wrote)."""
    digests = [digest] + [key_digest(s, token) for s in settings.secret_keys[1:]]
    if session is not None:
        key = await repository.find_by_digests(session, digests)
    else:
        async with sessionmaker() as own:
            key = await repository.find_by_digests(own, digests)
    if key is None:
        value, ttl = UNKNOWN, NEGATIVE_TTL_SECONDS
    elif key.tenant_id != tenant_id:
        value, ttl = FOREIGN, NEGATIVE_TTL_SECONDS
    else:
        value, ttl = encode_record(key), RECORD_TTL_SECONDS
    if key is not None and key.key_hash != digest and value not in (UNKNOWN, FOREIGN):
        # Hashed under a previous secret: revocation rewrites the record under its stored hash,
        # so caching it under today's digest could outlive a revocation. Read it every time
        # until the key is rotated.
        return value
    cache_key = record_cache_key(tenant_id, digest)
    if not await redis.set(cache_key, value, ex=ttl, nx=True):
        current = await redis.get(cache_key)
        if current is not None:
            return str(current)
    return value


async def authenticate_api_key(
    request: Request, session: AsyncSession | None, token: str, tenant_id: uuid.UUID
) -> AuthSubject:
    """Resolve an ``atr_...`` key into the subject calling ``tenant_id``'s paths.

    Checks, in order: shape and checksum (no lookup at all); the key exists; it is not revoked
    (a rotated key: not past its grace period) and not expired; it belongs to ``tenant_id``;
    the tenant is usable. Permission checks are the caller's (``require``).

    Args:
        request: the HTTP request (``app.state`` gives settings and Redis).
        session: a session to read through on a cache miss (never written); None: open a
            short one from ``app.state.sessionmaker`` only when needed (what ``require`` does).
        token: the bearer credential, starting with ``atr_``.
        tenant_id: the tenant of the path.

    Returns:
        An ``api_key`` subject whose permissions come from the key's scopes.

    Raises:
        Unauthorized: malformed, unknown, revoked or expired key.
        NotFound: the key belongs to another tenant, or the tenant is gone or being deleted.
        Forbidden: the tenant is suspended.
    """
    if not is_well_formed(token):
        raise Unauthorized("Malformed API key: check that it was copied whole")
    state = request.app.state
    settings: Settings = state.settings
    redis: Redis = state.redis
    digest = key_digest(current_secret(settings), token)
    cached, status = await shared_reader(state).mget(
        record_cache_key(tenant_id, digest), status_cache_key(tenant_id)
    )
    if cached is None:
        if session is None:
            cached = await shared_reader(state).load_once(
                record_cache_key(tenant_id, digest),
                lambda: _load_record(
                    None, state.sessionmaker, redis, settings, token, digest, tenant_id
                ),
            )
        else:
            cached = await _load_record(
                session, state.sessionmaker, redis, settings, token, digest, tenant_id
            )
    if cached == UNKNOWN:
        raise Unauthorized("Invalid API key")
    if cached == FOREIGN:
        raise NotFound("Tenant not found")
    rec: dict[str, Any] = json.loads(cached)
    now = time.time()
    revoked = rec["revoked"]
    if revoked is not None and now >= revoked:
        raise Unauthorized("This API key has been revoked")
    expires = rec["expires"]
    if expires is not None and now >= expires:
        raise Unauthorized("This API key has expired; create a new one")
    if status is None:
        if session is None:
            status = await shared_reader(state).load_once(
                status_cache_key(tenant_id),
                lambda: load_status(None, state.sessionmaker, redis, tenant_id),
            )
        else:
            status = await load_status(session, state.sessionmaker, redis, tenant_id)
        if status is None:
            raise NotFound("Tenant not found")
    if status != TenantStatus.active.value:
        ensure_tenant_usable(TenantStatus(str(status)))
    key_id = uuid.UUID(rec["id"])
    await _note_use(redis, tenant_id, key_id)
    return AuthSubject(
        kind="api_key",
        tenant_id=tenant_id,
        user_id=uuid.UUID(rec["user"]) if rec["user"] else None,
        api_key_id=key_id,
        role=None,
        permissions=scope_permissions(tuple(rec["scopes"])),
        rate_limit_per_minute=rec["rpm"],
    )


#: At most this many key-to-tenant entries per app (:func:`tenant_of_key`); emptied when full (a
#: miss costs one indexed read).
_MAX_KEY_TENANTS = 100_000


def _key_tenants(state: Any) -> dict[str, uuid.UUID]:
    """Which tenant each key belongs to, by the key's HMAC under the current secret (never the
    key itself): one map per app, kept on its state (two apps in one process share nothing)."""
    known: dict[str, uuid.UUID] | None = getattr(state, "apikey_tenants", None)
    if known is None:
        known = {}
        state.apikey_tenants = known
    return known


async def _load_key_tenant(
    sessionmaker: Any, redis: Redis, settings: Settings, token: str, digest: str
) -> uuid.UUID | None:
    """Read the key's tenant from the database; remember a key that does not exist."""
    # One digest per secret of the key ring: keys issued under a previous secret still work.
    digests = [digest] + [key_digest(s, token) for s in settings.secret_keys[1:]]
    async with sessionmaker() as session:
        key = await repository.find_by_digests(session, digests)
    if key is None:
        await redis.set(unknown_key_cache_key(digest), UNKNOWN, ex=NEGATIVE_TTL_SECONDS)
        return None
    tenant_id: uuid.UUID = key.tenant_id
    return tenant_id


async def tenant_of_key(request: Request, token: str) -> uuid.UUID:
    """The tenant an ``atr_...`` key belongs to, read from the key's own row.

    For a caller whose path names no tenant (``/mcp``): it learns the tenant here, then passes
    it to :func:`authenticate_api_key`, which makes every other check. The answer is kept in a
    map of the app's (``app.state``): a key never changes tenant and its HMAC is never reused
    by another key, so an entry is never wrong, and it grants nothing by itself. A key
    revoked, expired or rotated past its grace period, or deleted with its tenant, still maps
    to that tenant here and is refused by :func:`authenticate_api_key` on every request (401,
    or 404 for a tenant that is gone).

    A key that does not exist costs what it costs on the routes: one (shared) Redis read of
    its "unknown" marker, and on a miss one database read for all the requests that miss it
    at the same time (:meth:`CoalescingReader.load_once`), which then marks it unknown for
    ``NEGATIVE_TTL_SECONDS``. Creating a key drops the marker of its HMAC
    (:func:`~atrium.apikeys.service.create_key`, :func:`~atrium.apikeys.service.rotate_key`).

    Args:
        request: the HTTP request (``app.state`` gives settings, Redis and the account
            database).
        token: the bearer credential, starting with ``atr_``.

    Raises:
        Unauthorized: a malformed key, or one that does not exist.
    """
    if not is_well_formed(token):
        # The words authenticate_api_key uses, and no lookup for a mistyped key.
        raise Unauthorized("Malformed API key: check that it was copied whole")
    state = request.app.state
    settings: Settings = state.settings
    redis: Redis = state.redis
    digest = key_digest(current_secret(settings), token)
    known = _key_tenants(state)
    tenant_id = known.get(digest)
    if tenant_id is not None:
        return tenant_id
    marker = unknown_key_cache_key(digest)
    reader = shared_reader(state)
    (cached,) = await reader.mget(marker)
    if cached == UNKNOWN:
        raise Unauthorized("Invalid API key")
    tenant_id = await reader.load_once(
        marker, lambda: _load_key_tenant(state.sessionmaker, redis, settings, token, digest)
    )
    if tenant_id is None:
        raise Unauthorized("Invalid API key")
    if len(known) >= _MAX_KEY_TENANTS:
        known.clear()
    known[digest] = tenant_id
    return tenant_id


# --- last_used_at: debounced, written by a task -----------------------------------------------

#: When this process last tried to record a use of each key (monotonic seconds). A filter in
#: front of Redis' SET NX, so a busy key costs no extra round trip; the SET NX is what
#: guarantees "at most once a minute" across processes.
_last_touch: dict[uuid.UUID, float] = {}
_MAX_TRACKED_KEYS = 100_000


def forget_local_touches() -> None:
    """Forget this process's debounce memory (tests; a minute passing does the same)."""
    _last_touch.clear()


async def _note_use(redis: Redis, tenant_id: uuid.UUID, key_id: uuid.UUID) -> None:
    now = time.monotonic()
    last = _last_touch.get(key_id)
    if last is not None and now - last < TOUCH_INTERVAL_SECONDS:
        return
    if len(_last_touch) >= _MAX_TRACKED_KEYS:
        _last_touch.clear()
    _last_touch[key_id] = now
    used_at = utcnow()
    debounce = touch_cache_key(tenant_id, key_id)
    if not await redis.set(debounce, used_at.isoformat(), nx=True, ex=TOUCH_INTERVAL_SECONDS):
        return
    try:
        await run_in_threadpool(_send_touch, tenant_id, key_id, used_at)
    except Exception as exc:
        # Losing one last-used mark is better than failing the caller's request; let the next
        # request try again.
        log.warning("api_key_touch_not_sent", key_id=str(key_id), error=str(exc))
        _last_touch.pop(key_id, None)
        await redis.delete(debounce)


def _send_touch(tenant_id: uuid.UUID, key_id: uuid.UUID, used_at: dt.datetime) -> None:
    # Best effort and nobody waits for it: published at once, not through the outbox (a lost
    # mark costs nothing), with the outbox's short publish retries and no result subscription.
    send_now(
        TOUCH_TASK,
        tenant_id=str(tenant_id),
        key_id=str(key_id),
        used_at=used_at.isoformat(),
    )
