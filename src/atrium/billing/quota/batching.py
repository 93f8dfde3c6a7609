"""Writing settled work: the one settle path of the quota engine.

Settled reservations are grouped by tenant, metric and period, written to MySQL in one short
transaction (a few multi-row statements), then mirrored to Redis with the reservations they
settle dropped in the same script, then checked for usage warnings. Work done all day long
(searches, answers, tokens) waits up to :data:`BATCH_FLUSH_SECONDS` to share a write with
the rest of the process's work; other work is written at once, on its own.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.quota import repository
from atrium.billing.quota.alerts import maybe_alert
from atrium.billing.quota.periods import hash_ttl_ms, period_of
from atrium.billing.quota.repository import Group
from atrium.billing.quota.snapshot import reservations_key, usage_key
from atrium.kit.db import after_commit, write_session

if TYPE_CHECKING:
    from atrium.billing.quota.engine import Quota
    from atrium.billing.quota.reservation import Reservation

log = structlog.get_logger("atrium.billing.quota")

#: High-frequency work (searches, answers, LLM tokens) is recorded in MySQL in batches: at most
#: this many seconds after the work, in one transaction per batch. Until then its reservation
#: keeps holding the capacity in Redis, so limits stay exact; only the MySQL figures lag.
BATCH_FLUSH_SECONDS = 1.0
#: A batch this large is written at once instead of waiting for the timer.
BATCH_MAX = 500

Settled = tuple["Reservation", int]
Figures = list[tuple[int, int] | None]


def _groups(settled: list[Settled]) -> list[Group]:
    """Settlements summed per tenant, metric and period, in the order every process locks
    their rows in (so concurrent batches never deadlock)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for reservation, amount in settled:
        billing = reservation.billing
        assert billing is not None, "settled before it was placed"
        tag, period_start = period_of(billing.period, reservation.metric)
        key = (str(billing.tenant_id), reservation.metric.value, tag)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(billing, reservation.metric, tag, period_start)
        group.amount += amount
        if reservation.held:
            group.members.append(reservation.member)
    return [groups[k] for k in sorted(groups)]


class Batch:
    """An engine's settled work waiting for its write, and the write itself."""

    def __init__(self, quota: Quota) -> None:
        self._quota = quota
        self._queue: list[Settled] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def add(self, reservation: Reservation, amount: int) -> None:
        """Queue settled work for the next batched write (within :data:`BATCH_FLUSH_SECONDS`).

        The reservation stays in Redis until the write has mirrored the new figure there, so
        ``used + reserved`` never drops in between and limits stay exact. A search then costs
        its caller one Redis script (the reservation) instead of a MySQL transaction: batches
        add every tenant's searches of the last second in one transaction.
        """
        self._queue.append((reservation, amount))
        if len(self._queue) >= BATCH_MAX:
            self._start_flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(BATCH_FLUSH_SECONDS, self._start_flush)

    async def write_now(self, reservation: Reservation, amount: int) -> None:
        """Write one settlement at once, in its own transaction (not waiting for the batch).

        Raises:
            Exception: whatever MySQL raised (after retrying deadlocks); nothing is written.
        """
        groups = _groups([(reservation, amount)])
        await self._mirror(groups, await repository.with_retry(lambda: self._write(groups)))

    async def flush(self, within: AsyncSession | None = None) -> None:
        """Write every queued settlement now: one MySQL transaction, then one Redis round trip.

        Called by the timer, before usage figures are read (so a caller sees its own work
        counted at once), and at shutdown. When MySQL cannot be written the work is queued
        again for the next attempt; the reservations keep holding the capacity meanwhile.

        Args:
            within: an open :func:`~atrium.kit.db.unit_of_work` to write the figures in, so
                they commit with the caller's own rows (a document's settlements with its
                ``ready``: one transaction less per document). Redis is updated once that
                commits; on a rollback the work is queued again. Without one (or when it is
                no longer open), the batch gets its own transaction.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queue = self._queue, []
        if not queued:
            return
        groups = _groups(queued)
        if within is not None:
            written: Figures = []

            async def when_done(committed: bool) -> None:
                if committed:
                    await self._mirror(groups, written)
                else:
                    self._requeue(queued)

            if after_commit(within, when_done):
                # A failure here propagates to the caller, whose rollback queues the work again.
                written.extend(await repository.write_groups(within, groups))
                return
        try:
            figures = await repository.with_retry(lambda: self._write(groups))
        except Exception:
            log.exception(
                "usage_batch_not_recorded_yet", settlements=len(queued), groups=len(groups)
            )
            self._requeue(queued)
            return
        await self._mirror(groups, figures)

    async def close(self) -> None:
        """Write what is queued and wait for writes in flight (at shutdown)."""
        await self.flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _start_flush(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        # Keep a reference until done: the loop holds tasks only weakly.
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _requeue(self, queued: list[Settled]) -> None:
        """Queue work whose write failed for the next attempt."""
        self._queue[:0] = queued
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                BATCH_FLUSH_SECONDS, self._start_flush
            )

    async def _write(self, groups: list[Group]) -> Figures:
        async with write_session(self._quota.sessionmaker) as session:
            figures = await repository.write_groups(session, groups)
            await session.commit()
            return figures

    async def _mirror(self, groups: list[Group], figures: Figures) -> None:
        """Copy written figures to Redis (dropping the settled reservations), then warn."""
        quota = self._quota
        try:
            async with quota.redis.pipeline(transaction=False) as pipe:
                for g, figure in zip(groups, figures, strict=True):
                    if figure is None:
                        continue
                    used, version = figure
                    await quota.scripts.settle(
                        keys=[
                            usage_key(g.billing.tenant_id, g.tag),
                            reservations_key(g.billing.tenant_id, g.tag, g.metric),
                        ],
                        args=[
                            g.metric.value,
                            "",
                            used,
                            version,
                            hash_ttl_ms(g.billing.period, g.metric),
                            *g.members,
                        ],
                        client=pipe,
                    )
                await pipe.execute()
        except Exception:
            # MySQL has the figures; Redis catches up at its next rebuild or settle, and the
            # reservations lapse on their own.
            log.exception("usage_batch_not_mirrored", groups=len(groups))
        for g, figure in zip(groups, figures, strict=True):
            if figure is not None and g.amount > 0:
                await maybe_alert(quota, g.billing, g.metric, figure[0])
