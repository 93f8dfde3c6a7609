"""Who may create, rotate or revoke which API key, and what a key's scopes grant.

A caller never gets a key, or a key's secret, with more than it holds itself: an API key's own
scopes decide for a key, a member's role for a person, and the role is re-read (share-locked)
inside the transaction, since it may have been lowered since the request was authorized. A key's
own rate limit may lower the plan's, never raise it. The lifecycle
(:mod:`atrium.apikeys.service`) calls these checks; authentication
(:mod:`atrium.auth.api_keys`) uses :func:`scope_permissions` for a key's subject.
"""

from __future__ import annotations

import functools
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.apikeys import repository
from atrium.auth.permissions import (
    Permission,
    Scope,
    permissions_for_role,
    permissions_for_scopes,
)
from atrium.auth.subject import AuthSubject
from atrium.billing.plans import Limit
from atrium.billing.quota import limits_in_session
from atrium.kit.errors import Forbidden, NotFound, Unauthorized, Unprocessable
from atrium.models import Role


@functools.lru_cache(maxsize=1024)
def scope_permissions(scopes: tuple[str, ...]) -> frozenset[Permission]:
    """What a key with ``scopes`` may do (cached: every authenticated request asks)."""
    return permissions_for_scopes(scopes)


def scopes_beyond(scopes: list[Scope] | list[str], permissions: frozenset[Permission]) -> list[str]:
    """The scopes among ``scopes`` that grant something outside ``permissions``, sorted."""
    return sorted(str(s) for s in scopes if not scope_permissions((str(s),)) <= permissions)


def ensure_no_escalation(
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


async def ensure_within_plan(
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


async def lock_creator_role(session: AsyncSession, subject: AuthSubject) -> Role | None:
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


def ensure_role_holds(
    subject: AuthSubject, role: Role | None, scopes: list[Scope] | list[str], verb: str
) -> None:
    """The creator's current role must hold ``scopes`` too (it may have been lowered since the
    request was authorized; for a key, its scopes were checked, not its creator's role)."""
    if role is None:
        return
    ensure_no_escalation(
        subject,
        scopes,
        verb,
        permissions=permissions_for_role(role),
        who="Your role" if subject.kind == "user" else "The role of this key's creator",
    )
