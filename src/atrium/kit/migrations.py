"""Run the account-database (Alembic) and vector-database migrations from code."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

from atrium.kit import vectordb

ROOT = Path(__file__).resolve().parents[3]


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` (works from any working directory)."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def _in_thread(fn: object, *args: object) -> None:
    # env.py calls asyncio.run(); it cannot do so inside a running loop, so hop to a thread.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def upgrade_account_db(url: str, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision``."""
    _in_thread(command.upgrade, alembic_config(url), revision)


def downgrade_account_db(url: str, revision: str = "base") -> None:
    """Undo Alembic migrations down to ``revision``."""
    _in_thread(command.downgrade, alembic_config(url), revision)


async def upgrade_vector_db(conninfo: str, dimension: int, target: int | None = None) -> int:
    """Apply the vector schema migrations (``target`` None: the newest)."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        return await vectordb.migrate(conn, dimension, vectordb.HEAD if target is None else target)


def migrate_all(database_url: str, vector_conninfo: str, dimension: int) -> None:
    """Bring both databases to the newest schema."""
    upgrade_account_db(database_url)
    asyncio.run(upgrade_vector_db(vector_conninfo, dimension))
