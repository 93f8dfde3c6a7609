"""AuthSubject: who is calling, for which tenant, allowed to do what. Resolved once per request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from atrium.auth.permissions import Permission
from atrium.models.tenancy import Role


@dataclass(frozen=True)
class AuthSubject:
    """The caller of a tenant route, after authentication and authorization.

    Attributes:
        kind: ``user`` (access token) or ``api_key``.
        tenant_id: the tenant of the path the subject was resolved for.
        user_id: the person (for an API key, its creator).
        api_key_id: the key, when ``kind`` is ``api_key``.
        role: the user's role in the tenant (None for API keys).
        permissions: what the subject may do in this tenant.
        rate_limit_per_minute: a per-key override of the plan's rate limit, if any.
    """

    kind: Literal["user", "api_key"]
    tenant_id: uuid.UUID
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None = None
    role: Role | None = None
    permissions: frozenset[Permission] = field(default_factory=frozenset)
    rate_limit_per_minute: int | None = None

    @property
    def principal(self) -> str:
        """A stable identifier of the caller for logs, audit and rate limits."""
        if self.kind == "api_key":
            return f"key:{self.api_key_id}"
        return f"user:{self.user_id}"

    def can(self, permission: Permission) -> bool:
        """Whether the subject holds ``permission``."""
        return permission in self.permissions
