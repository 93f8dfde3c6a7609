"""The Celery worker of the tests: ``atrium worker`` plus the test-only tasks.

    python -m tests.support.worker [atrium worker options]

``TEST_WORKER_QUEUE`` (optional) makes it consume that queue instead of the default one, so a
test can run a worker with its own settings beside the session's worker on the same broker.
``TEST_WORKER_PRELOAD_LITELLM`` (optional) imports litellm in the main process.
"""

from __future__ import annotations

import asyncio
import os
import sys

import tests.support.tasks  # noqa: F401  (registers the test-only tasks)
from atrium.cli import cli
from atrium.worker import celery_app

if __name__ == "__main__":
    queue = os.environ.get("TEST_WORKER_QUEUE")
    if queue:
        celery_app.conf.task_default_queue = queue
    if os.environ.get("TEST_WORKER_PRELOAD_LITELLM"):
        # Imported before the pool forks, so a pool process a test kills is replaced by one
        # that has it (its import takes seconds on every first hosted call otherwise).
        from atrium.kit.litellm import litellm_module

        asyncio.run(litellm_module())
    cli(["worker", *sys.argv[1:]])
