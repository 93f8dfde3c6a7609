"""gunicorn settings for the Atrium API: uvicorn workers, one app and one set of pools per worker.

    gunicorn -c deployment/gunicorn.conf.py "atrium.app:create_app()"

Every value can be overridden from the environment (GUNICORN_*), so the Docker image, the
systemd unit and a laptop share this file.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# Requests wait on databases, not CPU, but each worker holds its own pools: 2 * cores + 1,
# capped so pools * workers stay under the databases' connection limits.
workers = int(os.environ.get("GUNICORN_WORKERS", min(2 * multiprocessing.cpu_count() + 1, 8)))
worker_class = "uvicorn_worker.UvicornWorker"
# Answers stream for a while (SSE): a worker is only "stuck" after this long without a heartbeat.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# Recycle workers now and then so a slow leak in any library cannot grow without bound.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "5000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "500"))
# Each worker builds its own app (and pools) after the fork; nothing is shared across forks.
preload_app = False
# Trust X-Forwarded-* only from the reverse proxy (nginx/Caddy on the same host by default).
forwarded_allow_ips = os.environ.get("GUNICORN_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# Atrium writes its own structured access line per request (kit/logging.py).
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
proc_name = "atrium-api"

# Metrics from every worker are added up in one directory (prometheus_client multiprocess
# mode). It is read when prometheus_client is imported, so it is set here, in the master,
# before any worker imports the app.
_metrics_dir = Path(
    os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", str(Path(tempfile.gettempdir()) / "atrium-api-metrics")
    )
)


def on_starting(server: Any) -> None:
    """Start with an empty metrics directory: old files would be counted again."""
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for f in _metrics_dir.glob("*.db"):
        f.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live gauges of a worker that exited (its counters are kept)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
