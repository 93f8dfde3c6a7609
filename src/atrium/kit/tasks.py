"""Infrastructure tasks: a ping that proves the round trip, and mail sending."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task
from sqlalchemy import text

from atrium.config import get_settings
from atrium.kit import email, outbox, runtime
from atrium.kit.celery_app import get_celery

# A task module: imported by the worker only (atrium.worker lists it).
celery_app = get_celery()

log = structlog.get_logger("atrium.email")


@celery_app.task(name="atrium.ping")
def ping(payload: str = "pong") -> dict[str, Any]:
    """Round trip through the broker and the worker's own connections (for operators).

    Reads only: it echoes ``payload`` and runs ``SELECT 1`` on each database and a Redis PING,
    so anyone who can reach the broker learns nothing and changes nothing by sending it.

    Args:
        payload: echoed back.
    """

    async def _check() -> dict[str, Any]:
        res = await runtime.resources()
        async with res.sessionmaker() as session:
            db = (await session.execute(text("SELECT 1"))).scalar_one()
        async with res.vector_pool.connection() as conn:
            cur = await conn.execute("SELECT 1")
            row = await cur.fetchone()
        return {
            "payload": payload,
            "db": db,
            "vector": row[0] if row else None,
            "redis": bool(await res.redis.ping()),
        }

    return runtime.run(_check())


@celery_app.task(name="atrium.email.send", bind=True, max_retries=None)
def send_email(self: Task, template: str, to: list[str], context: dict[str, Any]) -> None:
    """Render a mail template and send it.

    While the SMTP server is unreachable or defers the message, the task retries on the
    schedule of :func:`atrium.kit.email.retry_delays` (by default it covers two hours), so the
    verification, reset and invitation mail of an outage is delivered once the server is back.
    """
    if not outbox.first_delivery(self):
        # The job outbox published this task id twice (kit.outbox): the mail went already.
        log.info("mail_duplicate_skipped", to=to, template=template)
        return
    settings = get_settings()
    mail = email.render(template, to, context)
    try:
        runtime.run(email.send(settings, mail))
    except email.MailDeferred as exc:
        delays = email.retry_delays(settings)
        attempt = self.request.retries
        if attempt >= len(delays):
            log.error("mail_failed", to=to, template=template, attempts=attempt + 1, error=str(exc))
            raise
        log.warning(
            "mail_deferred",
            to=to,
            template=template,
            attempt=attempt + 1,
            retry_in_seconds=delays[attempt],
            error=str(exc),
        )
        raise self.retry(exc=exc, countdown=delays[attempt]) from exc
