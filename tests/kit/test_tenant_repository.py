"""The tenant-scoped repository base (kit/repository.py): every statement it builds carries the
tenant, and a row of another tenant is not read, even by its own id."""

from __future__ import annotations

import uuid
from typing import Any

from atrium.collections.repository import CollectionRepository, name_key
from atrium.models import Role
from atrium.models.ingestion import Collection
from atrium.tenants.repository import MembershipRepository
from tests.support.factories import add_member, create_tenant, create_user


async def test_statements_are_scoped_and_foreign_rows_stay_unseen(
    app: Any, db_session: Any
) -> None:
    owner = await create_user(app)
    mine, theirs = await create_tenant(app, owner), await create_tenant(app, owner)
    await add_member(app, theirs, await create_user(app), Role.owner)
    ours = Collection(tenant_id=mine.id, name="Shared", name_key=name_key("Shared"))
    foreign = Collection(tenant_id=theirs.id, name="Shared", name_key=name_key("Shared"))
    db_session.add_all([ours, foreign])
    await db_session.flush()

    repo = CollectionRepository(db_session, mine.id)
    assert mine.id in repo.select().compile().params.values()
    assert await repo.get(ours.id) is ours
    assert await repo.get(ours.id, for_update=True) is ours
    assert await repo.get(foreign.id) is None  # exists, in another tenant: never read
    assert await repo.get(uuid.uuid4()) is None
    assert await repo.by_name("shared") is ours
    assert await repo.count() == 1
    assert await CollectionRepository(db_session, theirs.id).by_name("SHARED") is foreign

    # count() adds its criteria to the tenant's filter.
    assert await MembershipRepository(db_session, mine.id).owner_count() == 1
    assert await MembershipRepository(db_session, theirs.id).owner_count() == 2
