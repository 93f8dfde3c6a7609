"""API keys: issue, rotate, revoke, list, and authenticate them on every request.

Authentication is the hot path. A well-formed key costs one Redis round trip (``MGET`` of the
cached key record and the tenant's cached status); the database is read only on a cache miss and
never written. Revocation and rotation overwrite the cached record, so a revoked key is refused
on the very next request, and expiry is checked against the cached record on every request.
``last_used_at`` is written by a Celery task at most once a minute per key (a Redis ``SET NX``
debounce decides who sends it).

Redis keys (every one carries the tenant id, but the last):

- ``atrium:t:<tenant>:apikey:<hmac>``: the key record as JSON, or a marker for a key that does
  not exist (``unknown``) or belongs to another tenant (``foreign``);
- ``atrium:t:<tenant>:status``: the tenant's status, for a few seconds
  (:mod:`atrium.tenants.status`, which also forgets it when the status changes);
- ``atrium:t:<tenant>:apikey-used:<key id>``: the last-used debounce;
- ``atrium:apikey-unknown:<hmac>``: a key that does not exist, as :func:`tenant_of_key` (whose
  caller names no tenant) found it; for ``NEGATIVE_TTL_SECONDS``.

Creating or rotating a key drops both "does not exist" markers of the new key's HMAC once the
key is committed, so a key is never refused because someone tried it before it existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog
from fastapi import Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from atrium.apikeys import repository
from atrium.apikeys.schemas import ApiKeyCreate, ApiKeyRotate, ApiKeyStatus
from atrium.apikeys.secrets import display_parts, generate_key, is_well_formed, key_digest
from atrium.audit.service import record
from atrium.auth.permissions import (
    Permission,
    Scope,
    permissions_for_role,
    permissions_for_scopes,
)
from atrium.auth.subject import AuthSubject
from atrium.billing.plans import Limit
from atrium.billing.quota import limits_in_session
from atrium.config import Settings
from atrium.kit.db import after_commit
from atrium.kit.enqueue import send_now
from atrium.kit.errors import Conflict, Forbidden, NotFound, Unauthorized, Unprocessable
from atrium.models import ApiKey, Role, TenantStatus, utcnow
from atrium.tenants.status import ensure_tenant_usable, load_status, status_cache_key

log = structlog.get_logger("atrium.apikeys")
T = TypeVar("T")

#: How long a key record stays in Redis. Revocation and rotation overwrite it at once, so this
#: only bounds memory and changes made outside this module.
RECORD_TTL_SECONDS = 300
#: How long a "no such key" / "another tenant's key" answer is remembered.
NEGATIVE_TTL_SECONDS = 60
#: ``last_used_at`` is written at most this often per key.
TOUCH_INTERVAL_SECONDS = 60

TOUCH_TASK = "atrium.apikeys.record_last_used"
_UNKNOWN = "unknown"
_FOREIGN = "foreign"


def record_cache_key(tenant_id: uuid.UUID | str, digest: str) -> str:
    """Redis key of a cached key record, as seen from ``tenant_id``'s paths."""
    return f"atrium:t:{tenant_id}:apikey:{digest}"


def touch_cache_key(tenant_id: uuid.UUID | str, key_id: uuid.UUID | str) -> str:
    """Redis key of a key's last-used debounce."""
    return f"atrium:t:{tenant_id}:apikey-used:{key_id}"


def unknown_key_cache_key(digest: str) -> str:
    """Redis key of :func:`tenant_of_key`'s "no such key" marker (no tenant: the caller names
    none, and a key that does not exist has none)."""
    return f"atrium:apikey-unknown:{digest}"


# --- Authentication (the hot path) ------------------------------------------------------------


class CoalescingReader:
    """Reads Redis keys for concurrent requests with one ``MGET`` per event-loop turn.

    Every request still reads Redis after it arrived, so a revocation written before a request
    starts is always seen; requests that reach authentication in the same loop turn (a busy
    API worker has dozens in flight) share one round trip instead of paying one each. A lone
    request waits one loop turn more.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: dict[str, list[asyncio.Future[str | None]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loads: dict[str, asyncio.Task[Any]] = {}

    async def mget(self, *keys: str) -> list[str | None]:
        """The values of ``keys`` (None where missing), read in the next shared ``MGET``."""
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = {}
            # The flush starts after every callback already queued in this turn has run, so
            # it collects all the requests that got here meanwhile.
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        futures = []
        for key in keys:
            future: asyncio.Future[str | None] = loop.create_future()
            self._pending.setdefault(key, []).append(future)
            futures.append(future)
        return [await f for f in futures]

    async def _flush(self) -> None:
        batch, self._pending = self._pending or {}, None
        names = list(batch)
        try:
            values = await self.redis.mget(names)
        except BaseException as exc:
            for waiting in batch.values():
                for f in waiting:
                    if not f.done():
                        f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for name, value in zip(names, values, strict=True):
            for f in batch[name]:
                if not f.done():  # its request may have been cancelled (client went away)
                    f.set_result(None if value is None else str(value))

    async def load_once(self, key: str, load: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``load()`` once for all the requests that miss ``key`` at the same time.

        When a cached entry expires, every request in flight misses it at once; without this
        they would all query the database. The load runs in its own task, so a request that
        goes away does not cancel it for the others.
        """
        task = self._loads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(load())
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        result: T = await asyncio.shield(task)
        return result


def _reader(state: Any) -> CoalescingReader:
    reader: CoalescingReader | None = getattr(state, "apikey_reader", None)
    if reader is None or reader.redis is not state.redis:
        reader = CoalescingReader(state.redis)
        state.apikey_reader = reader
    return reader


def _epoch(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _encode(key: ApiKey) -> str:
    return json.dumps(
        {
            "id": str(key.id),
            "tenant": str(key.tenant_id),
            "user": str(key.created_by_user_id) if key.created_by_user_id else None,
            "scopes": list(key.scopes),
            "expires": _epoch(key.expires_at),
            "revoked": _epoch(key.revoked_at),
            "rpm": key.rate_limit_per_minute,
        },
        separators=(",", ":"),
    )


@functools.lru_cache(maxsize=1024)
def _scope_permissions(scopes: tuple[str, ...]) -> frozenset[Permission]:
    return permissions_for_scopes(scopes)


def _current_secret(settings: Settings) -> str:
    return settings.secret_key.get_secret_value()


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
        value, ttl = _UNKNOWN, NEGATIVE_TTL_SECONDS
    elif key.tenant_id != tenant_id:
        value, ttl = _FOREIGN, NEGATIVE_TTL_SECONDS
    else:
        value, ttl = _encode(key), RECORD_TTL_SECONDS
    if key is not None and key.key_hash != digest and value not in (_UNKNOWN, _FOREIGN):
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
    digest = key_digest(_current_secret(settings), token)
    cached, status = await _reader(state).mget(
        record_cache_key(tenant_id, digest), status_cache_key(tenant_id)
    )
    if cached is None:
        if session is None:
            cached = await _reader(state).load_once(
                record_cache_key(tenant_id, digest),
                lambda: _load_record(
                    None, state.sessionmaker, redis, settings, token, digest, tenant_id
                ),
            )
        else:
            cached = await _load_record(
                session, state.sessionmaker, redis, settings, token, digest, tenant_id
            )
    if cached == _UNKNOWN:
        raise Unauthorized("Invalid API key")
    if cached == _FOREIGN:
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
            status = await _reader(state).load_once(
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
        permissions=_scope_permissions(tuple(rec["scopes"])),
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
        await redis.set(unknown_key_cache_key(digest), _UNKNOWN, ex=NEGATIVE_TTL_SECONDS)
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
    ``NEGATIVE_TTL_SECONDS``. Creating a key drops the marker of its HMAC (:func:`create_key`,
    :func:`rotate_key`).

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
    digest = key_digest(_current_secret(settings), token)
    known = _key_tenants(state)
    tenant_id = known.get(digest)
    if tenant_id is not None:
        return tenant_id
    marker = unknown_key_cache_key(digest)
    reader = _reader(state)
    (cached,) = await reader.mget(marker)
    if cached == _UNKNOWN:
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


# --- Management --------------------------------------------------------------------------------


def key_status(key: ApiKey, now: dt.datetime | None = None) -> ApiKeyStatus:
    """Whether ``key`` works at ``now``."""
    now = now or utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return ApiKeyStatus.revoked
    if key.expires_at is not None and key.expires_at <= now:
        return ApiKeyStatus.expired
    if key.revoked_at is not None:
        return ApiKeyStatus.rotating
    return ApiKeyStatus.active


async def issue_key(
    session: AsyncSession,
    settings: Settings,
    tenant_id: uuid.UUID,
    *,
    name: str,
    scopes: list[Scope] | list[str],
    expires_at: dt.datetime | None = None,
    rate_limit_per_minute: int | None = None,
    created_by_user_id: uuid.UUID | None = None,
    created_by_api_key_id: uuid.UUID | None = None,
    rotated_from_id: uuid.UUID | None = None,
) -> tuple[ApiKey, str]:
    """Create a key row (flushed, not committed) and return it with its secret.

    No validation and no audit: routes go through :func:`create_key`; tests and scripts may call
    this directly (e.g. for an already expired key).
    """
    secret = generate_key()
    prefix, last_four = display_parts(secret)
    key = ApiKey(
        tenant_id=tenant_id,
        name=name,
        key_hash=key_digest(_current_secret(settings), secret),
        prefix=prefix,
        last_four=last_four,
        scopes=[Scope(s).value for s in scopes],
        expires_at=expires_at,
        rate_limit_per_minute=rate_limit_per_minute,
        created_by_user_id=created_by_user_id,
        created_by_api_key_id=created_by_api_key_id,
        rotated_from_id=rotated_from_id,
    )
    repository.add(session, key)
    await session.flush()
    return key, secret


def _actor(subject: AuthSubject) -> dict[str, Any]:
    if subject.kind == "api_key":
        return {"actor_api_key_id": subject.api_key_id}
    return {"actor_user_id": subject.user_id}


def scopes_beyond(scopes: list[Scope] | list[str], permissions: frozenset[Permission]) -> list[str]:
    """The scopes among ``scopes`` that grant something outside ``permissions``, sorted."""
    return sorted(str(s) for s in scopes if not _scope_permissions((str(s),)) <= permissions)


def _ensure_no_escalation(
    subject: AuthSubject,
    scopes: list[Scope] | list[str],
    verb: str,
    *,
    permissions: frozenset[Permission] | None = None,
    who: str | None = None,
) -> None:
    """The caller may only create, rotate or revoke a key whose scopes it holds itself.

    An API key's own scopes decide for a key, a member's role for a person. Without this, a key
    holding only ``keys:manage`` could rotate a full-scope key and receive its secret, or
    revoke keys it could never have created.

    Args:
        subject: the caller.
        scopes: the scopes of the key being created, rotated or revoked.
        verb: ``create``, ``rotate`` or ``revoke``, for the message.
        permissions: what the caller holds, if not ``subject.permissions`` (the role re-read
            inside the transaction).
        who: who lacks them, for the message (default: the key, or the person's role).

    Raises:
        Forbidden: some of ``scopes`` grant permissions the caller lacks (403: the key is in the
            caller's own tenant), naming them in ``detail.scopes_not_held``.
    """
    beyond = scopes_beyond(scopes, subject.permissions if permissions is None else permissions)
    if not beyond:
        return
    if who is None:
        who = "An API key" if subject.kind == "api_key" else "Your role"
    raise Forbidden(
        f"{who} cannot {verb} a key with scopes it does not hold: " + ", ".join(beyond),
        detail={
            "message": f"{who} cannot {verb} a key with scopes it does not hold",
            "scopes_not_held": beyond,
        },
    )


async def _ensure_within_plan(
    session: AsyncSession, tenant_id: uuid.UUID, rate_limit_per_minute: int | None
) -> None:
    """A key's own rate limit may lower the plan's per-key limit, never raise it.

    Raises:
        Unprocessable: ``rate_limit_per_minute`` is above the plan's per-key limit (422).
    """
    if rate_limit_per_minute is None:
        return
    plan_limit = (await limits_in_session(session, tenant_id))[Limit.requests_per_minute_per_key]
    if plan_limit is not None and rate_limit_per_minute > plan_limit:
        raise Unprocessable(
            f"rate_limit_per_minute ({rate_limit_per_minute}) is above your plan's limit of "
            f"{plan_limit} requests per minute per key: ask for at most {plan_limit}, or leave "
            "it empty to use the plan's",
            detail={
                "message": "rate_limit_per_minute is above the plan's per-key limit",
                "field": "rate_limit_per_minute",
                "plan_limit": plan_limit,
            },
        )


async def _lock_creator_role(session: AsyncSession, subject: AuthSubject) -> Role | None:
    """Re-read, share-locked, the role of the person a new key will be credited to.

    The subject was resolved before this transaction began; a removal, departure or role
    change may have committed since. Removal, leaving and role changes lock the same row for
    update before they revoke the person's keys, so either they wait for this transaction and
    then revoke the key it creates, or this one waits for them and sees the row as they left
    it. Lock order everywhere: the membership, then keys.

    Returns:
        The role now; None when nobody will be credited (a creatorless key calls).

    Raises:
        NotFound: the person is no longer a member (what their next request would get).
        Unauthorized: the calling key's creator is no longer a member (their keys, this one
            included, were revoked with the membership).
    """
    if subject.user_id is None:
        return None
    role = await repository.lock_membership_role(session, subject.tenant_id, subject.user_id)
    if role is None:
        if subject.kind == "api_key":
            raise Unauthorized("This API key has been revoked")
        raise NotFound("Tenant not found")
    return role


def _ensure_role_holds(
    subject: AuthSubject, role: Role | None, scopes: list[Scope] | list[str], verb: str
) -> None:
    """The creator's current role must hold ``scopes`` too (it may have been lowered since the
    request was authorized; for a key, its scopes were checked, not its creator's role)."""
    if role is None:
        return
    _ensure_no_escalation(
        subject,
        scopes,
        verb,
        permissions=permissions_for_role(role),
        who="Your role" if subject.kind == "user" else "The role of this key's creator",
    )


async def create_key(
    session: AsyncSession, subject: AuthSubject, data: ApiKeyCreate, request: Request
) -> tuple[ApiKey, str]:
    """Create a key for the subject's tenant and audit it; the secret is returned once.

    Raises:
        Forbidden: the key would have scopes the caller (or, for a key, its creator's current
            role) does not hold.
        NotFound: the caller stopped being a member after the request was authorized.
        Unauthorized: the calling key's creator stopped being a member meanwhile.
        Unprocessable: the rate limit is above the plan's.
    """
    _ensure_no_escalation(subject, data.scopes, "create")
    _ensure_role_holds(subject, await _lock_creator_role(session, subject), data.scopes, "create")
    await _ensure_within_plan(session, subject.tenant_id, data.rate_limit_per_minute)
    key, secret = await issue_key(
        session,
        request.app.state.settings,
        subject.tenant_id,
        name=data.name,
        scopes=data.scopes,
        expires_at=data.expires_at,
        rate_limit_per_minute=data.rate_limit_per_minute,
        created_by_user_id=subject.user_id,
        created_by_api_key_id=subject.api_key_id,
    )
    await _forget_misses(session, request.app.state.redis, key)
    record(
        session,
        "api_key.created",
        request=request,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=key.id,
        data={"name": key.name, "prefix": key.prefix, "scopes": key.scopes},
        **_actor(subject),
    )
    return key, secret


async def _forget_misses(session: AsyncSession, redis: Redis, key: ApiKey) -> None:
    """Drop the "does not exist" markers of a new key's HMAC (its tenant's paths and
    :func:`tenant_of_key`'s) once ``session`` commits, so the key works at once even if
    someone tried it before it existed. After the commit, never before: a request in between
    would read no row and mark it unknown again. Nobody holds the secret before the response
    that carries it, which goes out after this."""
    names = (record_cache_key(key.tenant_id, key.key_hash), unknown_key_cache_key(key.key_hash))

    async def hook(committed: bool) -> None:
        if committed:
            await redis.delete(*names)

    if not after_commit(session, hook):
        await redis.delete(*names)


async def _get_or_404(session: AsyncSession, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    key = await repository.get(session, tenant_id, key_id, for_update=True)
    if key is None:
        raise NotFound("API key not found")
    return key


async def _publish(redis: Redis, key: ApiKey) -> None:
    """Overwrite the cached record so the next request sees the change (no stale window)."""
    await redis.set(
        record_cache_key(key.tenant_id, key.key_hash), _encode(key), ex=RECORD_TTL_SECONDS
    )


async def revoke_key(
    session: AsyncSession, subject: AuthSubject, key_id: uuid.UUID, request: Request
) -> None:
    """Revoke a key now (also one still in a rotation grace period). Idempotent.

    Raises:
        NotFound: no such key in this tenant.
        Forbidden: the key has scopes the caller does not hold.
    """
    key = await _get_or_404(session, subject.tenant_id, key_id)
    _ensure_no_escalation(subject, key.scopes, "revoke")
    now = utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return
    key.revoked_at = now
    await session.flush()
    record(
        session,
        "api_key.revoked",
        request=request,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=key.id,
        data={"name": key.name, "prefix": key.prefix},
        **_actor(subject),
    )
    # Written before the commit on purpose: if the commit failed the key would be refused for a
    # few minutes though not revoked (fail closed), never accepted though revoked.
    await _publish(request.app.state.redis, key)


async def rotate_key(
    session: AsyncSession,
    subject: AuthSubject,
    key_id: uuid.UUID,
    data: ApiKeyRotate,
    request: Request,
) -> tuple[ApiKey, str]:
    """Issue a new secret with the same name, scopes, expiry and limit; revoke the old key
    now, or once ``grace_period_seconds`` have passed.

    Raises:
        NotFound: no such key in this tenant, or the caller stopped being a member.
        Forbidden: the key has scopes the caller (or, for a key, its creator's current role)
            does not hold (rotating it would hand the caller a secret with them).
        Conflict: the key is revoked, expired or already rotated.
        Unauthorized: the calling key's creator stopped being a member meanwhile.
    """
    # The membership before the key: removal and role changes lock in the same order.
    role = await _lock_creator_role(session, subject)
    old = await _get_or_404(session, subject.tenant_id, key_id)
    _ensure_no_escalation(subject, old.scopes, "rotate")
    _ensure_role_holds(subject, role, old.scopes, "rotate")
    now = utcnow()
    status = key_status(old, now)
    if status is not ApiKeyStatus.active:
        hint = {
            ApiKeyStatus.rotating: "it was already rotated; rotate its replacement instead",
            ApiKeyStatus.revoked: "it is revoked; create a new key instead",
            ApiKeyStatus.expired: "it has expired; create a new key instead",
        }[status]
        raise Conflict(f"This API key cannot be rotated: {hint}")
    new, secret = await issue_key(
        session,
        request.app.state.settings,
        subject.tenant_id,
        name=old.name,
        scopes=list(old.scopes),
        expires_at=old.expires_at,
        rate_limit_per_minute=old.rate_limit_per_minute,
        created_by_user_id=subject.user_id,
        created_by_api_key_id=subject.api_key_id,
        rotated_from_id=old.id,
    )
    await _forget_misses(session, request.app.state.redis, new)
    old.revoked_at = now + dt.timedelta(seconds=data.grace_period_seconds)
    await session.flush()
    record(
        session,
        "api_key.rotated",
        request=request,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=old.id,
        data={
            "name": old.name,
            "old_prefix": old.prefix,
            "new_key_id": str(new.id),
            "new_prefix": new.prefix,
            "grace_period_seconds": data.grace_period_seconds,
        },
        **_actor(subject),
    )
    await _publish(request.app.state.redis, old)
    return new, secret


async def revoke_keys_created_by(
    session: AsyncSession,
    redis: Redis,
    user_id: uuid.UUID,
    *,
    reason: str,
    tenant_id: uuid.UUID | None = None,
    actor_user_id: uuid.UUID | None = None,
    request: Request | None = None,
    within: frozenset[Permission] | None = None,
) -> list[ApiKey]:
    """Revoke, now, every working key ``user_id`` created: in ``tenant_id``, or everywhere.

    Called when a member is removed or leaves (one tenant) and when an account is deleted (every
    tenant): a key must not outlive its creator's access; and, with ``within``, when a member's
    role is lowered: a key must not grant more than its creator's role. Keys a key minted carry
    the same creator, so they go too; a key an admin rotated is the admin's. Each key gets an
    ``api_key.revoked`` audit event with ``reason``, and its cached record is overwritten, so it
    is refused from the next request on, on every replica.

    Args:
        session: the unit of work (flushed, not committed).
        redis: where the key records are cached.
        user_id: the creator.
        reason: why, for the audit log: ``member_removed``, ``member_left``, ``account_deleted``,
            ``role_lowered``.
        tenant_id: only this tenant's keys; None: every tenant's.
        actor_user_id: who caused it (the admin who removed the member, or the user).
        request: the HTTP request, for the audit log's IP and user agent.
        within: only the keys with a scope that grants something outside these permissions
            (the creator's new role); None: every key.

    Returns:
        The keys revoked.
    """
    now = utcnow()
    keys = list(
        await repository.live_keys_created_by(session, user_id, now=now, tenant_id=tenant_id)
    )
    if within is not None:
        keys = [k for k in keys if scopes_beyond(k.scopes, within)]
    for key in keys:
        key.revoked_at = now
    await session.flush()
    for key in keys:
        record(
            session,
            "api_key.revoked",
            request=request,
            tenant_id=key.tenant_id,
            actor_user_id=actor_user_id,
            target_type="api_key",
            target_id=key.id,
            data={
                "name": key.name,
                "prefix": key.prefix,
                "reason": reason,
                "created_by_user_id": str(user_id),
            },
        )
        # Before the commit, like revoke_key: a failed commit leaves the key refused for a few
        # minutes (fail closed), never accepted after its creator lost access.
        await _publish(redis, key)
    if keys:
        log.info(
            "api_keys_revoked_with_creator", user_id=str(user_id), count=len(keys), reason=reason
        )
    return keys
