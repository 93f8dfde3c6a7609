"""Backup and restore of Atrium's state: account database, vector database, local blobs.

Used by ``scripts/backup`` and ``scripts/restore``. Standard library only, so it runs on any host
with the database clients (``mysqldump``/``mysql`` or ``mariadb-dump``/``mariadb``,
``pg_dump``/``pg_restore``); settings come from the environment and an optional env file, the
environment winning, as in Atrium itself.

A backup is a directory::

    atrium-backup-20260101T120000Z/
      MANIFEST.json        what is inside, where it came from, sizes, sha256 of each file
      account.sql.gz       mysqldump --single-transaction (MySQL/MariaDB), or
      account.sqlite3      an online SQLite backup (development default)
      vectors.pgdump       pg_dump custom format (restores in parallel with pg_restore -j)
      blobs.tar.gz         data_dir/blobs when the blob store is local (S3: not included)
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]


class BackupError(Exception):
    """A problem a person can fix; the message says how."""


# Settings ---------------------------------------------------------------------------------


def read_env_file(path: Path | None) -> dict[str, str]:
    """KEY=VALUE lines of an env file (missing file: empty)."""
    values: dict[str, str] = {}
    if path is None or not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@dataclass
class Config:
    """The settings a backup needs, resolved like atrium.config.Settings does."""

    data_dir: Path
    database_url: str
    vector_database_url: str
    blob_url: str

    @classmethod
    def load(cls, env_file: Path | None) -> Config:
        values = read_env_file(env_file)
        values.update({k: v for k, v in os.environ.items() if k.startswith("ATRIUM_")})
        data_dir = Path(values.get("ATRIUM_DATA_DIR") or "var")
        if not data_dir.is_absolute():
            data_dir = (Path.cwd() / data_dir).resolve()
        return cls(
            data_dir=data_dir,
            database_url=values.get("ATRIUM_DATABASE_URL", ""),
            vector_database_url=values.get("ATRIUM_VECTOR_DATABASE_URL", ""),
            blob_url=values.get("ATRIUM_BLOB_URL", ""),
        )

    @property
    def sqlite_path(self) -> Path:
        if not self.database_url:
            return self.data_dir / "atrium.db"
        return Path(self.database_url.split(":///", 1)[1])

    @property
    def account_kind(self) -> str:
        if not self.database_url or self.database_url.startswith("sqlite"):
            return "sqlite"
        if self.database_url.startswith("mysql"):
            return "mysql"
        raise BackupError(f"unsupported ATRIUM_DATABASE_URL scheme: {self.database_url[:20]}...")

    @property
    def pg_conninfo(self) -> str:
        """A libpq URL; the embedded server's socket when no URL is configured."""
        if self.vector_database_url:
            return self.vector_database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        pgdata = self.data_dir / "pgdata"
        if not (pgdata / "postmaster.pid").exists():
            raise BackupError(
                f"the embedded PostgreSQL in {pgdata} is not running: start Atrium "
                "(./scripts/run) in another terminal, then run this again"
            )
        return f"postgresql://postgres@/atrium?host={pgdata}"


# Tools ------------------------------------------------------------------------------------


def _which(*names: str, extra_dirs: list[Path] | None = None) -> str:
    for d in extra_dirs or []:
        for name in names:
            if (d / name).is_file():
                return str(d / name)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise BackupError(f"none of {', '.join(names)} is installed (apt-get install the client)")


def pg_bin_dirs() -> list[Path]:
    """Where to look for pg_dump first: $PG_BIN, then the embedded server's own binaries.

    pg_dump must be at least as new as the server; the embedded one always matches.
    """
    dirs = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
    dirs += sorted(ROOT.glob(".venv/lib/python3*/site-packages/pgserver/pginstall/bin"))
    return dirs


def mysql_args(url: str) -> tuple[list[str], dict[str, str], str]:
    """Connection arguments for the mysql clients, the password in the environment (not argv)."""
    parts = urlsplit(url)
    database = parts.path.lstrip("/")
    if not database:
        raise BackupError("ATRIUM_DATABASE_URL names no database")
    args = [f"--host={parts.hostname or '127.0.0.1'}", f"--port={parts.port or 3306}"]
    if parts.username:
        args.append(f"--user={unquote(parts.username)}")
    charset = parse_qs(parts.query).get("charset", ["utf8mb4"])[0]
    args.append(f"--default-character-set={charset}")
    env = dict(os.environ)
    if parts.password:
        env["MYSQL_PWD"] = unquote(parts.password)
    return args, env, database


def _run(argv: list[str], **kwargs: object) -> None:
    try:
        subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        raise BackupError(f"{Path(argv[0]).name} failed with exit code {exc.returncode}") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Backup -----------------------------------------------------------------------------------


def backup(cfg: Config, out_root: Path, *, include_blobs: bool = True) -> Path:
    """Write a backup directory under ``out_root`` and return it."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out_root / f"atrium-backup-{stamp}"
    target.mkdir(parents=True, exist_ok=False)
    os.chmod(target, 0o700)
    files: dict[str, dict[str, object]] = {}

    if cfg.account_kind == "mysql":
        args, env, database = mysql_args(cfg.database_url)
        dump = _which("mysqldump", "mariadb-dump")
        path = target / "account.sql.gz"
        with gzip.open(path, "wb") as out:
            proc = subprocess.Popen(
                [
                    dump,
                    *args,
                    "--single-transaction",
                    "--quick",
                    "--routines",
                    "--triggers",
                    "--hex-blob",
                    "--no-tablespaces",
                    database,
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            assert proc.stdout is not None
            shutil.copyfileobj(proc.stdout, out)
            if proc.wait() != 0:
                raise BackupError(f"{Path(dump).name} failed with exit code {proc.returncode}")
        files["account.sql.gz"] = {"kind": "mysql", "database": database}
    else:
        src = cfg.sqlite_path
        if not src.exists():
            raise BackupError(f"no SQLite database at {src}: nothing to back up")
        path = target / "account.sqlite3"
        with sqlite3.connect(src) as s, sqlite3.connect(path) as d:
            s.backup(d)  # consistent even while Atrium writes
        files["account.sqlite3"] = {"kind": "sqlite"}

    pg_dump = _which("pg_dump", extra_dirs=pg_bin_dirs())
    path = target / "vectors.pgdump"
    _run(
        [
            pg_dump,
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            f"--file={path}",
            f"--dbname={cfg.pg_conninfo}",
        ]
    )
    files["vectors.pgdump"] = {"kind": "postgresql"}

    blobs = cfg.data_dir / "blobs"
    if include_blobs and not cfg.blob_url and blobs.is_dir():
        path = target / "blobs.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(blobs, arcname="blobs")
        files["blobs.tar.gz"] = {"kind": "blobs"}

    for name, meta in files.items():
        p = target / name
        meta.update({"bytes": p.stat().st_size, "sha256": sha256(p)})
    manifest = {
        "format": 1,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "blob_store": cfg.blob_url or "local",
        "files": files,
    }
    (target / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


# Restore ----------------------------------------------------------------------------------


def verify(source: Path) -> dict[str, dict[str, object]]:
    """Check every file of a backup against its manifest; returns the manifest's files."""
    manifest_path = source / "MANIFEST.json"
    if not manifest_path.is_file():
        raise BackupError(f"{source} has no MANIFEST.json: is it a backup directory?")
    files: dict[str, dict[str, object]] = json.loads(manifest_path.read_text())["files"]
    for name, meta in files.items():
        p = source / name
        if not p.is_file() or sha256(p) != meta["sha256"]:
            raise BackupError(f"{p} is missing or damaged (sha256 differs from MANIFEST.json)")
    return files


def restore(cfg: Config, source: Path) -> list[str]:
    """Load a backup into the configured databases (which it replaces); returns what it did."""
    files = verify(source)
    done: list[str] = []

    if "account.sql.gz" in files:
        if cfg.account_kind != "mysql":
            raise BackupError("this backup holds a MySQL dump; set ATRIUM_DATABASE_URL to MySQL")
        args, env, database = mysql_args(cfg.database_url)
        client = _which("mysql", "mariadb")
        # The dump names no database (no CREATE DATABASE/USE): it loads into the configured one.
        _run(
            [
                client,
                *args,
                "-e",
                f"DROP DATABASE IF EXISTS `{database}`; CREATE DATABASE `{database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
            ],
            env=env,
        )
        with gzip.open(source / "account.sql.gz", "rb") as dump:
            proc = subprocess.Popen([client, *args, database], stdin=subprocess.PIPE, env=env)
            assert proc.stdin is not None
            shutil.copyfileobj(dump, proc.stdin)
            proc.stdin.close()
            if proc.wait() != 0:
                raise BackupError(f"loading the MySQL dump failed (exit {proc.returncode})")
        done.append(f"account database {database} restored")
    elif "account.sqlite3" in files:
        if cfg.account_kind != "sqlite":
            raise BackupError("this backup holds SQLite; unset ATRIUM_DATABASE_URL to restore it")
        dest = cfg.sqlite_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(source / "account.sqlite3") as s, sqlite3.connect(dest) as d:
            s.backup(d)
        done.append(f"account database {dest} restored")

    if "vectors.pgdump" in files:
        pg_restore = _which("pg_restore", extra_dirs=pg_bin_dirs())
        _run(
            [
                pg_restore,
                "--clean",
                "--if-exists",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                f"--dbname={cfg.pg_conninfo}",
                str(source / "vectors.pgdump"),
            ]
        )
        done.append("vector database restored")

    if "blobs.tar.gz" in files:
        blobs = cfg.data_dir / "blobs"
        if blobs.exists():
            shutil.rmtree(blobs)
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source / "blobs.tar.gz", "r:gz") as tar:
            tar.extractall(cfg.data_dir, filter="data")
        done.append(f"blobs restored to {blobs}")
    return done


def fail(exc: BackupError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2
