"""scripts/backup and scripts/restore against the real MariaDB and PostgreSQL + pgvector."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import services

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--env-file", "/nonexistent", *args],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        timeout=120,
    )


@pytest.fixture
def vector_db(test_env: dict[str, Any]) -> Any:
    pg = test_env["pg"]
    name = f"bk_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name};")
    uri = pg.get_uri(name)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE probe (id int PRIMARY KEY, v vector(3))")
        conn.execute("INSERT INTO probe VALUES (1, '[1,2,3]'), (2, '[4,5,6]')")
    yield uri
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")


@pytest.fixture
def mysql_db() -> Any:
    name = services.create_mysql_database()
    with services.mysql_connect(name) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE probe (id INT PRIMARY KEY, note VARCHAR(50)) CHARSET utf8mb4")
        cur.execute("INSERT INTO probe VALUES (1, 'héllo ✓'), (2, 'world')")
    yield name
    services.drop_mysql_database(name)


def _mysql_rows(name: str) -> list[tuple[Any, ...]]:
    with services.mysql_connect(name) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, note FROM probe ORDER BY id")
        return list(cur.fetchall())


def _pg_rows(uri: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT id, v::text FROM probe ORDER BY id").fetchall()


def test_backup_and_restore_mysql_postgres_and_blobs(
    tmp_path: Path, mysql_db: str, vector_db: str
) -> None:
    data_dir = tmp_path / "data"
    blob = data_dir / "blobs" / "tenants" / "t1" / "doc.txt"
    blob.parent.mkdir(parents=True)
    blob.write_text("raw upload")
    env = {
        "ATRIUM_DATA_DIR": str(data_dir),
        "ATRIUM_DATABASE_URL": (
            f"mysql+aiomysql://{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@"
            f"{services.MYSQL_HOST}:{services.MYSQL_PORT}/{mysql_db}?charset=utf8mb4"
        ),
        "ATRIUM_VECTOR_DATABASE_URL": vector_db.replace("postgresql://", "postgresql+psycopg://"),
    }
    before_mysql, before_pg = _mysql_rows(mysql_db), _pg_rows(vector_db)

    r = _script("backup", "--out", str(tmp_path / "backups"), env=env)
    assert r.returncode == 0, r.stderr
    target = Path(r.stdout.strip())
    manifest = json.loads((target / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"account.sql.gz", "vectors.pgdump", "blobs.tar.gz"}
    assert (target.stat().st_mode & 0o777) == 0o700

    # Lose data, then restore it.
    with services.mysql_connect(mysql_db) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM probe")
    with psycopg.connect(vector_db, autocommit=True) as conn:
        conn.execute("DROP TABLE probe")
    blob.unlink()

    r = _script("restore", str(target), env=env)
    assert r.returncode == 2 and "--yes" in r.stderr  # nothing happens without consent
    r = _script("restore", "--yes", str(target), env=env)
    assert r.returncode == 0, r.stderr
    assert _mysql_rows(mysql_db) == before_mysql
    assert _pg_rows(vector_db) == before_pg
    assert blob.read_text() == "raw upload"

    # A damaged backup is refused before anything is touched.
    with (target / "vectors.pgdump").open("ab") as f:
        f.write(b"garbage")
    r = _script("restore", "--verify-only", str(target), env=env)
    assert r.returncode == 2
    assert "vectors.pgdump" in r.stderr and "damaged" in r.stderr


def test_backup_and_restore_sqlite(tmp_path: Path, vector_db: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with sqlite3.connect(data_dir / "atrium.db") as db:
        db.execute("CREATE TABLE probe (id INTEGER PRIMARY KEY, note TEXT)")
        db.execute("INSERT INTO probe VALUES (1, 'kept')")
    env = {
        "ATRIUM_DATA_DIR": str(data_dir),
        "ATRIUM_VECTOR_DATABASE_URL": vector_db.replace("postgresql://", "postgresql+psycopg://"),
    }
    r = _script("backup", "--out", str(tmp_path / "b"), env=env)
    assert r.returncode == 0, r.stderr
    target = Path(r.stdout.strip())
    assert "account.sqlite3" in json.loads((target / "MANIFEST.json").read_text())["files"]
    with sqlite3.connect(data_dir / "atrium.db") as db:
        db.execute("DELETE FROM probe")
    r = _script("restore", "--yes", str(target), env=env)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(data_dir / "atrium.db") as db:
        assert db.execute("SELECT note FROM probe").fetchall() == [("kept",)]


def test_backup_explains_a_stopped_embedded_server(tmp_path: Path) -> None:
    (tmp_path / "atrium.db").touch()
    r = _script("backup", "--out", str(tmp_path / "b"), env={"ATRIUM_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "not running" in r.stderr and "./scripts/run" in r.stderr
