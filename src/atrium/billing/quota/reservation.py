"""A reservation: capacity held for one unit of work, settled or given back when it ends."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.periods import period_of
from atrium.billing.quota.snapshot import TenantBilling, reservations_key
from atrium.kit.db import after_commit
from atrium.kit.ratelimit import Bucket, RateLimitState

if TYPE_CHECKING:
    from atrium.billing.quota.engine import Quota

log = structlog.get_logger("atrium.billing.quota")


class Reservation:
    """Capacity held for a unit of work; see :meth:`Quota.reserve` and :meth:`Quota.hold`.

    Ends in one of three ways: :meth:`commit` (recorded now), :meth:`record_later` (recorded
    with the engine's next batched write) or :meth:`release` (given back). Both records go
    through the same write (:class:`~atrium.billing.quota.batching.Batch`).
    """

    def __init__(
        self,
        quota: Quota,
        tenant_id: uuid.UUID,
        metric: Metric,
        amount: int,
        ttl: int,
        defer_to: AsyncSession | None = None,
    ) -> None:
        if amount < 0:
            raise ValueError("a reservation amount cannot be negative")
        self.quota = quota
        self.tenant_id = tenant_id
        self.metric = metric
        self.amount = amount
        self.ttl = ttl
        self.actual: int | None = None
        self.member = f"{uuid.uuid4().hex}:{amount}"
        #: The snapshot the reservation was admitted under (None until placed).
        self.billing: TenantBilling | None = None
        #: Whether Redis holds it (an amount of 0 holds nothing).
        self.held = False
        self._done = False
        #: The request's unit of work whose commit the recording waits for (SQLite only).
        self._defer_to = defer_to
        #: Replies to the commands sent ``alongside`` the reservation (see :meth:`acquire`).
        self.replies: list[Any] = []

    async def acquire(
        self,
        alongside: Sequence[tuple[str, ...]] = (),
        *,
        writes: Sequence[tuple[Any, ...]] = (),
        rate_limit: Bucket | None = None,
        rate_limits: list[RateLimitState] | None = None,
    ) -> Reservation:
        """Hold the capacity.

        Args:
            alongside: Redis commands to send in the same round trip (a search reads its
                cache versions this way); their replies land in :attr:`replies`.
            writes: best-effort writes to send in the same round trip (replies dropped).
            rate_limit: the caller's rate-limit bucket, counted first in the same script.
            rate_limits: where the rate limit's outcome goes (the response's headers).

        Raises:
            TooManyRequests: ``rate_limit`` refused the request (nothing is held).
            QuotaExceeded: when ``amount`` does not fit in what is left.
        """
        await self.quota.place(
            self.tenant_id,
            [self],
            alongside,
            self.replies,
            writes=writes,
            rate_limit=rate_limit,
            rate_limits=rate_limits,
        )
        return self

    def settle(self, actual: int) -> None:
        """Say how much the work really used (may differ from the reservation: tokens)."""
        if actual < 0:
            raise ValueError("a settled amount cannot be negative")
        self.actual = actual

    async def commit(self, actual: int | None = None) -> None:
        """Record the work (``actual``, else what :meth:`settle` said, else ``amount``): now,
        or on SQLite inside a request once the request has committed."""
        amount = self._finish(actual)
        if amount is None:
            return
        if self._defer_to is not None and amount != 0:

            async def when_done(committed: bool) -> None:
                # The work's rows are committed (count it) or rolled back (give it back).
                await (self._record(amount) if committed else self.release())

            if after_commit(self._defer_to, when_done):
                return
        await self._record(amount)

    async def record_later(self, actual: int | None = None) -> None:
        """Like :meth:`commit`, but recorded in MySQL with the next batch (searches, answers,
        tokens: work done all day long, where a transaction each would cost more than the
        work). The capacity stays held until the batch is written."""
        amount = self._finish(actual)
        if amount is None:
            return
        if amount == 0:
            await self.release()
            return
        self.quota.batch.add(self, amount)

    async def release(self) -> None:
        """Give the reservation back (the work failed or was not done)."""
        self._done = True
        if not self.held or self.billing is None:
            return
        self.held = False
        tag, _ = period_of(self.billing.period, self.metric)
        await self.quota.redis.zrem(reservations_key(self.tenant_id, tag, self.metric), self.member)

    def _finish(self, actual: int | None) -> int | None:
        """Mark the reservation done; the amount to record, or None when it already was."""
        if self._done:
            return None
        self._done = True
        if actual is not None:
            self.actual = actual
        assert self.billing is not None, "acquire() first"
        return self.amount if self.actual is None else self.actual

    async def _record(self, amount: int) -> None:
        if amount == 0:
            # Nothing was used (a duplicate upload...): just give the hold back.
            await self.release()
            return
        try:
            await self.quota.batch.write_now(self, amount)
        except Exception:
            # The work happened; failing its response because the meter is down would be
            # worse than the lost figure. Give the capacity back and say so loudly.
            log.exception(
                "usage_not_recorded",
                tenant_id=str(self.tenant_id),
                metric=self.metric.value,
                amount=amount,
            )
            await self.release()

    async def __aenter__(self) -> Reservation:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if exc_type is None or self.actual is not None:
            # Settled work was done even if something failed after it: count it.
            await self.commit()
        else:
            await self.release()
