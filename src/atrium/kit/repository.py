"""The base of repositories whose rows belong to one tenant.

A repository is built from the unit of work and the tenant it acts in; every statement it
builds starts from :meth:`TenantRepository.select` (or carries :attr:`TenantRepository.scope`),
so the tenant filter is written once, here, and a row of another tenant is never read, even to
be compared and thrown away. Queries that cross tenants on purpose (the worker's claims and
sweeper, an API key found by its digest) are module functions of their domain's repository.

Generic over the model: ``kit`` imports no domain, so the base knows a model only by the
columns it needs (:class:`TenantOwned`, :class:`TenantEntity`).
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped


class TenantOwned(Protocol):
    """A model whose rows belong to one tenant."""

    # ClassVar: the mapped column on the class, its value on a row (a plain annotation would
    # make the protocol expect a ``Mapped`` on instances, which no model has).
    tenant_id: ClassVar[Mapped[uuid.UUID]]


class TenantEntity(TenantOwned, Protocol):
    """A tenant's model with a UUID key of its own."""

    id: ClassVar[Mapped[uuid.UUID]]


M = TypeVar("M", bound=TenantOwned)
E = TypeVar("E", bound=TenantEntity)


class TenantRepository(Generic[M]):
    """SQL on :attr:`model`, always scoped to :attr:`tenant_id`.

    Subclasses name the model (``model = Collection``) and add the statements of their domain.
    """

    # ``type[M]`` cannot be a ClassVar (a class variable is shared by every parametrisation):
    # the methods read it back as ``type[M]``.
    model: ClassVar[type[Any]]

    def __init__(self, session: AsyncSession, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    @property
    def scope(self) -> ColumnElement[bool]:
        """The tenant filter, for statements that do not start from :meth:`select`
        (``update(...).where(repo.scope, ...)``, a subquery on the model)."""
        model: type[M] = self.model
        return model.tenant_id == self.tenant_id

    def select(self, *entities: Any) -> Select[Any]:
        """``SELECT entities`` (the model itself when none) of the tenant's rows."""
        return select(*(entities or (self.model,))).where(self.scope)

    async def get(
        self: TenantRepository[E], id: uuid.UUID, *, for_update: bool = False
    ) -> E | None:
        """The row with this key, if it belongs to the tenant (filtered in SQL).

        Only for models with an ``id`` column (:class:`TenantEntity`, which ``self``'s type
        asks for; a membership, keyed by tenant and user, has its own lookups).

        Args:
            id: its key.
            for_update: lock it (``SELECT ... FOR UPDATE``) until the transaction ends.
        """
        model: type[E] = self.model
        query = self.select().where(model.id == id)
        if for_update:
            query = query.with_for_update()
        row: E | None = (await self.session.execute(query)).scalar_one_or_none()
        return row

    async def count(self, *criteria: ColumnElement[bool]) -> int:
        """How many of the tenant's rows match ``criteria``."""
        n = await self.session.scalar(
            select(func.count()).select_from(self.model).where(self.scope, *criteria)
        )
        return int(n or 0)
