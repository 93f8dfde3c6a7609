"""``atr upload``: files sent in parallel with a byte progress bar, then a bar for processing.

The SDK's ``documents.upload`` sends each file and reports the bytes of its request body as
they go out (``on_progress=``), which moves the bar. Processing is followed with
``documents.get``/``documents.list`` until every document is ``ready`` or ``failed``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from atrium_client import Atrium, AtriumError, NotFound, ProgressCallback, models
from atrium_client._base import PendingFile, local_files


def collect(paths: Sequence[Path]) -> list[PendingFile]:
    """The files to upload: each file given, and every regular file under each directory
    given, as the SDK's ``documents.upload`` collects them (recursively, in name order; hidden
    files and directories, symbolic links and anything not a regular file are skipped).

    Args:
        paths: files and directories (a symbolic link given here is followed).

    Returns:
        The files, each once.

    Raises:
        ValueError: a path given is neither a regular file nor a directory.
        FileNotFoundError: a path given does not exist.
    """
    found: dict[Path, PendingFile] = {}
    for path in paths:
        for file in local_files(path):
            assert file.path is not None
            found.setdefault(file.path.resolve(), file)
    return list(found.values())


@dataclass
class Outcome:
    """What became of one file.

    Attributes:
        file: the local file.
        document: the document as last read (None when the upload itself failed).
        duplicate: the collection already held the same bytes.
        error: why the upload or the processing failed, if it did.
        deleted: the document was deleted while it was processed.
    """

    file: PendingFile
    document: models.UploadedDocument | models.Document | None = None
    duplicate: bool = False
    error: str | None = None
    deleted: bool = False

    @property
    def status(self) -> str:
        """``ready`` or ``failed``; ``queued``/``processing`` while running; ``upload failed``
        when the server refused the file; ``deleted`` when it went away while processed."""
        if self.deleted:
            return "deleted"
        if self.document is None:
            return "upload failed"
        return str(self.document.status)

    @property
    def finished(self) -> bool:
        """Whether nothing more will happen to it (ready, failed, refused or deleted)."""
        return self.status not in ("queued", "processing")

    @property
    def failed(self) -> bool:
        """Whether the file did not end up ``ready``."""
        return self.status != "ready"

    def as_json(self) -> dict[str, Any]:
        """The outcome as a JSON object (for ``--json``).

        Returns:
            ``file``, ``size``, ``status``, ``document_id``, ``chunks``, ``duplicate``, ``error``.
        """
        doc = self.document
        return {
            "file": self.file.name,
            "size": self.file.size,
            "status": self.status,
            "document_id": str(doc.id) if doc is not None else None,
            "chunks": doc.chunk_count if doc is not None else None,
            "duplicate": self.duplicate,
            "error": self.error,
        }


class _ByteProgress:
    """The upload bar: per-file shares of the body sent, summed over the files."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task
        self._sent: dict[str, float] = {}
        self._lock = threading.Lock()

    def set(self, name: str, done: float) -> None:
        with self._lock:
            self._sent[name] = done
            total = sum(self._sent.values())
        self._progress.update(self._task, completed=total)

    def reporter(self, file: PendingFile) -> ProgressCallback:
        def report(sent: int, total: int) -> None:
            # The multipart body is a little longer than the file: scale it to the file.
            self.set(file.name, file.size * sent / total if total else 0.0)

        return report


def upload_all(
    client: Atrium,
    collection_id: Any,
    files: Sequence[PendingFile],
    *,
    parallel: int,
    console: Console,
) -> list[Outcome]:
    """Upload ``files`` with ``parallel`` requests at a time under a progress bar of bytes sent.

    Args:
        client: the client.
        collection_id: the collection.
        files: the files.
        parallel: how many uploads run at once.
        console: where the bar is drawn (stderr).

    Returns:
        One outcome per file, in the order of ``files``; a refused upload has ``error`` set.

    Raises:
        AtriumError: the server could not be reached, or refused the key, for the first file
            (the others are not tried).
    """
    total = sum(f.size for f in files)
    noun = "file" if len(files) == 1 else "files"
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    abort = threading.Event()

    def send(file: PendingFile, bar: _ByteProgress) -> Outcome:
        if abort.is_set():
            return Outcome(file, error="not sent (an earlier error stopped the upload)")
        try:
            # Read through the collected file (no link followed out of a directory, nothing
            # past its size): the SDK given the path would take it as one the user named and
            # follow a link put in its place since it was collected.
            data = file.read()
        except (OSError, ValueError) as exc:
            return Outcome(file, error=f"not read: {exc}")
        try:
            created = client.documents.upload(
                collection_id, data, filename=file.name, on_progress=bar.reporter(file)
            )
        except AtriumError as exc:
            if exc.status_code is None or exc.status_code in (401, 403):
                abort.set()
                raise
            return Outcome(file, error=str(exc))
        bar.set(file.name, file.size)
        doc = created[0]
        return Outcome(file, document=doc, duplicate=doc.duplicate)

    with progress:
        task = progress.add_task(f"Uploading {len(files)} {noun}", total=max(total, 1))
        bar = _ByteProgress(progress, task)
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [pool.submit(send, f, bar) for f in files]
            outcomes = [f.result() for f in futures]
        progress.update(task, completed=max(total, 1))
    return outcomes


def _poll(
    client: Atrium, collection_id: Any, ids: Sequence[str], pages: int
) -> dict[str, models.Document | None]:
    """The documents ``ids`` as they are now (None for one that no longer exists): one read
    each, or the collection's listing when that takes fewer requests."""
    if len(ids) > pages:
        wanted = set(ids)
        found: dict[str, models.Document | None] = dict.fromkeys(ids)
        for doc in client.documents.list(collection_id):
            if str(doc.id) in wanted:
                found[str(doc.id)] = doc
        return found
    out: dict[str, models.Document | None] = {}
    for doc_id in ids:
        try:
            out[doc_id] = client.documents.get(collection_id, doc_id)
        except NotFound:
            out[doc_id] = None
    return out


def wait_for_processing(
    client: Atrium,
    collection_id: Any,
    outcomes: Sequence[Outcome],
    *,
    timeout: float,
    console: Console,
    poll_interval: float = 1.0,
) -> bool:
    """Follow the uploaded documents under a progress bar until each is ``ready`` or
    ``failed``, updating ``outcomes`` in place.

    Args:
        client: the client.
        collection_id: the collection.
        outcomes: the upload's outcomes (those without a document are skipped).
        timeout: seconds to wait in all.
        console: where the bar is drawn (stderr).
        poll_interval: the longest pause between polls.

    Returns:
        True when every document finished, False when some were still running at ``timeout``.
    """
    by_id = {str(o.document.id): o for o in outcomes if o.document is not None}
    if not by_id:
        return True
    count = client.collections.get(collection_id).document_count
    pages = max(1, math.ceil(count / 100))
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[summary]}"),
        TimeElapsedColumn(),
        console=console,
    )

    def summary() -> str:
        done = [o for o in by_id.values() if o.finished]
        failed = sum(1 for o in done if o.failed)
        text = f"{len(done)}/{len(by_id)} processed"
        return text + (f", {failed} failed" if failed else "")

    def share(o: Outcome) -> float:
        if o.finished or o.document is None:
            return 100.0
        return float(o.document.progress)

    deadline = time.monotonic() + timeout
    pause = 0.1
    with progress:
        task = progress.add_task("Processing", total=100 * len(by_id), summary=summary())
        while True:
            pending = [i for i, o in by_id.items() if not o.finished]
            if pending:
                for doc_id, doc in _poll(client, collection_id, pending, pages).items():
                    outcome = by_id[doc_id]
                    if doc is None:
                        outcome.deleted = True
                        outcome.error = "the document was deleted while it was processed"
                    else:
                        outcome.document = doc
                        outcome.error = doc.error if doc.status == "failed" else None
                pending = [i for i, o in by_id.items() if not o.finished]
            progress.update(
                task, completed=sum(share(o) for o in by_id.values()), summary=summary()
            )
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return not pending
            time.sleep(min(pause, left))
            pause = min(pause * 2, poll_interval)
