"""Console routes: the pages (one HTML shell), their assets, and the cookie session.

Pages are served by the browser-side router in ``static/js``; the server only answers each
page path with the same shell. Page paths are listed explicitly (no catch-all) so unknown paths,
``/v1/...`` included, keep their JSON 404. Mail links point at ``/verify-email``,
``/reset-password`` and ``/invitations/accept`` (see ``accounts.manager.link``): those pages
post the token to the API.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, Field, field_validator
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from atrium.accounts import credentials, sessions
from atrium.accounts.endpoints import LOGIN_LIMITS, Manager
from atrium.accounts.passwords import MIN_LENGTH
from atrium.audit.service import Origin, record
from atrium.auth import tokens
from atrium.auth.permissions import ROLE_PERMISSIONS
from atrium.auth.permissions import Scope as KeyScope
from atrium.console.security import (
    CONTENT_SECURITY_POLICY,
    CSRF_COOKIE,
    CSRF_HEADER,
    REFRESH_COOKIE,
    clear_refresh_cookie,
    ensure_csrf_cookie,
    require_csrf,
    security_headers,
    set_refresh_cookie,
)
from atrium.context import Ctx
from atrium.ingestion.detect import SUPPORTED
from atrium.ingestion.limits import MAX_FILES_PER_REQUEST
from atrium.kit.db import DBSession
from atrium.kit.errors import Unauthorized
from atrium.kit.responses import ANY_ROUTE, errors

STATIC_DIR = Path(__file__).parent / "static"

#: Paths the browser-side router renders; each answers with the HTML shell.
PAGE_PATHS = (
    "/",
    "/signup",
    "/login",
    "/verify-email",
    "/forgot-password",
    "/reset-password",
    "/invitations/accept",
    "/account",
    "/tenants",
    # Not "{tenant_id}": these are pages, not tenant API routes (the authz matrix walks those).
    "/tenants/{page:path}",
)

# What any of its routes may answer besides its own statuses, as for /v1 (kit/responses.py).
router = APIRouter(tags=["console"], responses=ANY_ROUTE)


@lru_cache(maxsize=1)
def _shell() -> bytes:
    return (STATIC_DIR / "index.html").read_bytes()


async def page(request: Request) -> HTMLResponse:
    """The console's HTML shell; the browser-side router draws the page for the path."""
    response = HTMLResponse(_shell())
    security_headers(response)
    response.headers["Cache-Control"] = "no-cache"
    ensure_csrf_cookie(request, response)
    return response


for _path in PAGE_PATHS:
    router.add_api_route(_path, page, methods=["GET"], include_in_schema=False)


class ConsoleAssets(StaticFiles):
    """The console's scripts and styles, with the console's CSP; revalidated on each load."""

    async def get_response(self, path: str, scope: Scope) -> Any:
        """Serve an asset with the console's headers."""
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Cache-Control"] = "no-cache"
        return response


# Static facts the console needs ----------------------------------------------------------


class ConsoleMeta(BaseModel):
    """What the console shows from the server's own tables."""

    role_permissions: dict[str, list[str]] = Field(description="Permissions of each role.")
    scopes: list[str] = Field(description="Scopes an API key may be given.")
    supported_types: str = Field(description="Document types uploads accept.")
    max_files_per_upload: int
    password_min_length: int


@router.get("/console/meta", response_model=ConsoleMeta)
async def console_meta() -> ConsoleMeta:
    """Roles, scopes and upload facts, from the same tables the API enforces."""
    return ConsoleMeta(
        role_permissions={
            role.value: sorted(p.value for p in perms) for role, perms in ROLE_PERMISSIONS.items()
        },
        scopes=[s.value for s in KeyScope],
        supported_types=SUPPORTED,
        max_files_per_upload=MAX_FILES_PER_REQUEST,
        password_min_length=MIN_LENGTH,
    )


# The cookie session ----------------------------------------------------------------------


class ConsoleLogin(BaseModel):
    """The console's login form."""

    username: str = Field(max_length=320, description="The account's e-mail address.")
    password: str = Field(max_length=256)

    @field_validator("username")
    @classmethod
    def _email_given(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("Enter your e-mail address")
        return value

    @field_validator("password")
    @classmethod
    def _password_given(cls, value: str) -> str:
        if not value:
            raise ValueError("Enter your password")
        return value


class ConsoleToken(BaseModel):
    """An access token for the console's memory; the refresh token went into the cookie."""

    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, no secret
    expires_in: int = Field(description="Seconds until the access token expires.")


class CsrfToken(BaseModel):
    """The CSRF token, also set as the ``__Host-atrium_csrf`` cookie."""

    csrf_token: str
    header: str = Field(description="The header to send it in.")


def _no_store(response: Response) -> None:
    response.headers["Cache-Control"] = "no-store"
    security_headers(response)


def _refused(exc: Unauthorized) -> JSONResponse:
    response = JSONResponse(
        {"error": exc.name, "detail": exc.detail},
        status_code=exc.status_code,
        headers=exc.headers,
    )
    clear_refresh_cookie(response)
    _no_store(response)
    return response


_CSRF = [Depends(require_csrf)]


@router.get("/console/session/csrf", response_model=CsrfToken)
async def session_csrf(request: Request, response: Response) -> CsrfToken:
    """The CSRF token the cookie routes require (set as a cookie too, if it was missing)."""
    _no_store(response)
    token = ensure_csrf_cookie(request, response)
    return CsrfToken(csrf_token=token, header=CSRF_HEADER)


@router.post(
    "/console/session/login",
    dependencies=[*_CSRF, *LOGIN_LIMITS],
    response_model=ConsoleToken,
    responses=errors(401, 403, 429),
)
async def session_login(
    body: ConsoleLogin, response: Response, ctx: Ctx, manager: Manager
) -> ConsoleToken:
    """Log in like ``POST /v1/auth/login``; the refresh token goes into an HttpOnly cookie.

    Needs the ``X-CSRF-Token`` header (the value of the ``__Host-atrium_csrf`` cookie) and a
    same-origin request. Shares the login rate limits of the API.
    """
    form = OAuth2PasswordRequestForm(username=body.username, password=body.password)
    pair = await credentials.login(ctx, manager, form)
    set_refresh_cookie(response, ctx.settings, pair.refresh_token)
    _no_store(response)
    return ConsoleToken(access_token=pair.access_token, expires_in=pair.expires_in)


@router.post(
    "/console/session/refresh",
    dependencies=_CSRF,
    response_model=ConsoleToken,
    responses=errors(401, 403),
)
async def session_refresh(request: Request, ctx: Ctx) -> Response:
    """Trade the refresh cookie for a new access token; the cookie is rotated.

    Like ``POST /v1/auth/refresh``: a refresh token presented twice ends its session. Any
    failure clears the cookie and answers 401.
    """
    token = request.cookies.get(REFRESH_COOKIE)
    if not token:
        return _refused(Unauthorized("You are not logged in"))
    try:
        pair = await sessions.rotate(ctx.session, ctx.settings, token, ctx.origin)
    except sessions.RefreshReused as exc:
        await sessions.revoke_reused(ctx, exc)
        return _refused(exc)
    except Unauthorized as exc:
        await ctx.session.rollback()
        return _refused(exc)
    response = JSONResponse(
        ConsoleToken(access_token=pair.access_token, expires_in=pair.expires_in).model_dump()
    )
    set_refresh_cookie(response, ctx.settings, pair.refresh_token)
    _no_store(response)
    return response


@router.post(
    "/console/session/logout",
    dependencies=_CSRF,
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(403),
)
async def session_logout(request: Request, session: DBSession) -> Response:
    """End the cookie's session (its access tokens stop working at once) and clear the cookie.

    Answers 204 even when there was no session to end.
    """
    state = request.app.state
    token = request.cookies.get(REFRESH_COOKIE)
    claims = None
    if token:
        try:
            claims = await tokens.decode_refresh_token(token)
        except Unauthorized:
            claims = None
    if claims is not None:
        try:
            sid = uuid.UUID(claims.session_id)
        except ValueError:
            sid = None
        if sid is not None:
            ended = await sessions.revoke(
                session, state.redis, state.settings, claims.user_id, only=[sid]
            )
            if ended:
                record(
                    session,
                    "auth.logout",
                    origin=Origin.of(request),
                    actor_user_id=claims.user_id,
                    target_type="session",
                    target_id=sid,
                )
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_refresh_cookie(response)
    _no_store(response)
    return response


def install(app: FastAPI) -> None:
    """Mount the console on ``app``: pages at ``/``, assets at ``/console/static``."""
    app.include_router(router)
    app.mount("/console/static", ConsoleAssets(directory=STATIC_DIR), name="console-static")


__all__ = ["CSRF_COOKIE", "install", "router"]
