"""A failed statement's error (and so the error log) never carries its bound values."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from atrium.kit.db import create_engine


async def _failing_insert(engine: Any, marker: str) -> str:
    # A NULL in a NOT NULL column: the statement fails on the server, with its parameters.
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as info:
            await conn.execute(
                text(
                    "INSERT INTO collections (id, tenant_id, name, description) "
                    "VALUES (:i, NULL, :n, :d)"
                ),
                {"i": str(uuid.uuid4()), "n": marker, "d": marker},
            )
    return str(info.value)


async def test_account_database_errors_hide_parameters(app: Any, settings: Any) -> None:
    """Collection names and descriptions are tenant data: not for the error log."""
    marker = f"tenant-secret-{uuid.uuid4().hex}"
    message = await _failing_insert(app.state.engine, marker)
    assert "INSERT INTO collections" in message  # the SQL still says what failed
    assert marker not in message
    # Every engine comes from the same factory (worker, CLI, quota): the same holds there.
    engine = create_engine(settings.resolved_database_url, pool_size=1)
    try:
        assert marker not in await _failing_insert(engine, marker)
    finally:
        await engine.dispose()


async def test_sqlite_errors_hide_parameters(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE collections "
                    "(id TEXT, tenant_id TEXT NOT NULL, name TEXT, description TEXT)"
                )
            )
        marker = f"tenant-secret-{uuid.uuid4().hex}"
        message = await _failing_insert(engine, marker)
        assert "INSERT INTO collections" in message and marker not in message
    finally:
        await engine.dispose()
