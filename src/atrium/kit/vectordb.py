"""The vector database: PostgreSQL + pgvector through psycopg 3.

Chunks live in one table partitioned ``BY LIST (tenant_id)``; each tenant gets its own partition,
and with it its own HNSW and full-text indexes (declared on the parent, so PostgreSQL builds them
for every new partition). Dropping a tenant drops its partition: instant, no bloat.

The schema is versioned in ``atrium_schema``: :data:`MIGRATIONS` lists each step with its undo.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Migration:
    """One versioned step of the vector schema."""

    version: int
    description: str
    up: str
    down: str


# ``{dim}`` is replaced by the configured embedding dimension when the schema is first created.
MIGRATIONS: Sequence[Migration] = (
    Migration(
        1,
        "partitioned chunks table with HNSW and full-text indexes",
        """
        CREATE TABLE chunks (
            tenant_id     uuid        NOT NULL,
            id            uuid        NOT NULL,
            collection_id uuid        NOT NULL,
            document_id   uuid        NOT NULL,
            ordinal       integer     NOT NULL,
            text          text        NOT NULL,
            token_count   integer     NOT NULL DEFAULT 0,
            metadata      jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
            tsv           tsvector    GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
            embedding     vector({dim}) NOT NULL,
            created_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, id),
            UNIQUE (tenant_id, document_id, ordinal)
        ) PARTITION BY LIST (tenant_id);
        CREATE INDEX chunks_embedding_hnsw ON chunks
            USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
        CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);
        CREATE INDEX chunks_collection ON chunks (tenant_id, collection_id);
        CREATE TABLE tenant_partitions (
            tenant_id      uuid PRIMARY KEY,
            partition_name text NOT NULL UNIQUE,
            created_at     timestamptz NOT NULL DEFAULT now()
        );
        """,
        "DROP TABLE IF EXISTS chunks CASCADE; DROP TABLE IF EXISTS tenant_partitions;",
    ),
    Migration(
        2,
        "full text per collection language, and BM25 statistics (lexicon, text_stats)",
        # ``atrium_tsv`` takes the configuration's name as text (a regconfig column cannot be
        # written by binary COPY without looking up OIDs); it is declared immutable like
        # to_tsvector(regconfig, text) itself: the built-in configurations never change.
        # ``tsv_len`` (the chunk's length in words, stop words excluded) is BM25's document
        # length; a generated column cannot read another one, hence the second atrium_tsv.
        # ``lexicon`` holds each lexeme's document frequency (in chunks) per tenant and
        # ``text_stats`` the tenant's chunk count and total length: both change in the same
        # transaction as the chunks (ingestion.vectorstore), so IDF is always current.
        """
        CREATE FUNCTION atrium_tsv(cfg text, body text) RETURNS tsvector
            LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
            AS $$ SELECT to_tsvector(cfg::regconfig, body) $$;
        CREATE FUNCTION atrium_tsv_len(vec tsvector) RETURNS integer
            LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
            AS $$ SELECT coalesce(sum(coalesce(cardinality(positions), 1)), 0)::integer
                  FROM unnest(vec) $$;
        ALTER TABLE chunks ADD COLUMN lang text NOT NULL DEFAULT 'english';
        ALTER TABLE chunks DROP COLUMN tsv;
        ALTER TABLE chunks ADD COLUMN tsv tsvector
            GENERATED ALWAYS AS (atrium_tsv(lang, text)) STORED;
        ALTER TABLE chunks ADD COLUMN tsv_len integer
            GENERATED ALWAYS AS (atrium_tsv_len(atrium_tsv(lang, text))) STORED;
        CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);
        CREATE TABLE lexicon (
            tenant_id uuid    NOT NULL,
            lexeme    text    NOT NULL,
            df        integer NOT NULL,
            PRIMARY KEY (tenant_id, lexeme)
        );
        CREATE TABLE text_stats (
            tenant_id uuid   PRIMARY KEY,
            chunks    bigint NOT NULL,
            total_len bigint NOT NULL
        );
        INSERT INTO lexicon (tenant_id, lexeme, df)
            SELECT c.tenant_id, u.lexeme, count(*) FROM chunks c, unnest(c.tsv) u GROUP BY 1, 2;
        INSERT INTO text_stats (tenant_id, chunks, total_len)
            SELECT tenant_id, count(*), sum(tsv_len) FROM chunks GROUP BY 1;
        """,
        """
        DROP TABLE IF EXISTS lexicon; DROP TABLE IF EXISTS text_stats;
        ALTER TABLE chunks DROP COLUMN tsv_len;
        ALTER TABLE chunks DROP COLUMN tsv;
        ALTER TABLE chunks DROP COLUMN lang;
        ALTER TABLE chunks ADD COLUMN tsv tsvector
            GENERATED ALWAYS AS (to_tsvector('english', text)) STORED;
        CREATE INDEX chunks_tsv_gin ON chunks USING gin (tsv);
        DROP FUNCTION atrium_tsv_len(tsvector); DROP FUNCTION atrium_tsv(text, text);
        """,
    ),
    Migration(
        3,
        "embeddings stored inline (STORAGE MAIN) rather than out of line in TOAST",
        # A chunk's row (a 384-dimension vector is 1.5 kB, its text about as much) is over
        # PostgreSQL's 2 kB TOAST threshold, and pgvector's default storage (EXTERNAL) moves
        # the vector out of line first: every distance of an exact scan, which the planner
        # picks for a small partition, then reads three pages instead of one (3,000 chunks:
        # 9.4 ms instead of 2.3 ms; docs/performance.md). MAIN keeps the vector in the row and
        # compresses or moves the text, metadata and tsvector first; a vector too large for a
        # page still goes out of line. Partitions inherit it; rows written before keep their
        # layout until re-indexed (or VACUUM FULL).
        "ALTER TABLE chunks ALTER COLUMN embedding SET STORAGE MAIN;",
        "ALTER TABLE chunks ALTER COLUMN embedding SET STORAGE EXTERNAL;",
    ),
)

#: The full-text configurations a collection may use (PostgreSQL's built-in ones, present in
#: every supported version): the language its documents are stemmed and searched in.
LANGUAGES: tuple[str, ...] = (
    "simple",
    "arabic",
    "danish",
    "dutch",
    "english",
    "finnish",
    "french",
    "german",
    "greek",
    "hungarian",
    "indonesian",
    "irish",
    "italian",
    "lithuanian",
    "nepali",
    "norwegian",
    "portuguese",
    "romanian",
    "russian",
    "spanish",
    "swedish",
    "tamil",
    "turkish",
)
DEFAULT_LANGUAGE = "english"

HEAD = MIGRATIONS[-1].version


class VectorSchemaError(Exception):
    """The vector database cannot serve this configuration."""


def partition_name(tenant_id: uuid.UUID) -> str:
    """The name of a tenant's partition (derived, so it needs no lookup)."""
    return f"chunks_{tenant_id.hex}"


async def _configure(conn: AsyncConnection) -> None:
    # Custom plans keep partition pruning at plan time: a generic plan (which prepared statements
    # fall into) prunes at run time across every partition, ~30x slower with many tenants.
    # Iterative scans keep filtered HNSW searches returning top_k rows.
    await conn.execute(
        "SET plan_cache_mode = force_custom_plan; SET hnsw.iterative_scan = relaxed_order"
    )
    await conn.commit()


#: Seconds a new connection may take (a host that drops packets, not a refused connection).
CONNECT_TIMEOUT_SECONDS = 5
#: How long the pool keeps retrying one failed connection attempt (with backoff) before it
#: gives up and lets the next checkout start a fresh attempt at once. psycopg_pool's default
#: (5 minutes) doubles the wait between attempts: after a 40 s outage searches went on failing
#: for 18 s after the server was back; with 2 s, the first search after it succeeded
#: (measured, docs/operations.md).
RECONNECT_SECONDS = 2.0


def create_pool(conninfo: str, max_size: int = 10, *, timeout: float = 1.0) -> AsyncConnectionPool:
    """A pool (not yet opened) whose connections are set up for partitioned vector search.

    Each connection is checked as it is handed out (one empty round trip): after the server
    restarted, a dead connection is replaced instead of failing the request.

    Args:
        conninfo: the libpq connection string.
        max_size: connections at most.
        timeout: seconds a checkout waits for a connection (``ATRIUM_VECTOR_POOL_TIMEOUT_SECONDS``)
            before it fails with ``PoolTimeout`` (a 503): while the server is down, no
            connection ever comes, and a search must not hang.
    """
    kwargs: dict[str, object] = {"autocommit": False}
    if "connect_timeout" not in conninfo_to_dict(conninfo):  # one given in the URL wins
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        configure=_configure,
        check=AsyncConnectionPool.check_connection,
        timeout=timeout,
        reconnect_timeout=RECONNECT_SECONDS,
        open=False,
        kwargs=kwargs,
    )


async def current_version(conn: AsyncConnection) -> int:
    """The applied schema version, 0 on an empty database."""
    cur = await conn.execute("SELECT to_regclass('atrium_schema') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM atrium_schema")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def stored_dimension(conn: AsyncConnection) -> int | None:
    """The embedding dimension the schema was created with, if any."""
    if await current_version(conn) == 0:
        return None
    cur = await conn.execute("SELECT value FROM atrium_meta WHERE key = 'embedding_dimension'")
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def migrate(conn: AsyncConnection, dimension: int, target: int = HEAD) -> int:
    """Bring the schema to ``target`` (up or down) in one transaction; returns the new version.

    Raises:
        VectorSchemaError: when the stored embedding dimension differs from ``dimension``.
    """
    async with conn.transaction():
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS atrium_schema (version integer PRIMARY KEY,"
            " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS atrium_meta (key text PRIMARY KEY, value text NOT NULL)"
        )
        version = await current_version(conn)
        stored = await stored_dimension(conn)
        if stored is not None and stored != dimension and version > 0 and target > 0:
            raise VectorSchemaError(
                f"The vector database holds {stored}-dimensional embeddings but "
                f"ATRIUM_EMBEDDING_DIMENSION is {dimension}. Re-index into a new vector database "
                "or set the dimension back."
            )
        await conn.execute(
            "INSERT INTO atrium_meta (key, value) VALUES ('embedding_dimension', %s)"
            " ON CONFLICT (key) DO NOTHING",
            (str(dimension),),
        )
        for m in MIGRATIONS:
            if version < m.version <= target:
                await conn.execute(m.up.format(dim=int(dimension)).encode())
                await conn.execute(
                    "INSERT INTO atrium_schema (version, description) VALUES (%s, %s)",
                    (m.version, m.description),
                )
        for m in reversed(MIGRATIONS):
            if target < m.version <= version:
                await conn.execute(m.down.encode())
                await conn.execute("DELETE FROM atrium_schema WHERE version = %s", (m.version,))
        if target == 0:
            await conn.execute("DELETE FROM atrium_meta WHERE key = 'embedding_dimension'")
    return target


async def ensure_tenant_partition(conn: AsyncConnection, tenant_id: uuid.UUID) -> str:
    """Create the tenant's partition (and, through the parent, its indexes) if missing.

    Idempotent and safe under concurrency: partitions are created lazily, by the first
    ingestion of a tenant, so several workers may ask at once. ``CREATE TABLE IF NOT EXISTS``
    alone is not enough (two transactions can both see no table and one fails on the catalog's
    unique index), so creators of the same partition take a transaction-level advisory lock
    and the second one finds the table.
    """
    name = partition_name(tenant_id)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s)",
            (int.from_bytes(tenant_id.bytes[8:], "big", signed=True),),
        )
        await conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF chunks FOR VALUES IN ({})").format(
                sql.Identifier(name), sql.Literal(str(tenant_id))
            )
        )
        await conn.execute(
            "INSERT INTO tenant_partitions (tenant_id, partition_name) VALUES (%s, %s)"
            " ON CONFLICT (tenant_id) DO NOTHING",
            (tenant_id, name),
        )
    return name


async def drop_tenant_partition(conn: AsyncConnection, tenant_id: uuid.UUID) -> bool:
    """Drop the tenant's partition with all its chunks; returns whether it existed."""
    name = partition_name(tenant_id)
    async with conn.transaction():
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        row = await cur.fetchone()
        existed = bool(row and row[0])
        await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        await conn.execute("DELETE FROM tenant_partitions WHERE tenant_id = %s", (tenant_id,))
        await conn.execute("DELETE FROM lexicon WHERE tenant_id = %s", (tenant_id,))
        await conn.execute("DELETE FROM text_stats WHERE tenant_id = %s", (tenant_id,))
    return existed


async def partition_exists(conn: AsyncConnection, tenant_id: uuid.UUID) -> bool:
    """Whether the tenant's partition exists."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (partition_name(tenant_id),))
    row = await cur.fetchone()
    return bool(row and row[0])
