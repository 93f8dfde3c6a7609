"""Rate limits for the routes of a signed-in person (``/users/me*``, ``/tenants``, logout).

These routes act on an account, not on a tenant, so the plan's per-user limits of tenant routes
do not apply. They are counted per user (not per IP: one stolen access token must not be able
to hammer an account from many addresses) with :mod:`atrium.kit.ratelimit`'s limits:

* :data:`LimitedUser` replaces :data:`~atrium.auth.dependencies.CurrentUser`: the caller, after
  a general limit of :data:`USER_LIMIT` requests per minute;
* :func:`user_rate_limit` adds a stricter limit to one route (tenant creation, data exports,
  password checks), ``dependencies=[Depends(user_rate_limit("export", 5, 3600))]``.

Redis keys: ``atrium:rl:<name>:user:<user id>``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from atrium.auth.dependencies import CurrentUser, UserPrincipal
from atrium.kit.ratelimit import rate_limit

#: The general limit of every account route, per user: requests per minute.
USER_LIMIT = 120


async def by_user(request: Request) -> str | None:
    """Identify the caller by the user of its access token (resolved by ``CurrentUser``)."""
    principal: UserPrincipal | None = getattr(request.state, "user_principal", None)
    return None if principal is None else f"user:{principal.user.id}"


def user_rate_limit(
    name: str, times: int, seconds: int
) -> Callable[[UserPrincipal, Request], Awaitable[UserPrincipal]]:
    """A route dependency: at most ``times`` requests per ``seconds`` per signed-in user.

    The caller is authenticated first (401 without a valid access token, before anything is
    counted), then counted in the ``name`` bucket; over the limit the answer is 429 with
    ``Retry-After`` and the ``X-RateLimit-*`` headers.

    Args:
        name: the limit's name; routes with the same name share the user's bucket.
        times: requests allowed in the window.
        seconds: the sliding window.
    """
    limiter = rate_limit(name, times, seconds, key=by_user)

    async def dependency(principal: CurrentUser, request: Request) -> UserPrincipal:
        await limiter(request)
        return principal

    dependency.__name__ = f"user_rate_limit_{name.replace('-', '_')}"
    return dependency


limited_user = user_rate_limit("user", USER_LIMIT, 60)

#: The signed-in caller, counted against the general per-user limit of account routes.
LimitedUser = Annotated[UserPrincipal, Depends(limited_user)]
