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


#: What each permission allows, in words (for docs/authorization.md).
PERMISSION_HELP: dict[Permission, str] = {
    P.tenant_read: "See the tenant's name, plan and settings.",
    P.tenant_update: "Rename the tenant, change its settings and plan.",
    P.tenant_delete: "Delete the tenant and everything it owns.",
    P.members_read: "List members and pending invitations.",
    P.members_manage: "Invite, remove members and change their roles.",
    P.ownership_transfer: "Hand ownership to another member.",
    P.audit_read: "Read the tenant's audit log.",
    P.keys_read: "List API keys (never their secrets).",
    P.keys_manage: "Create, rotate and revoke API keys.",
    P.collections_read: "List and read collections.",
    P.collections_write: "Create, change and delete collections.",
    P.documents_read: "List documents, read their status and text.",
    P.documents_write: "Upload, re-ingest and delete documents.",
    P.search: "Search collections.",
    P.answer: "Ask for grounded answers.",
    P.usage_read: "Read usage, quotas and billing figures.",
}

_ROLE_ORDER = (Role.viewer, Role.member, Role.admin, Role.owner)


def permission_table_markdown() -> str:
    """The role and scope tables as Markdown, generated from this module for the docs."""
    roles = " | ".join(r.value for r in _ROLE_ORDER)
    lines = [
        f"| Permission | {roles} | API-key scopes | Allows |",
        "|---|" + "---|" * len(_ROLE_ORDER) + "---|---|",
    ]
    for perm in Permission:
        marks = ["✓" if perm in ROLE_PERMISSIONS[r] else "" for r in _ROLE_ORDER]
        scopes = [f"`{s.value}`" for s in Scope if perm in SCOPE_PERMISSIONS[s]]
        lines.append(
            f"| `{perm.value}` | "
            + " | ".join(marks)
            + f" | {', '.join(scopes) or '(none: people only)'} | {PERMISSION_HELP.get(perm, '')} |"
        )
    lines += ["", "| Scope | Grants |", "|---|---|"]
    for scope in Scope:
        granted = ", ".join(f"`{p.value}`" for p in Permission if p in SCOPE_PERMISSIONS[scope])
        lines.append(f"| `{scope.value}` | {granted} |")
    return "\n".join(lines) + "\n"
