"""The Celery worker's entry point: the app of :mod:`atrium.kit.celery_app` with every domain's
task modules, and the worker process's start and shutdown hooks.

Tasks live in their domain's ``tasks.py`` and are listed here; nothing in ``atrium.kit`` imports
this module, so the infrastructure never depends on the domains whose tasks it runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery.signals import worker_init, worker_process_shutdown

from atrium.auth.tokens import configure_jwt
from atrium.config import get_settings
from atrium.kit import runtime
from atrium.kit.celery_app import create_celery, get_celery

__all__ = ["TASK_MODULES", "celery_app", "create_celery"]

TASK_MODULES = [
    "atrium.kit.tasks",
    "atrium.billing.tasks",
    "atrium.accounts.tasks",
    "atrium.tenants.tasks",
    "atrium.apikeys.tasks",
    "atrium.collections.tasks",
    "atrium.ingestion.tasks",
    "atrium.kit.outbox",
]

celery_app = get_celery()
celery_app.conf.update(include=TASK_MODULES)


@worker_init.connect
def _configure(**_: Any) -> None:
    # Before the pool starts, so prefork children inherit it: the JWT library keeps its
    # configuration on a class, and a worker must read tokens as the API signs them.
    configure_jwt(get_settings())


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    # Best effort at process exit: a failing close must not mask the shutdown reason.
    with contextlib.suppress(Exception):
        runtime.run(runtime.close_resources())
