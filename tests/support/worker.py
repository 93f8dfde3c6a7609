"""The Celery worker of the tests: ``atrium worker`` plus the test-only tasks.

    python -m tests.support.worker [atrium worker options]

``TEST_WORKER_QUEUE`` (optional) makes it consume that queue instead of the default one, so a
test can run a worker with its own settings beside the session's worker on the same broker.
"""

from __future__ import annotations

import os
import sys

import tests.support.tasks  # noqa: F401  (registers the test-only tasks)
from atrium.cli import cli
from atrium.worker import celery_app

if __name__ == "__main__":
    queue = os.environ.get("TEST_WORKER_QUEUE")
    if queue:
        celery_app.conf.task_default_queue = queue
    cli(["worker", *sys.argv[1:]])
