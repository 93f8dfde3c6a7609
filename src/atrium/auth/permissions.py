"""The one permission table: what each role and each API-key scope allows.

Every tenant route names exactly one :class:`Permission` (see ``auth.dependencies.require``);
``docs/authorization.md`` shows this table, and a test walks every route against it.
"""

from __future__ import annotations

import enum

from atrium.models.tenancy import Role


class Permission(enum.StrEnum):
    """Something a caller may do inside a tenant."""

    tenant_read = "tenant:read"
    tenant_update = "tenant:update"
    tenant_delete = "tenant:delete"
    members_read = "members:read"
    members_manage = "members:manage"
    ownership_transfer = "ownership:transfer"
    audit_read = "audit:read"
    keys_read = "keys:read"
    keys_manage = "keys:manage"
    collections_read = "collections:read"
    collections_write = "collections:write"
    documents_read = "documents:read"
    documents_write = "documents:write"
    search = "search"
    answer = "answer"
    usage_read = "usage:read"


class Scope(enum.StrEnum):
    """What an API key may be granted."""

    collections_read = "collections:read"
    collections_write = "collections:write"
    documents_read = "documents:read"
    documents_write = "documents:write"
    search = "search"
    answer = "answer"
    usage_read = "usage:read"
    keys_manage = "keys:manage"


P = Permission

_VIEWER = frozenset(
    {
        P.tenant_read,
        P.members_read,
        P.collections_read,
        P.documents_read,
        P.search,
        P.answer,
        P.usage_read,
    }
)
_MEMBER = _VIEWER | {P.collections_write, P.documents_write}
_ADMIN = _MEMBER | {P.tenant_update, P.members_manage, P.audit_read, P.keys_read, P.keys_manage}
_OWNER = _ADMIN | {P.tenant_delete, P.ownership_transfer}

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.viewer: _VIEWER,
    Role.member: _MEMBER,
    Role.admin: _ADMIN,
    Role.owner: _OWNER,
}

SCOPE_PERMISSIONS: dict[Scope, frozenset[Permission]] = {
    Scope.collections_read: frozenset({P.collections_read, P.tenant_read}),
    Scope.collections_write: frozenset({P.collections_write}),
    Scope.documents_read: frozenset({P.documents_read}),
    Scope.documents_write: frozenset({P.documents_write}),
    Scope.search: frozenset({P.search}),
    Scope.answer: frozenset({P.answer}),
    Scope.usage_read: frozenset({P.usage_read}),
    Scope.keys_manage: frozenset({P.keys_read, P.keys_manage}),
}


def permissions_for_role(role: Role) -> frozenset[Permission]:
    """What a member with ``role`` may do."""
    return ROLE_PERMISSIONS[role]


def permissions_for_scopes(scopes: list[str] | tuple[str, ...]) -> frozenset[Permission]:
    """What an API key with ``scopes`` may do (unknown scopes grant nothing)."""
    out: set[Permission] = set()
    for s in scopes:
        try:
            out |= SCOPE_PERMISSIONS[Scope(s)]
        except ValueError:
            continue
    return frozenset(out)
