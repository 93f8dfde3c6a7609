"""Celery tasks that only the tests' worker knows (registered by ``tests.support.worker``).

They stay out of ``src/``: a production worker must not offer anyone who can reach the broker
a task that writes arbitrary Redis keys.
"""

from __future__ import annotations

from atrium.kit import runtime
from atrium.worker import celery_app

RECORD_TASK = "tests.record"


@celery_app.task(name=RECORD_TASK)
def record(key: str, value: str) -> None:
    """Store ``value`` under the Redis ``key`` for five minutes: proof that a job ran."""

    async def _set() -> None:
        res = await runtime.resources()
        await res.redis.set(key, value, ex=300)

    runtime.run(_set())
