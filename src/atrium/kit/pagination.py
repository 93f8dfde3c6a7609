"""One way to paginate every list: ``?page=1&size=50`` (size at most 100) → ``Page[X]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi_pagination import Page, Params
from fastapi_pagination.ext.sqlalchemy import apaginate
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")

__all__ = ["Page", "Params", "paginate_query"]


async def paginate_query(
    session: AsyncSession,
    query: Select[Any],
    params: Params,
    transformer: Callable[[Sequence[Any]], Sequence[T]] | None = None,
) -> Page[T]:
    """Run ``query`` for one page (plus a count) and build the page.

    Args:
        session: the request's session.
        query: a SELECT already scoped to the caller's tenant by its repository.
        params: the page parameters (``Params = Depends()`` in the route).
        transformer: turns ORM rows into response schemas.
    """
    page: Page[T] = await apaginate(session, query, params, transformer=transformer)
    return page
