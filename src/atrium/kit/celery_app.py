"""The Celery application: broker, serialisation, time limits and the beat schedule.

Every process that publishes or defines tasks uses this one app, built from the settings on
first use (a web process that never publishes never builds it). It names no task module:
which modules a worker imports is :mod:`atrium.worker`'s business (it lists every domain's
``tasks.py``), so shared infrastructure (:mod:`atrium.kit.enqueue`, :mod:`atrium.kit.outbox`)
publishes through it without depending on the domains above it.
"""

from __future__ import annotations

import functools

from celery import Celery

from atrium.config import get_settings


def create_celery() -> Celery:
    """Build the Celery app from settings (Redis broker, JSON only, late acks).

    Its task modules are added by :mod:`atrium.worker`.
    """
    settings = get_settings()
    app = Celery("atrium")
    broker = settings.resolved_broker_url
    app.conf.update(
        broker_url=broker,
        result_backend=broker,
        broker_connection_retry_on_startup=True,
        # A task is acknowledged only when done, and given back if its worker dies mid-way:
        # nothing is lost to a crash (every task is idempotent for this reason).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_time_limit=1800,
        task_soft_time_limit=1700,
        result_expires=3600,
        task_always_eager=settings.celery_always_eager,
        # Longer than the longest task, or Redis would hand an unacked task to a second worker.
        # Socket time-outs: a broker that accepts connections and then hangs must not hang a
        # publication (a request's, after its commit) forever; what is not published waits
        # in the job outbox (atrium.kit.outbox). Kombu's BRPOP polls every second, well under.
        broker_transport_options={
            "visibility_timeout": settings.celery_visibility_timeout,
            "socket_connect_timeout": 5,
            "socket_timeout": 5,
        },
        # A child that a large document left large (peak resident memory, in KiB) is replaced
        # after its task, before the next document meets an out-of-memory kill on top of it.
        # A child killed mid-task (the kernel's OOM killer) is covered by the late acks above
        # and the attempt limit of ``ingestion.pipeline``: docs/operations.md.
        worker_max_memory_per_child=(settings.celery_max_memory_per_child_mb * 1024) or None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule_filename=str((settings.data_dir / "celerybeat-schedule").resolve()),
        beat_schedule={
            "ingestion-sweep": {
                "task": "atrium.ingestion.sweep",
                "schedule": float(settings.ingestion_sweep_interval_seconds),
            },
            # Jobs committed but not published (the broker was unreachable): atrium.kit.outbox.
            "outbox-relay": {
                "task": "atrium.outbox.relay",
                "schedule": float(settings.celery_relay_interval_seconds),
                # Ticks queued while no worker ran are worth nothing once the next one is due.
                "options": {"expires": float(settings.celery_relay_interval_seconds)},
            },
        },
        timezone="UTC",
    )
    # Billing periods start on time: atrium.billing.tasks.roll_periods, every minute.
    app.conf.beat_schedule["billing-roll-periods"] = {
        "task": "atrium.billing.roll_periods",
        "schedule": 60.0,
    }
    return app


@functools.cache
def get_celery() -> Celery:
    """This process's Celery app, built from the settings when first asked for."""
    return create_celery()
