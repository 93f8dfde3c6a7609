"""Async factories for tests: users, tenants, memberships and their credentials."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi_users.password import PasswordHelper

from atrium.auth import tokens
from atrium.models import Membership, Role, Tenant, TenantStatus, User

DEFAULT_PASSWORD = "correct horse battery staple"
_hasher = PasswordHelper()
_hash_cache: dict[str, str] = {}


def _hash(password: str) -> str:
    # argon2 is slow on purpose; tests reuse one hash per password.
    if password not in _hash_cache:
        _hash_cache[password] = _hasher.hash(password)
    return _hash_cache[password]


async def create_user(
    app: Any,
    *,
    email: str | None = None,
    password: str = DEFAULT_PASSWORD,
    verified: bool = True,
    superuser: bool = False,
    name: str = "",
) -> User:
    """Insert a user directly (committed), bypassing registration."""
    user = User(
        email=email or f"user-{uuid.uuid4().hex[:10]}@example.com",
        hashed_password=_hash(password),
        is_active=True,
        is_verified=verified,
        is_superuser=superuser,
        name=name,
    )
    async with app.state.sessionmaker() as session:
        session.add(user)
        await session.commit()
    return user


async def create_tenant(
    app: Any,
    owner: User | None = None,
    *,
    name: str | None = None,
    status: TenantStatus = TenantStatus.active,
) -> Tenant:
    """Insert a tenant, with ``owner`` as its owner when given."""
    tenant = Tenant(name=name or f"Tenant {uuid.uuid4().hex[:6]}", status=status)
    async with app.state.sessionmaker() as session:
        session.add(tenant)
        await session.flush()
        if owner is not None:
            session.add(Membership(tenant_id=tenant.id, user_id=owner.id, role=Role.owner))
        await session.commit()
    return tenant


async def add_member(app: Any, tenant: Tenant, user: User, role: Role) -> None:
    """Give ``user`` a role in ``tenant``."""
    async with app.state.sessionmaker() as session:
        session.add(Membership(tenant_id=tenant.id, user_id=user.id, role=role))
        await session.commit()


async def bearer(user: User, session_id: str | None = None) -> dict[str, str]:
    """An Authorization header with a fresh access token for ``user``."""
    token = await tokens.create_access_token(user.id, session_id or uuid.uuid4().hex)
    return {"Authorization": f"Bearer {token}"}
