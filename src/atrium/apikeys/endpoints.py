"""Routes: create, list, rotate and revoke a tenant's API keys."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response, status

from atrium.apikeys import service
from atrium.apikeys.repository import ApiKeyRepository
from atrium.apikeys.schemas import ApiKey, ApiKeyCreate, ApiKeyCreated, ApiKeyRotate
from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.context import Ctx
from atrium.kit.db import DBSession
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.responses import TENANT, errors
from atrium.models import ApiKey as ApiKeyModel
from atrium.models import utcnow

router = APIRouter(prefix="/tenants/{tenant_id}/api-keys", tags=["api keys"], responses=TENANT)


def _to_schema(key: ApiKeyModel) -> ApiKey:
    return ApiKey(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        last_four=key.last_four,
        scopes=list(key.scopes),
        status=service.key_status(key),
        created_by_user_id=key.created_by_user_id,
        created_by_api_key_id=key.created_by_api_key_id,
        rotated_from_id=key.rotated_from_id,
        rate_limit_per_minute=key.rate_limit_per_minute,
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
    )


def _created(key: ApiKeyModel, secret: str) -> ApiKeyCreated:
    return ApiKeyCreated(**_to_schema(key).model_dump(), key=secret)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    summary="Create an API key",
)
async def create_api_key(
    tenant_id: uuid.UUID,
    data: ApiKeyCreate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.keys_manage)),
) -> ApiKeyCreated:
    """Create a key with the given scopes. The response holds the secret: it is shown once.

    An API key with `keys:manage` may create keys, but only with scopes it holds itself.
    `rate_limit_per_minute` may lower the plan's per-key limit, not raise it (422).
    """
    key, secret = await service.create_key(ctx, subject, data)
    return _created(key, secret)


@router.get(
    "",
    response_model=Page[ApiKey],
    summary="List API keys",
)
async def list_api_keys(
    tenant_id: uuid.UUID,
    session: DBSession,
    params: Annotated[Params, Depends()],
    include_revoked: Annotated[
        bool, Query(description="Also list revoked keys (rotating ones are always listed).")
    ] = False,
    subject: AuthSubject = Depends(require(Permission.keys_read)),
) -> Any:
    """The tenant's keys, newest first: prefix and last four, scopes, creator, dates, last use.

    Secrets are never shown again.
    """
    keys = ApiKeyRepository(session, subject.tenant_id)
    query = keys.list_query(include_revoked=include_revoked, now=utcnow())

    def transform(rows: Sequence[Any]) -> list[ApiKey]:
        return [_to_schema(r) for r in rows]

    return await paginate_query(session, query, params, transform)


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke an API key",
)
async def revoke_api_key(
    tenant_id: uuid.UUID,
    key_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.keys_manage)),
) -> Response:
    """Revoke the key: it is refused from the next request on. Revoking twice is harmless.

    An API key may only revoke keys whose scopes it holds itself (403 otherwise).
    """
    await service.revoke_key(ctx, subject, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{key_id}/rotate",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    summary="Rotate an API key",
    responses=errors(409),
)
async def rotate_api_key(
    tenant_id: uuid.UUID,
    key_id: uuid.UUID,
    ctx: Ctx,
    data: Annotated[ApiKeyRotate | None, Body()] = None,
    subject: AuthSubject = Depends(require(Permission.keys_manage)),
) -> ApiKeyCreated:
    """Issue a new secret with the same name, scopes and expiry, and revoke the old one.

    With `grace_period_seconds` the old secret keeps working that long (at most 7 days), so
    deployments can switch over; without it, the old secret is refused at once. An API key
    may only rotate keys whose scopes it holds itself (403 otherwise).
    """
    key, secret = await service.rotate_key(ctx, subject, key_id, data or ApiKeyRotate())
    return _created(key, secret)
