"""``atrium import``: a bulk first load of many files into one collection.

Each file ends exactly as an upload processed by a worker would: a ``documents`` row (same
checks, limits, title, metadata and SHA-256 de-duplication), its bytes in the blob store (so a
re-index works), its quota counted (documents and bytes before any work, refused at once when
they do not fit; embedding tokens and chunks per document, as the worker holds them) and its
chunks stored. The stages are the worker's own (``stages.DocumentRun`` and ``batch.Batch``:
sandboxed extraction, chunking, shared length-sorted model batches); only the store differs
(``ingestion.bulkstore``): COPY into a standalone table indexed once and attached when the
tenant's partition is empty, COPY into the live partition per group otherwise.

Rows are created ``processing`` and owned by the import's run id, with no job: no worker takes
them while the import heartbeats them, and none is marked ``ready`` before its chunks are
searchable. An import that stops (Ctrl-C, crash) leaves its documents ``processing`` without a
heartbeat: the stuck-job sweeper puts them back in the queue after
``ATRIUM_INGESTION_STUCK_AFTER_SECONDS`` and the workers finish them the normal way; the
unattached table is dropped by the next import. A rerun skips those files (same bytes, same
collection) and imports the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog

from atrium.billing.quota import Metric, Quota
from atrium.collections.repository import CollectionRepository
from atrium.ingestion import bulkstore, detect
from atrium.ingestion.batch import Batch
from atrium.ingestion.exceptions import BadDocument
from atrium.ingestion.job_repository import heartbeat_run, held_by_run
from atrium.ingestion.limits import max_upload_bytes
from atrium.ingestion.repository import (
    Claimed,
    DocumentRepository,
    job_key,
    new_run_id,
)
from atrium.ingestion.service import Incoming, _Checked, _new_document
from atrium.ingestion.stages import DocumentRun, ms
from atrium.ingestion.tools import Tools
from atrium.kit.blobstore import get_blobstore
from atrium.kit.cache_versions import bump_collection_version
from atrium.kit.db import unit_of_work
from atrium.kit.errors import AtriumError, Conflict, NotFound
from atrium.kit.runtime import Resources
from atrium.models.base import utcnow
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus

log = structlog.get_logger("atrium.ingestion")

#: Documents read, embedded and stored together: enough for full model batches, few enough to
#: keep their texts and vectors in memory.
GROUP_DOCUMENTS = 256
#: Seconds between two heartbeats of the import's documents (the sweeper waits minutes).
HEARTBEAT_SECONDS = 10.0


class ImportRefused(AtriumError):
    """The import cannot start (nothing was changed)."""


@dataclass
class ImportReport:
    """What an import did.

    Attributes:
        mode: ``build`` (indexes built once, partition attached) or ``live``.
        imported: documents made ready.
        duplicates: files whose bytes the collection already had.
        failed: ``(file, reason)`` of files refused or failed.
        chunks: chunks written.
        seconds: wall time.
        stages: seconds spent per stage, summed over the documents (``extract``, ``chunk``,
            ``embed``, ``store``) or the import (``register``, ``index``, ``attach``).
    """

    mode: str = ""
    imported: int = 0
    duplicates: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0
    document_ids: list[uuid.UUID] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` more for ``stage``."""
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


def find_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, and those under the directories named (hidden ones skipped), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ImportRefused(f"{path}: no such file or directory")
    return found


async def resolve_collection(res: Resources, tenant_id: uuid.UUID, collection: str) -> Collection:
    """The tenant's active collection with this id or name."""
    async with res.sessionmaker() as session:
        found = await CollectionRepository(session, tenant_id).by_reference(collection)
    if not found:
        raise NotFound(f"The tenant has no collection {collection!r}")
    if len(found) > 1:
        raise ImportRefused(f"Several collections are named {collection!r}; give its id")
    if found[0].status is not CollectionStatus.active:
        raise Conflict("This collection is being deleted; it accepts no more changes")
    return found[0]


async def _busy(res: Resources, tenant_id: uuid.UUID) -> int:
    """Documents of the tenant waiting for or in processing."""
    async with res.sessionmaker() as session:
        return await DocumentRepository(session, tenant_id).in_progress()


async def _check(
    res: Resources, tenant_id: uuid.UUID, files: Sequence[Path], report: ImportReport
) -> list[_Checked]:
    """The upload checks, file by file: a refused file is reported, the others go on."""
    async with res.sessionmaker() as session:
        limit = await max_upload_bytes(session, tenant_id, res.settings)
    checked: list[_Checked] = []
    for path in files:
        size = path.stat().st_size
        if size > limit:
            report.failed.append((str(path), f"{size:,} bytes; the largest upload is {limit:,}"))
            continue
        data = await asyncio.to_thread(path.read_bytes)
        try:
            content_type = await asyncio.to_thread(
                detect.inspect_upload, data, None, f"File '{path.name}'"
            )
        except BadDocument as exc:
            report.failed.append((str(path), exc.message))
            continue

        async def read(p: Path = path) -> bytes:
            return await asyncio.to_thread(p.read_bytes)

        incoming = Incoming(label=str(path), read=read, size=size, filename=path.name)
        checked.append(
            _Checked(
                incoming, hashlib.sha256(data).hexdigest(), content_type, path.name[:500], size
            )
        )
    return checked


async def _register(
    res: Resources,
    quota: Quota,
    collection: Collection,
    items: list[_Checked],
    run_id: str,
    report: ImportReport,
) -> list[Claimed]:
    """Create the documents' rows (``processing``, owned by the import) and store their bytes;
    their documents and bytes are held first, for all of them at once."""
    tenant_id = collection.tenant_id
    fresh: list[_Checked] = []
    async with res.sessionmaker() as session:
        repo = DocumentRepository(session, tenant_id)
        seen: set[str] = set()
        for item in items:
            if item.sha256 in seen or await repo.by_sha(collection.id, item.sha256) is not None:
                report.duplicates.append(item.incoming.label)
            else:
                seen.add(item.sha256)
                fresh.append(item)
    if not fresh:
        return []
    # Before any work: refused here (QuotaExceeded says which limit), nothing is stored.
    held = await quota.hold(
        tenant_id,
        [(Metric.documents, len(fresh)), (Metric.stored_bytes, sum(i.size for i in fresh))],
    )
    claims: list[Claimed] = []
    blobs = get_blobstore(res.settings)
    try:
        async with unit_of_work(res.sessionmaker) as session:
            now = utcnow()
            for item in fresh:
                document = _new_document(tenant_id, collection.id, item)
                document.status = DocumentStatus.processing
                document.stage = "extract"
                document.run_id = run_id
                document.attempts = 1
                document.started_at = now
                session.add(document)
                await blobs.put(document.blob_key, await item.incoming.read())
                claims.append(_claimed(document, collection, now))
            await session.flush()
            for reservation in held:
                await reservation.record_later()
            await quota.flush(within=session)
    except BaseException:
        for reservation in held:
            await reservation.release()
        raise
    return claims


def _claimed(document: Document, collection: Collection, now: Any) -> Claimed:
    return Claimed(
        document_id=document.id,
        tenant_id=document.tenant_id,
        size_bytes=document.size_bytes or 0,
        attempts=1,
        collection_id=collection.id,
        chunk_count=0,
        blob_key=document.blob_key,
        content_type=document.content_type,
        metadata={},
        title=document.title,
        started_at=now,
        filename=document.filename,
        queued_since=None,
        language=collection.language,
    )


async def owned(res: Resources, run_id: str, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The documents among ``ids`` the import still owns (not deleted or taken over)."""
    async with res.sessionmaker() as session:
        return await held_by_run(session, run_id, ids)


@contextlib.asynccontextmanager
async def _heartbeat(res: Resources, run_id: str) -> AsyncIterator[None]:
    """Keep the import's documents alive (the sweeper leaves them) while the block runs."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                async with unit_of_work(res.sessionmaker) as session:
                    await heartbeat_run(session, run_id)
            except Exception as exc:  # a missed beat costs nothing yet
                log.warning("import_heartbeat_failed", error=str(exc))

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _rows(run: DocumentRun) -> bulkstore.Rows:
    assert run.vectors is not None
    return bulkstore.Rows(
        run.claimed.collection_id,
        run.document_id,
        run.texts,
        run.token_counts,
        run.vectors,
        run.metadata,
        run.claimed.language,
    )


async def import_files(
    res: Resources,
    tools: Tools,
    tenant_id: uuid.UUID,
    collection_ref: str,
    paths: Sequence[Path],
    *,
    group_documents: int = GROUP_DOCUMENTS,
    progress: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import the files into the collection (see the module's text).

    Args:
        res: connections and settings.
        tools: the worker's extraction, chunking and embedding tools.
        tenant_id: the tenant.
        collection_ref: the collection's id or name.
        paths: files and directories.
        group_documents: documents embedded and stored together.
        progress: called with a line of progress now and then.

    Raises:
        ImportRefused, NotFound, Conflict: nothing was imported (the message says why).
        QuotaExceeded: the plan has no room for the files' documents or bytes.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    report = ImportReport()
    collection = await resolve_collection(res, tenant_id, collection_ref)
    files = find_files(paths)
    async with await psycopg.AsyncConnection.connect(
        res.settings.vector_conninfo, autocommit=True
    ) as conn:
        await bulkstore.prepare(conn)
        build = not await bulkstore.partition_has_chunks(conn, tenant_id)
        report.mode = "build" if build else "live"
        if build and await _busy(res, tenant_id):
            raise ImportRefused(
                "Documents of this tenant are being processed and its partition is still "
                "empty: wait until they are ready or failed (those of an interrupted import "
                "are given to the workers after ATRIUM_INGESTION_STUCK_AFTER_SECONDS), then "
                "import again"
            )
        items = await _check(res, tenant_id, files, report)
        quota = Quota.for_resources(res)
        run_id = new_run_id(job_key(None))
        mark = time.perf_counter()
        claims = await _register(res, quota, collection, items, run_id, report)
        report.add("register", time.perf_counter() - mark)
        say(f"{len(claims)} new documents ({report.mode}), {len(report.duplicates)} duplicates")
        if build and claims:
            await bulkstore.create_staging(conn, tenant_id)
        batches: list[Batch] = []
        async with _heartbeat(res, run_id):
            try:
                for start in range(0, len(claims), max(1, group_documents)):
                    group = claims[start : start + group_documents]
                    batch = await _process(res, tools, quota, group, run_id, conn, build=build)
                    batches.append(batch)
                    if not build:
                        await _visible(res, batch, started)
                        _tally(batch, report)
                    say(f"{start + len(group)}/{len(claims)} documents embedded and stored")
                if build and claims:
                    await _attach(res, conn, tenant_id, run_id, batches, report)
                    for batch in batches:
                        await _visible(res, batch, started)
                        _tally(batch, report)
            finally:
                for batch in batches:
                    await batch.close()
                if build:
                    await bulkstore.drop_staging(conn, tenant_id)
    report.seconds = time.perf_counter() - started
    return report


async def _process(
    res: Resources,
    tools: Tools,
    quota: Quota,
    group: list[Claimed],
    run_id: str,
    conn: psycopg.AsyncConnection[Any],
    *,
    build: bool,
) -> Batch:
    """Read, chunk, hold, embed and COPY one group of documents (the worker's stages)."""
    runs = [DocumentRun(res, tools, claimed, run_id, quota, solo=False) for claimed in group]
    batch = Batch(res, tools, runs)
    for run in runs:
        await batch.guard(run, run.prepare())
    await batch.embed()
    alive = batch.alive()
    mark = time.perf_counter()
    if build:
        await bulkstore.copy_to_staging(conn, res_tenant(group), [_rows(r) for r in alive])
        for run in alive:
            run.stored = True
            # Kept until the attach, for thousands of documents: the vectors and token ids
            # are in the table now (the texts' count and tokens are what the rows still need).
            run.vectors = None
            run.token_ids = None
    else:
        written = set(
            await bulkstore.copy_live(
                conn,
                res_tenant(group),
                [_rows(r) for r in alive],
                lambda ids: owned(res, run_id, ids),
            )
        )
        for run in alive:
            run.stored = run.document_id in written
    for run in alive:
        run.timings["store_ms"] = ms((time.perf_counter() - mark) / max(1, len(alive)))
    return batch


def res_tenant(group: list[Claimed]) -> uuid.UUID:
    """The tenant of a group (one per import)."""
    return group[0].tenant_id


async def _attach(
    res: Resources,
    conn: psycopg.AsyncConnection[Any],
    tenant_id: uuid.UUID,
    run_id: str,
    batches: list[Batch],
    report: ImportReport,
) -> None:
    """Build the indexes, then attach the table; documents no longer the import's lose their
    chunks first."""
    ids = [run.document_id for batch in batches for run in batch.alive() if run.stored]
    mark = time.perf_counter()
    await bulkstore.build_indexes(conn, tenant_id)
    report.add("index", time.perf_counter() - mark)
    mark = time.perf_counter()
    mine = await owned(res, run_id, ids)
    await bulkstore.drop_unowned(conn, tenant_id, sorted(mine))
    for batch in batches:
        for run in batch.alive():
            run.stored = run.stored and run.document_id in mine
    how = await bulkstore.attach(conn, tenant_id)
    report.add("attach", time.perf_counter() - mark)
    if how != "attached":
        log.warning("import_merged", tenant_id=str(tenant_id))


async def _visible(res: Resources, batch: Batch, started: float) -> None:
    """The chunks are searchable: move the cache versions, count the chunks, mark ready."""
    for run in batch.alive():
        if not run.stored:
            await batch.end(run, run.outcome("superseded"))
    stored = batch.alive()
    for tenant, collection in sorted({(r.tenant_id, r.claimed.collection_id) for r in stored}):
        await bump_collection_version(res.redis, tenant, collection)
    for run in stored:
        await batch.guard(run, run.stored_and_visible())
    await batch.finish(started)


def _tally(batch: Batch, report: ImportReport) -> None:
    for run in batch.runs:
        for stage in ("extract", "chunk", "embed", "store"):
            report.add(stage, run.timings.get(f"{stage}_ms", 0.0) / 1000)
        outcome = batch.outcomes.get(id(run))
        if outcome is None:
            continue
        if outcome.status == "ready":
            report.imported += 1
            report.chunks += outcome.chunks
            report.document_ids.append(run.document_id)
        else:
            name = run.claimed.filename or str(run.document_id)
            report.failed.append((name, outcome.error or outcome.status))
