"""The job outbox: Celery jobs written in the transaction of the work that asked for them."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from atrium.models.base import Base, UTCDateTime, utcnow


class OutboxJob(Base):
    """A job committed with its unit of work and not yet known to be on the broker.

    The request that enqueued it publishes it right after commit and deletes the row; when
    the broker could not take it then, the relay (:mod:`atrium.kit.outbox`) publishes it later.
    The row's ``id`` is the Celery task id, so the consumer of a job published twice (published,
    then the delete failed) can tell.
    """

    __tablename__ = "job_outbox"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    kwargs: Mapped[dict[str, Any]] = mapped_column(JSON)
    options: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now(), index=True
    )
    #: Publications the relay tried and the broker refused (for operators; never a limit).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
