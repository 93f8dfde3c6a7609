"""What the sync and async clients share: settings, paths, bodies, retries and file reading."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias
from urllib.parse import quote

import httpx

from atrium_client._version import __version__
from atrium_client.errors import parse_retry_after
from atrium_client.models import SearchMode

#: An id as the API returns it (a UUID) or as a string.
ID: TypeAlias = uuid.UUID | str
#: ``"vector"`` (semantic) or ``"hybrid"`` (semantic and full-text, fused by RRF).
SearchModeLike: TypeAlias = Literal["vector", "lexical", "hybrid"] | SearchMode
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


def segment(value: ID) -> str:
    """``value`` as one segment of a URL path, percent-encoded.

    Ids are put into paths with this, so that one holding ``/``, ``?`` or ``#`` cannot reach
    another route (``documents.get(c, "../../api-keys")``); ``.``, ``..`` and an empty id are
    refused, since a URL resolves them as steps up the path rather than as names.

    Args:
        value: an id (a UUID or a string).

    Returns:
        The encoded segment.

    Raises:
        ValueError: ``value`` is empty, ``.`` or ``..``.
    """
    text = str(value)
    if text in ("", ".", ".."):
        raise ValueError(f"Not a valid id: {text!r}")
    return quote(text, safe="")


def check_path(path: str) -> str:
    """``path`` if it is a path from the server's root (``/v1/...``).

    The client sends its credentials with every request, so it only sends to its own
    ``base_url``: an absolute URL (``https://elsewhere/...``) or a scheme-relative one
    (``//elsewhere/...``) would carry the API key to another host.

    Args:
        path: the path of a request.

    Returns:
        ``path``.

    Raises:
        ValueError: ``path`` does not start with a single ``/``.
    """
    if not path.startswith("/") or path.startswith("//") or path.startswith("/\\"):
        raise ValueError(
            f"Not a path from the server's root: {path!r} (give a path such as '/v1/plans'; "
            "requests only go to the client's base_url)"
        )
    return path


def tenant_path(tenant_id: ID | None, path: str) -> str:
    """``/v1/tenants/{tenant_id}/{path}`` (the tenant id encoded as a path segment).

    Args:
        tenant_id: the tenant.
        path: the rest of the path, its ids already encoded with :func:`segment`.

    Returns:
        The path.

    Raises:
        ValueError: no tenant is set, or it is not a valid id.
    """
    if not tenant_id:
        raise ValueError(
            "This call works on a tenant: pass tenant_id= to the client (or set client.tenant_id)"
        )
    return f"/v1/tenants/{segment(tenant_id)}/{path}".rstrip("/")


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
    rerank: bool = False,
    rerank_top_n: int | None = None,
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
            "rerank": True if rerank else None,
            "rerank_top_n": rerank_top_n,
        }
    )


def answer_body(
    query: str,
    mode: SearchModeLike | None,
    top_k: int,
    filters: Mapping[str, Any] | None,
    collection_ids: Sequence[ID] | None,
    min_score: float | None,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    rerank: bool = False,
    rerank_top_n: int | None = None,
) -> dict[str, Any]:
    """The JSON body of an answer request: the retrieval fields and the LLM's."""
    body = retrieval_body(
        query,
        mode=mode,
        top_k=top_k,
        filters=filters,
        collection_ids=collection_ids,
        min_score=min_score,
        rerank=rerank,
        rerank_top_n=rerank_top_n,
    )
    body.update(drop_none({"model": model, "temperature": temperature, "max_tokens": max_tokens}))
    return body


def cache_headers(cache: bool) -> dict[str, str]:
    """``Cache-Control: no-cache`` when the caller does not want cached results."""
    return {} if cache else {"Cache-Control": "no-cache"}


# Uploads ---------------------------------------------------------------------------------------


@dataclass
class PendingFile:
    """A file to upload: its name and where its bytes come from.

    Attributes:
        name: the name sent with it.
        path: the file its bytes are read from (None for bytes given as such).
        data: its bytes, when given as bytes.
        size: its size in bytes when it was collected (``len(data)`` for bytes).
        follow: whether ``path`` may be a symbolic link: True for a path the caller named, False
            for one found by walking a directory (opened with ``O_NOFOLLOW``, so a link put in
            its place after the walk is refused rather than followed out of the directory).
    """

    name: str
    path: Path | None = None
    data: bytes | None = None
    size: int = 0
    follow: bool = True

    def __post_init__(self) -> None:
        if self.data is not None:
            self.size = len(self.data)

    def read(self) -> bytes:
        """Its bytes: no more than the size the opened file reports.

        Returns:
            The bytes.

        Raises:
            ValueError: the path is no longer a regular file (or, found in a directory, has
                become a symbolic link).
            OSError: it cannot be opened or read.
        """
        if self.data is not None:
            return self.data
        assert self.path is not None
        # O_NONBLOCK: opening a FIFO put in the file's place must not hang (it is refused below
        # once open); it changes nothing for a regular file.
        flags = os.O_RDONLY | _O_NONBLOCK | _O_BINARY | (0 if self.follow else _O_NOFOLLOW)
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP and not self.follow:
                raise ValueError(
                    f"{self.path} became a symbolic link after its directory was read: "
                    "links in a directory are not followed"
                ) from exc
            raise
        try:
            # Check and size what was opened, not the path: it may have been replaced since.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"Not a regular file: {self.path}")
            # Never past the size fstat reports: a file reporting 0 (as /proc's do) yields
            # nothing, and one growing while read does not overrun the batch it was sized for.
            pieces: list[bytes] = []
            left = info.st_size
            while left > 0:
                piece = os.read(fd, min(left, _READ_PIECE))
                if not piece:
                    break
                pieces.append(piece)
                left -= len(piece)
            return b"".join(pieces)
        finally:
            os.close(fd)


# Missing on some platforms (O_NOFOLLOW and O_NONBLOCK on Windows, O_BINARY off it): 0 adds none.
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
_O_BINARY: int = getattr(os, "O_BINARY", 0)
_READ_PIECE = 1024 * 1024


def _directory_files(root: Path) -> list[PendingFile]:
    """The regular files under ``root``, without following a symbolic link.

    ``os.walk`` does not enter a linked directory (``followlinks=False``), and a link to a file
    (or a FIFO, socket or device) fails the ``lstat`` regular-file check: a link to ``/etc`` or
    to ``/proc/self/environ`` (which holds the API key) is not read out of the directory.
    """
    files: list[tuple[tuple[str, ...], PendingFile]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith("."):
                continue
            path = here / fname
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed while the directory was walked
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            rel = path.relative_to(root)
            pending = PendingFile(rel.as_posix(), path=path, size=info.st_size, follow=False)
            files.append((rel.parts, pending))
    files.sort(key=lambda item: item[0])
    return [pending for _, pending in files]


def local_files(path: str | os.PathLike[str], name: str | None = None) -> list[PendingFile]:
    """The files to upload for a path the caller named: the file itself, or every regular file
    under a directory.

    A directory is read recursively, in name order, each file named by its path under it;
    hidden files and directories (``.`` first) are skipped, and so are symbolic links (to files
    or directories) and anything not a regular file (FIFOs, sockets, devices). The path named
    itself may be a symbolic link (the caller chose it), but it must lead to a regular file or
    a directory. The SDK's ``documents.upload`` and ``atr upload`` both collect through this.

    Args:
        path: a file or directory.
        name: the name for a file (default: its file name); not used for a directory.

    Returns:
        The files (none for a directory without any).

    Raises:
        FileNotFoundError: nothing is at ``path``.
        ValueError: ``path`` is neither a regular file nor a directory.
    """
    path = Path(os.fspath(path))
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"No such file or directory: {path}") from None
    if stat.S_ISDIR(info.st_mode):
        return _directory_files(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"Not a regular file or a directory: {path}")
    return [PendingFile(name or path.name, path=path, size=info.st_size, follow=True)]


def _as_items(source: UploadSource) -> list[str | os.PathLike[str] | bytes]:
    if isinstance(source, str | bytes | os.PathLike):
        return [source]
    return list(source)


def collect_files(source: UploadSource, filename: str | None) -> list[PendingFile]:
    """The files ``source`` names: a path, every file under a directory (see
    :func:`local_files`), bytes (named ``filename``), or a sequence of those."""
    items = _as_items(source)
    files: list[PendingFile] = []
    for index, item in enumerate(items):
        if isinstance(item, bytes | bytearray):
            name = filename or (f"document-{index + 1}" if len(items) > 1 else "document")
            files.append(PendingFile(name=name, data=bytes(item)))
            continue
        files.extend(local_files(item, filename if len(items) == 1 else None))
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
