"""The API as a real HTTP server: ``atrium serve`` in a subprocess on a free loopback port.

Clients that must speak HTTP over a socket (the SDK's sync client, the ``atr`` command, an MCP
client) talk to it. It runs with the session's environment (test_env's MariaDB database, Redis
dbs, embedded PostgreSQL and SMTP server), so it sees what the in-process ``app`` fixture writes
and the session's Celery worker processes what it enqueues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.load import free_port


def wait_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    name: str,
    tail: Callable[[], str],
    timeout: float,
) -> None:
    """Wait until the server ``proc`` at ``url`` answers ``/readyz`` with 200.

    Raises:
        RuntimeError: it exited, or was not ready in ``timeout`` seconds (with ``tail()``).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{name} never became ready:\n{tail()}")


class LiveServer:
    """One ``atrium serve`` process; ``url`` is its base URL."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "ATRIUM_HOST": "127.0.0.1", "ATRIUM_PORT": str(self.port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atrium.cli", "serve"],
            env=self.env,
            cwd=Path(__file__).resolve().parents[2],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(self.proc, self.url, "atrium serve", self.tail, timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
