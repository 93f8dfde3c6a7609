"""Both schemas migrate up and down, on MariaDB and on SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, inspect

from atrium.kit import vectordb
from atrium.kit.migrations import downgrade_account_db, upgrade_account_db
from tests.support import services


def _tables(sync_url: str) -> set[str]:
    engine = create_engine(sync_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_account_migrations_up_and_down_on_mariadb(test_env: dict[str, Any]) -> None:
    name = services.create_mysql_database()
    try:
        base = (
            f"{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@{services.MYSQL_HOST}:"
            f"{services.MYSQL_PORT}/{name}"
        )
        url, sync_url = f"mysql+aiomysql://{base}", f"mysql+pymysql://{base}"
        upgrade_account_db(url)
        assert {"users", "tenants", "memberships", "alembic_version"} <= _tables(sync_url)
        downgrade_account_db(url)
        assert _tables(sync_url) == {"alembic_version"}
        upgrade_account_db(url)
        assert "users" in _tables(sync_url)
    finally:
        services.drop_mysql_database(name)


def test_account_migrations_up_and_down_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    url, sync_url = f"sqlite+aiosqlite:///{db}", f"sqlite:///{db}"
    upgrade_account_db(url)
    assert {"users", "tenants", "memberships"} <= _tables(sync_url)
    downgrade_account_db(url)
    assert _tables(sync_url) == {"alembic_version"}


async def test_vector_schema_up_down_and_dimension_guard(settings: Any) -> None:
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        await conn.execute("CREATE SCHEMA mig_test")
        await conn.execute("SET search_path = mig_test, public")
        await conn.commit()
        try:
            assert await vectordb.migrate(conn, 8) == vectordb.HEAD
            assert await vectordb.stored_dimension(conn) == 8
            with pytest.raises(vectordb.VectorSchemaError, match="ATRIUM_EMBEDDING_DIMENSION"):
                await vectordb.migrate(conn, 16)
            assert await vectordb.migrate(conn, 8, target=0) == 0
            cur = await conn.execute("SELECT to_regclass('mig_test.chunks')")
            assert (await cur.fetchone()) == (None,)
            assert await vectordb.migrate(conn, 16) == vectordb.HEAD
        finally:
            await conn.rollback()
            await conn.execute("DROP SCHEMA mig_test CASCADE")
            await conn.commit()


async def test_tenant_partition_gets_hnsw_and_fulltext_indexes(settings: Any) -> None:
    tenant = uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        name = await vectordb.ensure_tenant_partition(conn, tenant)
        assert await vectordb.ensure_tenant_partition(conn, tenant) == name  # idempotent
        cur = await conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (name,))
        defs = " ".join(r[0] for r in await cur.fetchall())
        assert "hnsw" in defs and "vector_cosine_ops" in defs
        assert "gin" in defs and "tsv" in defs
        assert await vectordb.partition_exists(conn, tenant)
        assert await vectordb.drop_tenant_partition(conn, tenant) is True
        assert not await vectordb.partition_exists(conn, tenant)
        assert await vectordb.drop_tenant_partition(conn, tenant) is False
