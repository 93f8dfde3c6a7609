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


async def test_embeddings_stay_in_the_row_from_version_3(settings: Any) -> None:
    """A chunk's vector is stored inline (STORAGE MAIN), not out of line in TOAST, where an
    exact scan of a small partition would read it from other pages for every distance."""
    import numpy as np
    from pgvector.psycopg import register_vector_async

    rng = np.random.default_rng(3)
    text = " ".join("".join(rng.choice(list("abcdefghijklmnop"), 7)) for _ in range(150))

    async def toasted(conn: psycopg.AsyncConnection[Any]) -> bool:
        tenant = uuid.uuid4()
        name = await vectordb.ensure_tenant_partition(conn, tenant)
        await conn.execute(
            "INSERT INTO chunks (tenant_id, id, collection_id, document_id, ordinal, text,"
            " embedding) VALUES (%s, %s, %s, %s, 0, %s, %s)",
            (tenant, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), text, rng.random(384)),
        )
        cur = await conn.execute(
            f"SELECT pg_column_toast_chunk_id(embedding) IS NOT NULL FROM {name}"
        )
        row = await cur.fetchone()
        assert row is not None
        return bool(row[0])

    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        await register_vector_async(conn)
        await conn.execute("CREATE SCHEMA mig_storage")
        await conn.execute("SET search_path = mig_storage, public")
        await conn.commit()
        try:
            await vectordb.migrate(conn, 384, target=2)
            assert await toasted(conn)  # pgvector's default: out of line
            await vectordb.migrate(conn, 384)
            assert not await toasted(conn)  # a partition created after: in the row
            cur = await conn.execute(
                "SELECT DISTINCT attstorage FROM pg_attribute a JOIN pg_class c"
                " ON c.oid = a.attrelid WHERE a.attname = 'embedding'"
                " AND c.relnamespace = 'mig_storage'::regnamespace AND c.relkind IN ('r', 'p')"
            )
            assert [r[0] for r in await cur.fetchall()] == ["m"]  # the older partition too
        finally:
            await conn.rollback()
            await conn.execute("DROP SCHEMA mig_storage CASCADE")
            await conn.commit()
