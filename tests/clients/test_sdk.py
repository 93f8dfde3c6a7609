"""The Python SDK (atrium_client) against the live server: sync and async clients, one tenant
and one ingested corpus shared by the module (real worker, embeddings and vector store)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from atrium_client import (
    AsyncAtrium,
    Atrium,
    AuthenticationError,
    Conflict,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    NotFound,
    PermissionDenied,
    RateLimited,
    RetrievalEvent,
    RetryPolicy,
    ServiceUnavailable,
    ValidationError,
    WaitTimeout,
    models,
)

from tests.support.llm_server import LLMServer
from tests.support.sdk import Account, clean_state, new_account, uploaded_document

# One worker runs the whole module: its tests share one tenant and corpus.
pytestmark = pytest.mark.xdist_group("sdk")

#: name -> (text, metadata) of the files of the uploaded directory.
HANDBOOK: dict[str, str] = {
    "refunds.md": "# Refunds\n\nRefunds are paid back to the original card within 14 days of "
    "the return reaching our warehouse.\n",
    "shipping.txt": "Shipping is free for orders above 50 euros. Parcels leave the warehouse "
    "within two working days.\n",
    "nested/security.md": "# Security\n\nRotate API keys every ninety days and revoke a key "
    "as soon as it leaks.\n",
}
PASTA = b"Cook the pasta in salted boiling water for nine minutes, then drain it.\n"
VOLCANO = "Volcanoes erupt when magma rises through cracks in the Earth's crust.\n"


#: What the live server's LLM (the session's loopback server) answers in these tests.
LLM_ANSWER = "Refunds are paid back to the card within 14 days [1]. Keep the receipt [9]."


@pytest.fixture
def llm(llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> LLMServer:
    """The live server's LLM, answering :data:`LLM_ANSWER` for the test."""
    monkeypatch.setitem(llm_server.behaviour, "answer", LLM_ANSWER)
    return llm_server


def last_chat(llm: LLMServer) -> dict[str, Any]:
    """The body of the last chat completion request the LLM received."""
    chats = [r for r in llm.requests if r["path"].endswith("/chat/completions")]
    body: dict[str, Any] = chats[-1]["body"]
    return body


@dataclass
class World:
    """The module's tenant, its collection and the documents in it (all ready)."""

    account: Account
    client: Atrium
    collection: models.Collection
    directory: list[models.UploadedDocument]
    from_bytes: models.UploadedDocument
    from_path: models.UploadedDocument
    broken: models.Document


@pytest.fixture(scope="module")
async def world(
    app: Any, live_server: Any, test_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    account = await new_account(app, live_server.url)
    client = account.client(timeout=60)
    root = tmp_path_factory.mktemp("sdk")
    handbook = root / "handbook"
    for name, text in HANDBOOK.items():
        (handbook / name).parent.mkdir(parents=True, exist_ok=True)
        (handbook / name).write_text(text)
    (handbook / ".hidden.md").write_text("never uploaded")
    volcano = root / "volcano.txt"
    volcano.write_text(VOLCANO)

    coll = client.collections.create("corpus", description="SDK tests")
    directory = client.documents.upload(coll.id, handbook, metadata={"source": "handbook"})
    (from_bytes,) = client.documents.upload(
        coll.id, PASTA, filename="pasta.txt", metadata={"source": "kitchen"}
    )
    (from_path,) = client.documents.upload(coll.id, str(volcano), title="Volcanoes")
    # Accepted (it looks like a PDF) but unreadable: the worker marks it failed.
    (broken,) = client.documents.upload(coll.id, b"%PDF-1.7 garbage", filename="bad.pdf")
    ids = [d.id for d in [*directory, from_bytes, from_path, broken]]
    final = client.documents.wait_until_ready(coll.id, ids, timeout=120)
    assert [d.status for d in final[:-1]] == [models.DocumentStatus.ready] * (len(ids) - 1)
    yield World(account, client, coll, directory, from_bytes, from_path, final[-1])
    client.close()
    clean_state(test_env)


# Uploads and waiting ---------------------------------------------------------------------------


def test_upload_directory_bytes_and_path(world: World) -> None:
    # A directory: every file below it (hidden ones skipped), named by their relative paths.
    assert sorted(d.filename or "" for d in world.directory) == sorted(HANDBOOK)
    assert all(d.metadata == {"source": "handbook"} for d in world.directory)
    assert all(d.duplicate is False for d in world.directory)
    assert world.from_bytes.filename == "pasta.txt"
    assert world.from_path.title == "Volcanoes"
    # The same bytes again: reported as a duplicate of the stored document.
    (again,) = world.client.documents.upload(world.collection.id, PASTA, filename="again.txt")
    assert again.duplicate is True and again.id == world.from_bytes.id


def test_wait_until_ready_returns_failed_documents_and_times_out(world: World) -> None:
    # A failed document is returned with its reason, not waited on forever.
    assert world.broken.status == models.DocumentStatus.failed
    assert world.broken.error and "PDF" in world.broken.error
    c = world.client
    # A longer text the worker cannot have read by the first poll.
    text = " ".join(f"Sentence {i} about lighthouses and their keepers." for i in range(300))
    doc = c.documents.upload_text(world.collection.id, text, title="Lighthouses")
    with pytest.raises(WaitTimeout) as caught:
        c.documents.wait_until_ready(world.collection.id, [doc.id], timeout=0)
    assert caught.value.pending == [str(doc.id)]
    assert caught.value.documents[0].status in {"queued", "processing"}
    (final,) = c.documents.wait_until_ready(world.collection.id, [doc.id], timeout=120)
    assert final.status == "ready" and final.chunk_count > 0
    # Re-index and delete.
    again = c.documents.reindex(world.collection.id, doc.id)
    assert again.status == "queued"
    c.documents.wait_until_ready(world.collection.id, [doc.id], timeout=120)
    assert c.documents.delete(world.collection.id, doc.id).status == "deleting"


@pytest.mark.asyncio(loop_scope="session")
async def test_upload_reports_its_progress_up_to_the_whole_body(world: World) -> None:
    # 300 kB: five 64 KiB pieces. Unreadable as a PDF, so the worker is done with it at once; in
    # a collection of its own (the corpus's listings stay as they are).
    data = b"%PDF-1.7 " + uuid.uuid4().bytes * 18_750
    c = world.client
    coll = c.collections.create("progress")
    seen: list[tuple[int, int]] = []
    (doc,) = c.documents.upload(
        coll.id, data, filename="big.pdf", on_progress=lambda *sent: seen.append(sent)
    )
    total = seen[0][1]
    assert total > len(data)  # the multipart body: the file and its part headers
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert len(seen) >= 6 and all(t == total for _, t in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert doc.size_bytes == len(data)

    acct = world.account
    aseen: list[tuple[int, int]] = []
    async with AsyncAtrium(acct.url, api_key=acct.key, tenant_id=acct.tenant_id) as ac:
        (again,) = await ac.documents.upload(
            coll.id, data, filename="again.pdf", on_progress=lambda *sent: aseen.append(sent)
        )
    assert again.duplicate is True and again.id == doc.id
    atotal = aseen[-1][1]
    assert aseen[0] == (0, atotal) and aseen[-1] == (atotal, atotal) and len(aseen) >= 6
    c.collections.delete(coll.id)


def test_upload_progress_goes_through_the_environments_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counted body goes the client's usual way: an HTTP proxy named by the environment
    receives the upload (absolute URL) and the whole body, and progress still reaches it."""
    received: list[tuple[str, int]] = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append((self.path, len(self.rfile.read(length))))
            data = json.dumps(uploaded_document()).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        seen: list[tuple[int, int]] = []
        with Atrium("http://atrium.invalid", api_key="k", tenant_id="t") as client:
            client.documents.upload(
                "c", b"y" * 200_000, filename="b.txt", on_progress=lambda *s: seen.append(s)
            )
    finally:
        proxy.shutdown()
        proxy.server_close()
    ((path, length),) = received
    assert path == "http://atrium.invalid/v1/tenants/t/collections/c/documents"
    assert seen[0] == (0, length) and seen[-1] == (length, length) and len(seen) >= 4


def test_list_pages_through_everything(world: World) -> None:
    c = world.client
    # Ready ones only: a document deleted by another test may leave between two listings.
    everything = list(c.documents.list(world.collection.id, status="ready", page_size=100))
    paged = [d.id for d in c.documents.list(world.collection.id, status="ready", page_size=2)]
    assert len(everything) >= 5
    assert len(paged) == len(everything)  # 3+ pages of 2, no document twice
    assert set(paged) == {d.id for d in everything}
    failed = list(c.documents.list(world.collection.id, status="failed", page_size=1))
    assert [d.id for d in failed] == [world.broken.id]
    doc = c.documents.get(world.collection.id, world.from_path.id)
    assert isinstance(doc, models.Document) and doc.title == "Volcanoes"


# Collections -----------------------------------------------------------------------------------


def test_collections_crud(world: World) -> None:
    c = world.client
    made = c.collections.create("scratch", metadata={"team": "docs"})
    assert isinstance(made, models.Collection) and made.name == "scratch"
    with pytest.raises(Conflict) as caught:
        c.collections.create("SCRATCH")
    assert caught.value.status_code == 409 and caught.value.request_id
    assert c.collections.get(made.id).id == made.id
    renamed = c.collections.update(made.id, name="scratch-2", description="renamed")
    assert (renamed.name, renamed.description) == ("scratch-2", "renamed")
    names = [coll.name for coll in c.collections.list(page_size=1)]
    assert names == sorted(names) and {"corpus", "scratch-2"} <= set(names)
    corpus = c.collections.get(world.collection.id)
    assert corpus.document_count >= 6
    assert c.collections.delete(made.id).status == models.CollectionStatus.deleting


# Search and answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_search_modes(world: World, mode: str) -> None:
    body = world.client.search("When do I get my refund?", mode=mode, top_k=3)  # type: ignore[arg-type]
    assert isinstance(body, models.SearchResponse)
    assert body.mode == mode
    assert body.results[0].document_id in {d.id for d in world.directory}
    assert "Refunds" in body.results[0].text
    assert all(isinstance(hit.score, float) for hit in body.results)
    assert len(body.results) == 3


def test_search_filters_collections_min_score_and_cache(world: World) -> None:
    c = world.client
    hits = c.search("food", top_k=10, filters={"source": "kitchen"}).results
    assert [h.document_id for h in hits] == [world.from_bytes.id]
    hits = c.search("anything", top_k=10, filters={"source": {"$in": ["handbook"]}}).results
    assert {h.document_id for h in hits} == {d.id for d in world.directory}
    hits = c.search("anything", filters={"source": {"$exists": False}}, top_k=10).results
    assert world.from_path.id in {h.document_id for h in hits}
    scoped = c.search("magma", collection_ids=[world.collection.id], top_k=1)
    assert scoped.results[0].document_id == world.from_path.id
    cut = c.search("magma", top_k=10, min_score=0.99).results
    assert all(h.score >= 0.99 for h in cut)
    c.search("volcano eruptions", top_k=2)
    assert c.search("volcano eruptions", top_k=2).cache_hit is True
    assert c.search("volcano eruptions", top_k=2, cache=False).cache_hit is False
    with pytest.raises(NotFound):
        c.search("magma", collection_ids=[uuid.uuid4()])


def test_answer_and_answer_stream(world: World, llm: LLMServer) -> None:
    c = world.client
    answer = c.answer("How long do refunds take?", top_k=2)
    assert isinstance(answer, models.AnswerResponse)
    assert answer.mode == models.AnswerMode.generative
    assert answer.model == "openai/test-model" and answer.prompt_version
    assert answer.answer == LLM_ANSWER
    assert answer.usage.total_tokens > 0
    # [1] is the first source, the refunds document; [9] matches no source and is dropped.
    assert [ct.number for ct in answer.citations] == [1]
    assert answer.citations[0].title == "Refunds"
    assert answer.citations[0].document_id == answer.sources[0].document_id
    # The model was given the question and the retrieved text.
    prompt = json.dumps(last_chat(llm)["messages"])
    assert "How long do refunds take?" in prompt and "14 days" in prompt

    events = list(c.answer_stream("How long do refunds take?", top_k=2, mode="hybrid"))
    assert isinstance(events[0], RetrievalEvent) and len(events[0].sources) == 2
    assert isinstance(events[-1], DoneEvent)
    deltas = events[1:-1]
    assert all(isinstance(e, DeltaEvent) for e in deltas)
    # One delta per token the model streamed, as it sent them.
    words = LLM_ANSWER.split(" ")
    assert [e.text for e in deltas if isinstance(e, DeltaEvent)] == [
        words[0],
        *(" " + w for w in words[1:]),
    ]
    assert last_chat(llm)["stream"] is True
    done = events[-1]
    assert done.answer == LLM_ANSWER and done.mode == models.AnswerMode.generative
    assert [ct.number for ct in done.citations] == [1] and done.citations[0].title == "Refunds"
    assert done.usage.completion_tokens == len(words) and done.usage.total_tokens > 0


def test_usage(world: World, llm: LLMServer) -> None:
    # Exactly what this test does is counted (not whatever earlier tests left behind).
    before = world.client.usage()
    assert isinstance(before, models.Usage)
    world.client.search("usage probe", top_k=1)
    world.client.answer("How long do refunds take?", top_k=1)
    after = world.client.usage()
    used = {m.metric: m.used for m in after.metrics}
    was = {m.metric: m.used for m in before.metrics}
    assert used["searches"] - was["searches"] == 1
    assert used["answers"] - was["answers"] == 1
    history = world.client.usage_history(days=2)
    assert len(history.days) == 2


# Accounts and API keys -------------------------------------------------------------------------


def test_account_routes_with_an_access_token(world: World) -> None:
    with Atrium(world.account.url, access_token=world.account.access_token) as account:
        me = account.me()
        assert "@" in me.email
        tenants = list(account.tenants.list())
        assert [str(t.id) for t in tenants] == [world.account.tenant_id]
        assert tenants[0].role == models.Role.owner
        assert str(account.tenants.get(world.account.tenant_id).id) == world.account.tenant_id
        # The generic call, with the tenant filled in.
        account.tenant_id = world.account.tenant_id
        page = account.request("GET", "/v1/tenants/{tenant_id}/collections", params={"size": 1})
        assert page["size"] == 1 and page["total"] >= 1
        assert account.plans().plans


def test_api_keys_create_list_rotate_revoke(world: World) -> None:
    c = world.client
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    made = c.api_keys.create("reader", ["search"], expires_at=later, rate_limit_per_minute=30)
    assert made.key.startswith("atr_") and made.scopes == ["search"]
    assert made.id in {k.id for k in c.api_keys.list(page_size=1)}
    rotated = c.api_keys.rotate(made.id)
    assert rotated.key != made.key and rotated.rotated_from_id == made.id
    c.api_keys.revoke(rotated.id)
    listed = {k.id: k for k in c.api_keys.list(include_revoked=True)}
    assert listed[rotated.id].status == models.ApiKeyStatus.revoked
    with Atrium(world.account.url, api_key=rotated.key, tenant_id=world.account.tenant_id) as old:
        with pytest.raises(AuthenticationError) as caught:
            old.search("refunds")
        assert caught.value.status_code == 401 and caught.value.request_id


# Errors and retries ----------------------------------------------------------------------------


def test_errors_are_typed_and_carry_the_request_id(world: World) -> None:
    c = world.client
    with pytest.raises(NotFound) as not_found:
        c.collections.get(uuid.uuid4())
    e = not_found.value
    assert (e.status_code, e.error) == (404, "NotFound")
    assert e.request_id and len(e.request_id) == 32
    assert e.request_id in str(e) and isinstance(e.detail, str)

    with pytest.raises(ValidationError) as invalid:
        c.search("refunds", top_k=0)
    assert invalid.value.status_code == 422 and invalid.value.error == "ValidationError"
    assert invalid.value.detail[0]["loc"] == ["body", "top_k"]
    assert "top_k" in invalid.value.message

    narrow = c.api_keys.create("search only", ["search"])
    with Atrium(world.account.url, api_key=narrow.key, tenant_id=world.account.tenant_id) as n:
        assert n.search("refunds", top_k=1).results
        with pytest.raises(PermissionDenied) as denied:
            n.collections.create("not allowed")
        assert denied.value.status_code == 403 and denied.value.request_id
    with Atrium(world.account.url, api_key="atr_not-a-key", tenant_id=world.account.tenant_id) as b:
        with pytest.raises(AuthenticationError):
            b.usage()
    with pytest.raises(ValueError, match="tenant_id"):
        Atrium(world.account.url, api_key=narrow.key).usage()


class CountingTransport(httpx.HTTPTransport):
    """The real HTTP transport, counting requests by status."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_rate_limited_requests_are_retried_then_given_up(world: World) -> None:
    slow = world.client.api_keys.create("slow", ["usage:read"], rate_limit_per_minute=1)
    transport = CountingTransport()
    policy = RetryPolicy(max_retries=2, max_sleep=0.05)
    with Atrium(
        world.account.url,
        api_key=slow.key,
        tenant_id=world.account.tenant_id,
        retry=policy,
        transport=transport,
    ) as client:
        client.usage()
        with pytest.raises(RateLimited) as caught:
            client.usage()
    # One allowed, then the first refusal and two bounded retries.
    assert transport.statuses == [200, 429, 429, 429]
    e = caught.value
    assert e.status_code == 429 and e.error == "TooManyRequests" and e.request_id
    assert e.retry_after is not None and 1 <= e.retry_after <= 60
    assert e.headers["x-ratelimit-remaining"] == "0"


def test_retry_after_is_honoured_until_success() -> None:
    # The live server's windows are a minute long: a scripted transport answers 429 and 503
    # with short Retry-After values, then 200.
    answers = [
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "TooManyRequests"}),
        httpx.Response(503, json={"error": "ServiceUnavailable", "detail": "Redis is down"}),
        httpx.Response(200, json={"metrics": []}),
    ]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return answers.pop(0)

    policy = RetryPolicy(max_retries=2, backoff=0.01)
    with Atrium(
        "http://sdk.invalid",
        api_key="k",
        tenant_id="t",
        retry=policy,
        transport=httpx.MockTransport(handler),
    ) as client:
        assert client.request("GET", "/v1/tenants/{tenant_id}/usage") == {"metrics": []}
    assert seen == ["/v1/tenants/t/usage"] * 3
    # Waits are bounded by max_sleep, whatever Retry-After says.
    far = httpx.Response(503, headers={"Retry-After": "3600"})
    assert RetryPolicy(max_sleep=2.5).delay(0, far) == 2.5
    assert RetryPolicy(max_retries=1).delay(1, far) is None
    assert RetryPolicy().delay(0, httpx.Response(500)) is None
    with (
        Atrium(
            "http://sdk.invalid",
            tenant_id="t",
            retry=RetryPolicy(max_retries=0),
            transport=httpx.MockTransport(lambda r: httpx.Response(503, text="down")),
        ) as client,
        pytest.raises(ServiceUnavailable) as caught,
    ):
        client.usage()
    assert caught.value.detail == "down" and caught.value.retry_after is None


# The async client ------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_async_client(world: World, llm: LLMServer, tmp_path: Path) -> None:
    llm.behaviour["answer"] = "Glaciers carve U-shaped valleys [1]."
    acct = world.account
    async with AsyncAtrium(acct.url, api_key=acct.key, tenant_id=acct.tenant_id) as c:
        coll = await c.collections.create("async")
        assert (await c.collections.get(coll.id)).name == "async"
        assert "async" in [x.name async for x in c.collections.list(page_size=1)]
        (tmp_path / "a.md").write_text("# Glaciers\n\nGlaciers carve U-shaped valleys.\n")
        (tmp_path / "b.txt").write_text("Tides follow the pull of the moon.\n")
        from_dir = await c.documents.upload(coll.id, tmp_path)
        from_bytes = await c.documents.upload(coll.id, [b"Owls hunt at night.\n"])
        from_path = await c.documents.upload(coll.id, tmp_path / "a.md", filename="glacier.md")
        assert from_path[0].duplicate is True  # the same bytes as a.md
        ids = [d.id for d in [*from_dir, *from_bytes]]
        ready = await c.documents.wait_until_ready(coll.id, ids, timeout=120)
        assert [d.status for d in ready] == ["ready"] * 3
        listed = [d.id async for d in c.documents.list(coll.id, page_size=2)]
        assert sorted(map(str, listed)) == sorted(map(str, ids))

        for mode in ("vector", "hybrid"):
            hits = (await c.search("moon and tides", mode=mode, collection_ids=[coll.id])).results  # type: ignore[arg-type]
            assert hits[0].document_id == from_dir[1].id
        answer = await c.answer("What do glaciers carve?", collection_ids=[coll.id], top_k=1)
        assert answer.mode == models.AnswerMode.generative
        assert answer.answer == "Glaciers carve U-shaped valleys [1]."
        assert answer.citations[0].document_id == from_dir[0].id
        events = [e async for e in c.answer_stream("What do glaciers carve?", top_k=1)]
        assert isinstance(events[0], RetrievalEvent) and isinstance(events[-1], DoneEvent)
        deltas = "".join(e.text for e in events if isinstance(e, DeltaEvent))
        assert deltas == events[-1].answer == "Glaciers carve U-shaped valleys [1]."
        assert (await c.usage()).metrics

        key = await c.api_keys.create("async key", ["search"])
        assert key.id in [k.id async for k in c.api_keys.list()]
        await c.api_keys.revoke(key.id)
        with pytest.raises(NotFound) as caught:
            await c.documents.get(coll.id, uuid.uuid4())
        assert caught.value.request_id
        assert (await c.collections.delete(coll.id)).status == "deleting"


SSE_WITH_ERROR = (
    ": ping - 2026-01-01 00:00:00\r\n\r\n"
    'event: retrieval\r\ndata: {"sources":[],"cache_hit":false,"timings":{"total_ms":1.5}}\r\n\r\n'
    'event: delta\r\ndata: {"text":"Refunds take"}\r\n\r\n'
    'event: later\r\ndata: {"unknown":"skipped"}\r\n\r\n'
    'event: error\r\ndata: {"error":"GatewayTimeout","detail":"The model timed out",'
    '"status":504}\r\n\r\n'
)


@pytest.mark.asyncio(loop_scope="session")
async def test_stream_error_events_are_typed() -> None:
    # A provider failing mid-answer needs an LLM that breaks off after it started: the loopback
    # LLM answers whole or not at all, so a scripted transport sends what the server sends then.
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept"] == "text/event-stream"
        return httpx.Response(
            200, text=SSE_WITH_ERROR, headers={"content-type": "text/event-stream"}
        )

    transport = httpx.MockTransport(handler)
    with Atrium("http://sdk.invalid", tenant_id="t", transport=transport) as client:
        events = list(client.answer_stream("q"))
    async with AsyncAtrium("http://sdk.invalid", tenant_id="t", transport=transport) as aclient:
        async_events = [e async for e in aclient.answer_stream("q")]
    for got in (events, async_events):
        assert [e.type for e in got] == ["retrieval", "delta", "error"]
        error = got[-1]
        assert isinstance(error, ErrorEvent)
        assert (error.error, error.detail, error.status) == (
            "GatewayTimeout",
            "The model timed out",
            504,
        )
