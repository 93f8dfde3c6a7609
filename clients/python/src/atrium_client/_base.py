"""What the sync and async clients share: settings, paths, bodies, retries and file reading."""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import httpx

from atrium_client._version import __version__
from atrium_client.errors import parse_retry_after
from atrium_client.models import SearchMode

#: An id as the API returns it (a UUID) or as a string.
ID: TypeAlias = uuid.UUID | str
#: ``"vector"`` (semantic) or ``"hybrid"`` (semantic and full-text, fused by RRF).
SearchModeLike: TypeAlias = Literal["vector", "hybrid"] | SearchMode
#: What ``documents.upload`` takes: a file or directory path, raw bytes, or several of them.
UploadSource: TypeAlias = str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str] | bytes]

#: Called with the bytes of an upload request's body sent so far and the body's length.
ProgressCallback: TypeAlias = Callable[[int, int], None]

#: Files per upload request (the server accepts up to 100).
MAX_FILES_PER_REQUEST = 100
#: Bytes of files per upload request before another request is started.
MAX_BATCH_BYTES = 32 * 1024 * 1024

#: With a progress callback, an upload's body is handed to the connection in pieces this large.
UPLOAD_PIECE = 64 * 1024

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry a request the server refused for now (429, 503).

    Attributes:
        max_retries: retries after the first attempt (0 disables retrying).
        max_sleep: the longest single wait in seconds; a longer ``Retry-After`` is cut to it.
        backoff: the first wait when the server gives no ``Retry-After`` (doubled each time,
            with jitter, up to ``max_sleep``).
        statuses: the HTTP statuses that are retried.
    """

    max_retries: int = 3
    max_sleep: float = 30.0
    backoff: float = 0.5
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def delay(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or None not to retry."""
        if response.status_code not in self.statuses or attempt >= self.max_retries:
            return None
        wait = parse_retry_after(response.headers.get("retry-after"))
        if wait is None:
            wait = self.backoff * (2**attempt) * (1 + random.random() / 4)  # noqa: S311
        return max(0.0, min(wait, self.max_sleep))


def normalise_base_url(base_url: str) -> str:
    """The server's root URL without a trailing slash (a trailing ``/v1`` is dropped too)."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


def auth_headers(
    api_key: str | None, access_token: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Default headers: the bearer credential, a User-Agent and ``extra``."""
    if api_key and access_token:
        raise ValueError("Pass either api_key or access_token, not both")
    headers = {"User-Agent": f"atrium-client/{__version__}", "Accept": "application/json"}
    credential = api_key or access_token
    if credential:
        headers["Authorization"] = f"Bearer {credential}"
    headers.update(extra or {})
    return headers


def tenant_path(tenant_id: ID | None, path: str) -> str:
    """``/v1/tenants/{tenant_id}/{path}``; raises ValueError when no tenant is set."""
    if not tenant_id:
        raise ValueError(
            "This call works on a tenant: pass tenant_id= to the client (or set client.tenant_id)"
        )
    return f"/v1/tenants/{tenant_id}/{path}".rstrip("/")


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without the keys whose value is None (the server's defaults apply)."""
    return {k: v for k, v in values.items() if v is not None}


def retrieval_body(
    query: str,
    *,
    mode: SearchModeLike | None,
    top_k: int | None,
    filters: Mapping[str, Any] | None,
    collection_ids: Sequence[ID] | None,
    min_score: float | None,
) -> dict[str, Any]:
    """The JSON body fields shared by search and answer."""
    return drop_none(
        {
            "query": query,
            "mode": str(mode) if mode is not None else None,
            "top_k": top_k,
            "filters": dict(filters) if filters is not None else None,
            "collection_ids": [str(c) for c in collection_ids]
            if collection_ids is not None
            else None,
            "min_score": min_score,
        }
    )


def cache_headers(cache: bool) -> dict[str, str]:
    """``Cache-Control: no-cache`` when the caller does not want cached results."""
    return {} if cache else {"Cache-Control": "no-cache"}


# Uploads ---------------------------------------------------------------------------------------


@dataclass
class PendingFile:
    """A file to upload: its name and where its bytes come from."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        """Its size in bytes."""
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        return self.path.stat().st_size

    def read(self) -> bytes:
        """Its bytes."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


def _directory_files(root: Path) -> list[PendingFile]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        files.append(PendingFile(name=rel.as_posix(), path=path))
    return files


def _as_items(source: UploadSource) -> list[str | os.PathLike[str] | bytes]:
    if isinstance(source, str | bytes | os.PathLike):
        return [source]
    return list(source)


def collect_files(source: UploadSource, filename: str | None) -> list[PendingFile]:
    """The files ``source`` names: a path, every file under a directory (recursively, hidden
    ones skipped, in name order), bytes (named ``filename``), or a sequence of those."""
    items = _as_items(source)
    files: list[PendingFile] = []
    for index, item in enumerate(items):
        if isinstance(item, bytes | bytearray):
            name = filename or (f"document-{index + 1}" if len(items) > 1 else "document")
            files.append(PendingFile(name=name, data=bytes(item)))
            continue
        path = Path(os.fspath(item))
        if path.is_dir():
            files.extend(_directory_files(path))
        elif path.is_file():
            name = filename if len(items) == 1 and filename else path.name
            files.append(PendingFile(name=name, path=path))
        else:
            raise FileNotFoundError(f"No such file or directory: {path}")
    if not files:
        raise ValueError(f"Nothing to upload: {source!r} holds no files")
    return files


def batches(files: Sequence[PendingFile]) -> Iterator[list[PendingFile]]:
    """The files in groups that fit one upload request."""
    batch: list[PendingFile] = []
    size = 0
    for f in files:
        n = f.size
        if batch and (len(batch) >= MAX_FILES_PER_REQUEST or size + n > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch


def multipart(
    batch: Sequence[PendingFile], *, title: str | None, metadata: Mapping[str, Any] | None
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, str]]:
    """The ``files`` and ``data`` arguments of an upload request (bytes, so it can be resent).

    Files go as ``application/octet-stream``: the server recognises their type by content.
    """
    files = [("files", (f.name, f.read(), "application/octet-stream")) for f in batch]
    data: dict[str, str] = {}
    if metadata is not None:
        data["metadata"] = json.dumps(dict(metadata))
    if title is not None:
        data["title"] = title
    return files, data


class ProgressStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A request body that reports how much of it the connection has taken.

    It hands the body to httpx in pieces of :data:`UPLOAD_PIECE` bytes and calls ``on_progress``
    with ``(0, total)`` first, then after each piece is written. httpx sends it as it sends any
    body, through the client's own transport, proxies included. Each iteration (a retried
    request sends its body again) counts from 0.

    Args:
        inner: the body httpx built (the multipart stream of an upload).
        total: its length in bytes (its ``Content-Length``).
        on_progress: called with the bytes sent so far and ``total``.
    """

    def __init__(
        self,
        inner: httpx.SyncByteStream | httpx.AsyncByteStream,
        total: int,
        on_progress: ProgressCallback,
    ) -> None:
        self._inner = inner
        self._total = total
        self._on_progress = on_progress

    def _pieces(self, chunk: bytes) -> Iterator[bytes]:
        for start in range(0, len(chunk), UPLOAD_PIECE):
            yield chunk[start : start + UPLOAD_PIECE]

    def __iter__(self) -> Iterator[bytes]:
        if not isinstance(self._inner, httpx.SyncByteStream):
            raise RuntimeError("Attempted to send an async request body with a sync client")
        sent = 0
        self._on_progress(0, self._total)
        for chunk in self._inner:
            for piece in self._pieces(chunk):
                yield piece
                # Resumed once the connection has written the piece.
                sent += len(piece)
                self._on_progress(sent, self._total)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if not isinstance(self._inner, httpx.AsyncByteStream):
            raise RuntimeError("Attempted to send a sync request body with an async client")
        sent = 0
        self._on_progress(0, self._total)
        async for chunk in self._inner:
            for piece in self._pieces(chunk):
                yield piece
                sent += len(piece)
                self._on_progress(sent, self._total)

    def close(self) -> None:
        """Close the inner body."""
        if isinstance(self._inner, httpx.SyncByteStream):
            self._inner.close()

    async def aclose(self) -> None:
        """Close the inner body."""
        if isinstance(self._inner, httpx.AsyncByteStream):
            await self._inner.aclose()


def with_progress(request: httpx.Request, on_progress: ProgressCallback | None) -> httpx.Request:
    """``request``, its body reporting its progress to ``on_progress`` (unchanged when None).

    Args:
        request: a request built by the httpx client (an upload: its body has a known length).
        on_progress: called with the bytes of the body sent so far and its length, or None.

    Returns:
        The same request.
    """
    if on_progress is not None:
        length = int(request.headers.get("content-length", "0"))
        request.stream = ProgressStream(request.stream, length, on_progress)
    return request
