"""Which faults of ingestion are worth retrying, and what a tenant may read about them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import psycopg_pool
import redis.exceptions
import sqlalchemy.exc

from atrium.embedding.base import EmbeddingError
from atrium.ingestion.sandbox import SandboxUnavailable
from atrium.kit.errors import outage_of

if TYPE_CHECKING:
    from atrium.ingestion.stages import Outcome


class TransientFailure(Exception):
    """A fault that may go away (database, broker, provider): the task retries later.

    Attributes:
        run_id: the run that met it (None before the document was claimed).
        outcomes: the outcomes of the other documents of its run (finished: to be logged and
            counted like a run's that ended without a retry).
    """

    def __init__(
        self, message: str, run_id: str | None, outcomes: list[Outcome] | None = None
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.outcomes = outcomes or []


def public_reason(exc: BaseException) -> str:
    """What the tenant may read about a transient fault: the component, not its details.

    The exception's own text names hosts, ports and driver internals; it goes to the log
    (``ingestion_retry``), the document's ``error`` gets this.
    """
    if isinstance(exc, EmbeddingError):
        return "the embedding provider was unavailable"
    if isinstance(exc, SandboxUnavailable):
        return "the document reader was unavailable"
    component = outage_of(exc)
    return f"{component} was unavailable" if component else "a connection failed"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed."""
    if isinstance(exc, EmbeddingError):
        return exc.transient
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,
            psycopg.OperationalError,
            psycopg_pool.PoolTimeout,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            ConnectionError,
            TimeoutError,
        ),
    ) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))
