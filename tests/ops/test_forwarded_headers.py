"""`X-Forwarded-For` is trusted only from the proxy's address, as the shipped files run gunicorn.

The Compose file publishes gunicorn's port directly; if it trusted every peer's forwarded
headers (it once defaulted to ``*``), any client could pick its own IP and the per-IP limits
would vanish. Here gunicorn runs with ``deployment/gunicorn.conf.py`` and the Compose file's
default for ``GUNICORN_FORWARDED_ALLOW_IPS``; a client connecting from another address
(127.0.0.2) forges a new ``X-Forwarded-For`` on every login and is still limited by its own.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
#: Failed logins per minute per client IP (accounts/endpoints.py, the "login" limit).
PER_IP_LOGINS = 20


def _compose_default(variable: str) -> str:
    text = (ROOT / "deployment" / "docker-compose.yml").read_text()
    match = re.search(rf"{variable}: \$\{{{variable}:-([^}}]*)\}}", text)
    assert match, f"{variable} has no default in docker-compose.yml"
    return match[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_compose_trusts_no_forwarded_header_from_clients(
    test_env: dict[str, Any], tmp_path: Path
) -> None:
    allowed = _compose_default("GUNICORN_FORWARDED_ALLOW_IPS")
    assert "*" not in allowed
    port = _free_port()
    env = {
        **os.environ,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKERS": "1",
        "GUNICORN_FORWARDED_ALLOW_IPS": allowed,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gunicorn")),
            "-c",
            str(ROOT / "deployment" / "gunicorn.conf.py"),
            "atrium.app:create_app()",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    # The client's own address is not the proxy's: 127.0.0.2, not in the trusted list.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()[-3000:]
            time.sleep(0.3)
        statuses = []
        with httpx.Client(base_url=url, transport=transport, timeout=30) as client:
            for i in range(PER_IP_LOGINS + 1):
                r = client.post(
                    "/v1/auth/login",
                    data={
                        "username": f"nobody-{uuid.uuid4().hex[:8]}@example.com",
                        "password": "x",
                    },
                    headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
                )
                statuses.append(r.status_code)
        # Every forged address was ignored: the limit counted the real one and stopped it.
        assert statuses[:PER_IP_LOGINS] == [401] * PER_IP_LOGINS, statuses
        assert statuses[-1] == 429, statuses
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
