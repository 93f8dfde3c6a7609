"""One way to paginate every list: ``?page=1&size=50`` (size at most 100) → ``Page[X]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import Query
from fastapi_pagination import Page
from fastapi_pagination import Params as _DefaultParams
from fastapi_pagination.ext.sqlalchemy import apaginate
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")

__all__ = ["MAX_PAGE", "Page", "Params", "paginate_query"]

#: The last page a list may ask for. Unbounded, a page number such as 2**63 became an OFFSET
#: the database could not take (a 500); no list here is anywhere near 100 million rows.
MAX_PAGE = 1_000_000


class Params(_DefaultParams):
    """``?page=1&size=50``: the page number (at most :data:`MAX_PAGE`) and size (1-100)."""

    page: int = Query(1, ge=1, le=MAX_PAGE, description="Page number")


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
