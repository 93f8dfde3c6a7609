"""Infrastructure tasks: a ping that proves the round trip, and mail sending."""

from __future__ import annotations

from typing import Any

from atrium.config import get_settings
from atrium.kit import email, runtime
from atrium.worker import celery_app


@celery_app.task(name="atrium.ping")
def ping(payload: str = "pong", record_key: str | None = None) -> dict[str, Any]:
    """Round trip through the broker and the worker's own connections.

    Args:
        payload: echoed back.
        record_key: when given, the worker also stores ``payload`` under this Redis key for
            five minutes, so a caller without the result can see that the task ran.
    """

    async def _check() -> dict[str, Any]:
        res = await runtime.resources()
        from sqlalchemy import text

        async with res.sessionmaker() as session:
            db = (await session.execute(text("SELECT 1"))).scalar_one()
        async with res.vector_pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            row = await cur.fetchone()
        if record_key:
            await res.redis.set(record_key, payload, ex=300)
        return {
            "payload": payload,
            "db": db,
            "vector": row[0] if row else None,
            "redis": bool(await res.redis.ping()),
        }

    return runtime.run(_check())


@celery_app.task(
    name="atrium.email.send",
    autoretry_for=(OSError, ConnectionError),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=8,
)
def send_email(template: str, to: list[str], context: dict[str, Any]) -> None:
    """Render a mail template and send it; network faults retry with backoff."""
    settings = get_settings()
    mail = email.render(template, to, context)
    runtime.run(email.send(settings, mail))
