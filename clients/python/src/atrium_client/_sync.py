"""The synchronous client: :class:`Atrium`."""

from __future__ import annotations

import builtins
import datetime as dt
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from atrium_client._base import (
    DEFAULT_TIMEOUT,
    ID,
    ProgressCallback,
    RetryPolicy,
    SearchModeLike,
    UploadSource,
    answer_body,
    auth_headers,
    batches,
    cache_headers,
    check_path,
    collect_files,
    drop_none,
    multipart,
    normalise_base_url,
    retrieval_body,
    segment,
    tenant_path,
    with_progress,
)
from atrium_client.errors import (
    APIConnectionError,
    APITimeoutError,
    WaitTimeout,
    error_from_response,
)
from atrium_client.events import AnswerEvent, SSEDecoder, parse_event
from atrium_client.models import (
    AnswerResponse,
    ApiKey,
    ApiKeyCreated,
    Collection,
    Document,
    DocumentStatus,
    PlanCatalog,
    SearchResponse,
    Tenant,
    TenantWithRole,
    UploadedDocument,
    Usage,
    UsageHistory,
    User,
)

M = TypeVar("M", bound=BaseModel)

_TERMINAL = {DocumentStatus.ready, DocumentStatus.failed}
#: wait_until_ready reads up to this many documents one by one per poll; more, it lists first.
_READ_EACH_UP_TO = 4


class Atrium:
    """A client of the Atrium API over HTTP (httpx), with typed models.

    Args:
        base_url: the server's root URL, e.g. ``http://127.0.0.1:8000``.
        api_key: an API key (``atr_...``) of ``tenant_id``.
        access_token: a user's access token (``POST /v1/auth/login``) instead of an API key,
            for the account routes (:meth:`me`, :attr:`tenants`) and any tenant the user
            belongs to.
        tenant_id: the tenant the tenant routes work on (collections, documents, search...).
            May be set later: ``client.tenant_id = ...``.
        timeout: seconds (or an ``httpx.Timeout``) for each request.
        retry: when to retry 429 and 503 answers; ``RetryPolicy(max_retries=0)`` never does.
        headers: extra headers sent with every request.
        transport: an httpx transport, e.g. for a proxy or tests.

    Use it as a context manager, or call :meth:`close`, to close its connections.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        access_token: str | None = None,
        tenant_id: ID | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self.tenant_id: ID | None = tenant_id
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=auth_headers(api_key, access_token, headers),
            timeout=timeout,
            transport=transport,
        )
        self.collections = Collections(self)
        self.documents = Documents(self)
        self.api_keys = ApiKeys(self)
        self.tenants = Tenants(self)

    # Lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def __enter__(self) -> Atrium:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Transport ---------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        files: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> httpx.Response:
        # Every request carries the credentials: only to base_url, never to a URL given whole.
        check_path(path)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, path, params=params, json=json, files=files, data=data, headers=headers
            )
            with_progress(request, on_progress)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                raise APITimeoutError(f"{method} {path} timed out: {exc}") from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"{method} {path} failed: {exc}") from exc
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            delay = self.retry.delay(attempt, response)
            if delay is None:
                raise error_from_response(response)
            attempt += 1
            time.sleep(delay)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Call any route and return its decoded JSON body (None when it has none).

        Errors, retries and credentials work as for the typed methods. Use it for routes the
        facade does not cover, e.g. ``client.request("GET", "/v1/users/me/sessions")``.

        Args:
            method: the HTTP method.
            path: the path from the server root (``/v1/...``), starting with a single ``/``;
                ``{tenant_id}`` in it is replaced by the client's tenant. Ids put into it
                should be encoded (``urllib.parse.quote(id, safe="")``).
            params: query parameters.
            json: a JSON body.
            headers: extra headers for this request.

        Returns:
            The decoded JSON, or None for an empty body.

        Raises:
            ValueError: ``path`` is a whole URL (``https://...``, ``//host/...``) or does not
                start with ``/``: the API key is only ever sent to the client's ``base_url``.
        """
        if "{tenant_id}" in path:
            path = path.replace("{tenant_id}", segment(self._tenant_id()))
        response = self._send(method, path, params=params, json=json, headers=headers)
        return response.json() if response.content else None

    def _tenant_id(self) -> ID:
        tenant_path(self.tenant_id, "")
        assert self.tenant_id is not None
        return self.tenant_id

    def _t(self, path: str) -> str:
        return tenant_path(self.tenant_id, path)

    def _get(self, model: type[M], path: str, **kw: Any) -> M:
        return model.model_validate(self._send("GET", path, **kw).json())

    def _call(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        return model.model_validate(self._send(method, path, **kw).json())

    def _paginate(
        self, model: type[M], path: str, params: Mapping[str, Any], page_size: int
    ) -> Iterator[M]:
        page = 1
        while True:
            body = self._send("GET", path, params={**params, "page": page, "size": page_size})
            payload = body.json()
            items = payload.get("items") or []
            for item in items:
                yield model.model_validate(item)
            pages = payload.get("pages")
            if not items or pages is None or page >= pages:
                return
            page += 1

    # Account -----------------------------------------------------------------------------------

    def me(self) -> User:
        """The signed-in user (needs ``access_token``).

        Returns:
            The user's profile.
        """
        return self._get(User, "/v1/users/me")

    def plans(self) -> PlanCatalog:
        """Every plan with its limits (public: needs no credentials).

        Returns:
            The plan catalogue.
        """
        return self._get(PlanCatalog, "/v1/plans")

    # Retrieval ---------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        *,
        mode: SearchModeLike | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        collection_ids: Sequence[ID] | None = None,
        min_score: float | None = None,
        rerank: bool = False,
        rerank_top_n: int | None = None,
        cache: bool = True,
    ) -> SearchResponse:
        """Find the chunks most relevant to ``query`` in the tenant's collections.

        Args:
            query: the question or search text.
            mode: ``"hybrid"`` (semantic and BM25, fused; the server's default),
                ``"vector"`` (semantic) or ``"lexical"`` (BM25).
            top_k: how many chunks to return (1-100).
            filters: conditions on document metadata, e.g. ``{"lang": "en"}``,
                ``{"tags": {"$in": ["a", "b"]}}``, ``{"year": {"$gte": 2020}}``,
                ``{"draft": {"$exists": False}}``.
            collection_ids: only these collections (default: all of the tenant's).
            min_score: drop results scoring below this.
            rerank: rescore the best ``rerank_top_n`` candidates with the server's rerank
                model and keep the best ``top_k`` (the server must have one configured).
            rerank_top_n: how many candidates to rerank (server default 30).
            cache: False bypasses the server's result cache (``Cache-Control: no-cache``).

        Returns:
            ``results`` (best first; each with ``score``, ``text``, ``title``, ``metadata``...),
            ``mode``, ``cache_hit`` and ``timings``.
        """
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
        return self._call(
            SearchResponse, "POST", self._t("search"), json=body, headers=cache_headers(cache)
        )

    def answer(
        self,
        query: str,
        *,
        mode: SearchModeLike | None = None,
        top_k: int = 5,
        filters: Mapping[str, Any] | None = None,
        collection_ids: Sequence[ID] | None = None,
        min_score: float | None = None,
        rerank: bool = False,
        rerank_top_n: int | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> AnswerResponse:
        """Answer ``query`` from the tenant's documents, with numbered citations.

        Args:
            query: the question.
            mode: how sources are retrieved (``"vector"``, ``"lexical"`` or ``"hybrid"``).
            top_k: how many chunks to give the model as sources (1-50).
            filters: conditions on document metadata (as for :meth:`search`).
            collection_ids: only these collections.
            min_score: drop sources scoring below this.
            rerank: rerank the candidate sources first (as for :meth:`search`).
            rerank_top_n: how many candidates to rerank.
            model: another allowed LLM for this request.
            temperature: sampling temperature.
            max_tokens: answer length limit.

        Returns:
            The answer with ``citations``, ``sources``, ``usage`` and ``timings``.
        """
        body = answer_body(
            query,
            mode,
            top_k,
            filters,
            collection_ids,
            min_score,
            model,
            temperature,
            max_tokens,
            rerank,
            rerank_top_n,
        )
        return self._call(AnswerResponse, "POST", self._t("answer"), json=body)

    def answer_stream(
        self,
        query: str,
        *,
        mode: SearchModeLike | None = None,
        top_k: int = 5,
        filters: Mapping[str, Any] | None = None,
        collection_ids: Sequence[ID] | None = None,
        min_score: float | None = None,
        rerank: bool = False,
        rerank_top_n: int | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[AnswerEvent]:
        """Answer ``query`` as a stream of typed events (Server-Sent Events).

        Takes the arguments of :meth:`answer`. Errors before the stream starts (404, 429...)
        raise; a failure after it started arrives as an :class:`~atrium_client.ErrorEvent`.

        Yields:
            :class:`~atrium_client.RetrievalEvent` (the sources), then
            :class:`~atrium_client.DeltaEvent` (text pieces), then
            :class:`~atrium_client.DoneEvent` (answer, citations, usage) or
            :class:`~atrium_client.ErrorEvent`.
        """
        body = answer_body(
            query,
            mode,
            top_k,
            filters,
            collection_ids,
            min_score,
            model,
            temperature,
            max_tokens,
            rerank,
            rerank_top_n,
        )
        body["stream"] = True
        response = self._send(
            "POST",
            self._t("answer"),
            json=body,
            headers={"Accept": "text/event-stream"},
            stream=True,
        )
        decoder = SSEDecoder()
        try:
            try:
                for line in response.iter_lines():
                    message = decoder.feed(line)
                    if message is not None and (event := parse_event(*message)) is not None:
                        yield event
            except httpx.TimeoutException as exc:
                raise APITimeoutError(f"The answer stream timed out: {exc}") from exc
            except httpx.TransportError as exc:
                raise APIConnectionError(f"The answer stream broke off: {exc}") from exc
            message = decoder.flush()
            if message is not None and (event := parse_event(*message)) is not None:
                yield event
        finally:
            response.close()

    # Billing -----------------------------------------------------------------------------------

    def usage(self) -> Usage:
        """The tenant's usage this billing period, per metric (used, limit, percent...).

        Returns:
            The usage report.
        """
        return self._get(Usage, self._t("usage"))

    def usage_history(self, days: int = 90) -> UsageHistory:
        """The tenant's usage per day, oldest first.

        Args:
            days: how many days back, today included (1-366).

        Returns:
            One entry per day.
        """
        return self._get(UsageHistory, self._t("usage/history"), params={"days": days})


class Collections:
    """``client.collections``: create, list, read, change and delete collections."""

    def __init__(self, client: Atrium) -> None:
        self._c = client

    def create(
        self,
        name: str,
        *,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Collection:
        """Create an empty collection.

        Args:
            name: unique in the tenant, regardless of case (409 otherwise).
            description: a description.
            metadata: a small flat JSON object.

        Returns:
            The new collection.
        """
        body = drop_none({"name": name, "description": description, "metadata": metadata})
        return self._c._call(Collection, "POST", self._c._t("collections"), json=body)

    def list(self, *, page_size: int = 100) -> Iterator[Collection]:
        """Every collection of the tenant, by name, fetched page by page.

        Args:
            page_size: items per request (1-100).

        Yields:
            Each collection, with its document, chunk and byte totals.
        """
        return self._c._paginate(Collection, self._c._t("collections"), {}, page_size)

    def get(self, collection_id: ID) -> Collection:
        """One collection with its totals.

        Args:
            collection_id: the collection.

        Returns:
            The collection.
        """
        return self._c._get(Collection, self._c._t(f"collections/{segment(collection_id)}"))

    def update(
        self,
        collection_id: ID,
        *,
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Collection:
        """Rename a collection or change its description or metadata.

        Args:
            collection_id: the collection.
            name: a new name.
            description: a new description.
            metadata: new metadata.

        Returns:
            The changed collection.
        """
        body = drop_none({"name": name, "description": description, "metadata": metadata})
        path = self._c._t(f"collections/{segment(collection_id)}")
        return self._c._call(Collection, "PATCH", path, json=body)

    def delete(self, collection_id: ID) -> Collection:
        """Delete a collection with its documents (removed in the background).

        Args:
            collection_id: the collection.

        Returns:
            The collection, with status ``deleting``.
        """
        return self._c._call(
            Collection, "DELETE", self._c._t(f"collections/{segment(collection_id)}")
        )


class Documents:
    """``client.documents``: upload, list, read, re-index, delete and wait for documents."""

    def __init__(self, client: Atrium) -> None:
        self._c = client

    def _path(self, collection_id: ID, suffix: str = "") -> str:
        return self._c._t(f"collections/{segment(collection_id)}/documents{suffix}")

    def upload(
        self,
        collection_id: ID,
        source: UploadSource,
        *,
        filename: str | None = None,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> builtins.list[UploadedDocument]:
        """Upload files: a path, a whole directory (recursively), bytes, or a list of those.

        Large sets are sent in several requests (at most 100 files or 32 MiB each). Processing
        happens in the background: see :meth:`wait_until_ready`.

        Args:
            collection_id: the collection.
            source: a file path, a directory path, raw bytes, or a sequence of them.
            filename: the name for bytes (or for a single file), shown as its first title.
            title: a title, when exactly one file is uploaded.
            metadata: a small flat JSON object applied to every file.
            on_progress: called with ``(sent, total)`` as the request body goes out: the bytes
                of it written to the connection so far and its length (the multipart body, a
                little longer than the files). It is called with ``(0, total)`` first, then
                after each 64 KiB piece, ending with ``(total, total)``. Each request counts
                from 0: a retried request, and each request of a large set, start again. It
                runs in the thread that sends (the event loop for the async client), so it
                should be quick; an exception it raises aborts the upload.

        Returns:
            The created documents (``duplicate`` is True for bytes already in the collection).
        """
        files = collect_files(source, filename)
        if title is not None and len(files) != 1:
            raise ValueError("title can only be given when a single file is uploaded")
        created: builtins.list[UploadedDocument] = []
        for batch in batches(files):
            parts, data = multipart(batch, title=title, metadata=metadata)
            response = self._c._send(
                "POST", self._path(collection_id), files=parts, data=data, on_progress=on_progress
            )
            created.extend(UploadedDocument.model_validate(d) for d in response.json()["documents"])
        return created

    def upload_text(
        self,
        collection_id: ID,
        text: str,
        *,
        title: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UploadedDocument:
        """Upload a text as a document (JSON body).

        Args:
            collection_id: the collection.
            text: the document's text.
            title: its title (default: its first line).
            metadata: a small flat JSON object.

        Returns:
            The created document.
        """
        body = drop_none({"text": text, "title": title, "metadata": metadata})
        response = self._c._send("POST", self._path(collection_id), json=body)
        return UploadedDocument.model_validate(response.json()["documents"][0])

    def list(
        self,
        collection_id: ID,
        *,
        status: DocumentStatus | str | None = None,
        page_size: int = 100,
    ) -> Iterator[Document]:
        """The collection's documents, newest first, fetched page by page.

        Args:
            collection_id: the collection.
            status: only documents in this state (``queued``, ``processing``, ``ready``...).
            page_size: items per request (1-100).

        Yields:
            Each document.
        """
        params = drop_none({"status": str(status) if status is not None else None})
        return self._c._paginate(Document, self._path(collection_id), params, page_size)

    def get(self, collection_id: ID, document_id: ID) -> Document:
        """One document and its processing state.

        Args:
            collection_id: the collection.
            document_id: the document.

        Returns:
            The document.
        """
        return self._c._get(Document, self._path(collection_id, f"/{segment(document_id)}"))

    def reindex(self, collection_id: ID, document_id: ID) -> Document:
        """Process a document again (extraction, chunking, embedding).

        Args:
            collection_id: the collection.
            document_id: the document.

        Returns:
            The document, queued again.
        """
        path = self._path(collection_id, f"/{segment(document_id)}/reindex")
        return self._c._call(Document, "POST", path)

    def delete(self, collection_id: ID, document_id: ID) -> Document:
        """Delete a document (its chunks and file are removed in the background).

        Args:
            collection_id: the collection.
            document_id: the document.

        Returns:
            The document, with status ``deleting``.
        """
        return self._c._call(
            Document, "DELETE", self._path(collection_id, f"/{segment(document_id)}")
        )

    def _busy(self, collection_id: ID) -> set[str]:
        busy: set[str] = set()
        for status in (DocumentStatus.queued, DocumentStatus.processing):
            busy.update(str(doc.id) for doc in self.list(collection_id, status=status))
        return busy

    def wait_until_ready(
        self,
        collection_id: ID,
        document_ids: Sequence[ID],
        *,
        timeout: float = 300.0,
        poll_interval: float = 1.0,
    ) -> builtins.list[Document]:
        """Poll until every document is processed: ``ready``, or ``failed`` (never hangs on one).

        Args:
            collection_id: the collection.
            document_ids: the documents to wait for.
            timeout: seconds to wait in all.
            poll_interval: the longest pause between polls (the first ones are shorter).

        Returns:
            The documents in the order of ``document_ids``; check ``status`` (and ``error``)
            for those that failed.

        Raises:
            WaitTimeout: some were still queued or processing after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        latest: dict[str, Document] = {}
        pending = [str(d) for d in document_ids]
        pause = min(0.1, poll_interval)
        while True:
            # Many documents: two listings (queued, processing) tell which ones are still busy,
            # so only the others are read one by one.
            busy = self._busy(collection_id) if len(pending) > _READ_EACH_UP_TO else set()
            for doc_id in pending:
                if doc_id not in busy:
                    latest[doc_id] = self.get(collection_id, doc_id)
            pending = [d for d in pending if d not in latest or latest[d].status not in _TERMINAL]
            if not pending:
                return [latest[str(d)] for d in document_ids]
            left = deadline - time.monotonic()
            if left <= 0:
                for doc_id in pending:
                    if doc_id not in latest:
                        latest[doc_id] = self.get(collection_id, doc_id)
                raise WaitTimeout(
                    f"{len(pending)} of {len(document_ids)} documents were not processed "
                    f"within {timeout} s",
                    documents=[latest[str(d)] for d in document_ids],
                    pending=pending,
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, poll_interval)


class ApiKeys:
    """``client.api_keys``: list, create, revoke and rotate the tenant's API keys."""

    def __init__(self, client: Atrium) -> None:
        self._c = client

    def list(self, *, include_revoked: bool = False, page_size: int = 100) -> Iterator[ApiKey]:
        """The tenant's keys, newest first (never their secrets).

        Args:
            include_revoked: also list revoked keys.
            page_size: items per request (1-100).

        Yields:
            Each key.
        """
        params = {"include_revoked": str(include_revoked).lower()}
        return self._c._paginate(ApiKey, self._c._t("api-keys"), params, page_size)

    def create(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        expires_at: dt.datetime | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> ApiKeyCreated:
        """Create a key; its secret (``key``) is in the result, and only there.

        Args:
            name: a label.
            scopes: what it may do, e.g. ``["search", "answer"]``.
            expires_at: when it stops working (time-zone aware); never when None.
            rate_limit_per_minute: a lower per-key rate limit than the plan's.

        Returns:
            The key with its secret.
        """
        body = drop_none(
            {
                "name": name,
                "scopes": [str(s) for s in scopes],
                "expires_at": expires_at.isoformat() if expires_at else None,
                "rate_limit_per_minute": rate_limit_per_minute,
            }
        )
        return self._c._call(ApiKeyCreated, "POST", self._c._t("api-keys"), json=body)

    def revoke(self, key_id: ID) -> None:
        """Revoke a key: it is refused from the next request on (revoking twice is harmless).

        Args:
            key_id: the key.
        """
        self._c._send("DELETE", self._c._t(f"api-keys/{segment(key_id)}"))

    def rotate(self, key_id: ID, *, grace_period_seconds: int = 0) -> ApiKeyCreated:
        """Issue a new secret for a key and revoke the old one (after the grace period).

        Args:
            key_id: the key.
            grace_period_seconds: how long the old secret keeps working (at most 7 days).

        Returns:
            The new key with its secret.
        """
        body = {"grace_period_seconds": grace_period_seconds}
        path = self._c._t(f"api-keys/{segment(key_id)}/rotate")
        return self._c._call(ApiKeyCreated, "POST", path, json=body)


class Tenants:
    """``client.tenants``: the signed-in user's tenants (needs ``access_token``)."""

    def __init__(self, client: Atrium) -> None:
        self._c = client

    def list(self, *, page_size: int = 100) -> Iterator[TenantWithRole]:
        """The tenants the user belongs to, with the user's role in each.

        Args:
            page_size: items per request (1-100).

        Yields:
            Each tenant.
        """
        return self._c._paginate(TenantWithRole, "/v1/tenants", {}, page_size)

    def create(self, name: str) -> TenantWithRole:
        """Create a tenant owned by the user.

        Args:
            name: the tenant's name.

        Returns:
            The new tenant (the user's role: owner).
        """
        return self._c._call(TenantWithRole, "POST", "/v1/tenants", json={"name": name})

    def get(self, tenant_id: ID | None = None) -> Tenant:
        """One tenant (default: the client's).

        Args:
            tenant_id: the tenant; default ``client.tenant_id``.

        Returns:
            The tenant.
        """
        return self._c._get(Tenant, tenant_path(tenant_id or self._c.tenant_id, ""))


__all__ = ["ApiKeys", "Atrium", "Collections", "Documents", "Tenants"]
