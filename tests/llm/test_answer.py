"""Grounded answers through HTTP: extractive and generative, plain and streamed, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.support.llm_server import LLMServer
from tests.support.retrieval import World, make_tenant, parse_sse, seed_corpus, usage

pytestmark = pytest.mark.asyncio(loop_scope="session")

QUESTION = "How do plants turn sunlight into sugar?"


@pytest.fixture
async def world(client: httpx.AsyncClient, app: Any, celery_worker: Any) -> World:
    return await seed_corpus(client, await make_tenant(app, client))


@pytest.fixture
def generative(settings: Any, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> LLMServer:
    """Answers through the loopback OpenAI-compatible server."""
    monkeypatch.setattr(settings, "llm_model", "openai/test-model")
    monkeypatch.setattr(settings, "llm_api_base", llm_server.base_url)
    monkeypatch.setattr(settings, "llm_api_key", type(settings.llm_api_key)("sk-test"))
    monkeypatch.setattr(settings, "llm_timeout_seconds", 5.0)
    llm_server.behaviour.clear()
    llm_server.requests.clear()
    yield llm_server
    llm_server.behaviour.clear()


async def _answer(client: httpx.AsyncClient, world: World, **body: Any) -> httpx.Response:
    return await client.post(world.url("answer"), json=body, headers=world.headers, timeout=60)


async def test_extractive_answer_quotes_and_cites_the_sources(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    r = await _answer(client, world, query=QUESTION, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "extractive"
    assert body["model"] is None and body["prompt_version"] is None
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert [s["number"] for s in body["sources"]] == [1, 2, 3]
    assert body["sources"][0]["title"] == "Photosynthesis"
    assert body["answer"].startswith("Photosynthesis is the process")
    assert "[1]" in body["answer"]
    assert body["citations"][0]["number"] == 1
    assert body["citations"][0]["document_id"] == str(world.documents["Photosynthesis"])
    # Every sentence is quoted from the source it cites.
    by_number = {s["number"]: s["text"] for s in body["sources"]}
    for c in body["citations"]:
        assert c["chunk_id"] == body["sources"][c["number"] - 1]["chunk_id"]
    first_sentence = body["answer"].split(" [1]")[0]
    assert first_sentence in by_number[1]
    assert body["timings"]["llm_ms"] > 0
    assert body["timings"]["total_ms"] >= body["timings"]["search_ms"]
    assert (await usage(client, world))["answers"] == 1


async def test_extractive_answer_streams(client: httpx.AsyncClient, world: World) -> None:
    r = await _answer(client, world, query=QUESTION, top_k=2, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[0].event == "retrieval"
    assert events[-1].event == "done"
    assert {e.event for e in events[1:-1]} == {"delta"}
    assert events[0].data["sources"][0]["title"] == "Photosynthesis"
    text = "".join(e.data["text"] for e in events[1:-1])
    done = events[-1].data
    assert done["answer"] == text.strip()
    assert done["mode"] == "extractive"
    assert done["citations"][0]["number"] == 1


async def test_answer_with_nothing_to_retrieve(client: httpx.AsyncClient, app: Any) -> None:
    w = await make_tenant(app, client)
    r = await _answer(client, w, query=QUESTION)
    assert r.status_code == 200
    body = r.json()
    assert body["sources"] == [] and body["citations"] == []
    assert "No passage" in body["answer"]


async def test_generative_answer_with_citations(
    client: httpx.AsyncClient, app: Any, world: World, generative: LLMServer
) -> None:
    generative.behaviour["answer"] = (
        "Plants turn light into glucose in their chloroplasts [1]. Leaves matter [1, 2]. "
        "Nothing else [7]."
    )
    r = await _answer(client, world, query=QUESTION, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "generative"
    assert body["model"] == "openai/test-model"
    assert body["prompt_version"] == "answer_v1"
    assert body["answer"] == generative.behaviour["answer"]
    # [7] matches no source and is dropped; the others point at the retrieved chunks.
    assert [c["number"] for c in body["citations"]] == [1, 2]
    assert body["citations"][0]["chunk_id"] == body["sources"][0]["chunk_id"]
    assert body["usage"]["prompt_tokens"] == 50
    assert body["usage"]["total_tokens"] == 50 + body["usage"]["completion_tokens"]
    assert body["timings"]["llm_ms"] > 0
    # The provider got the versioned prompt with numbered sources and the question.
    sent = generative.requests[-1]["body"]
    assert sent["model"] == "test-model"
    assert sent["temperature"] == pytest.approx(app.state.settings.llm_temperature)
    assert sent["max_tokens"] == app.state.settings.llm_max_tokens
    system, user = sent["messages"]
    assert system["role"] == "system" and "only the numbered sources" in system["content"]
    assert "[1] Photosynthesis\nPhotosynthesis is the process" in user["content"]
    assert f"Question: {QUESTION}" in user["content"]
    used = await usage(client, world)
    assert used["answers"] == 1
    assert used["llm_tokens"] == body["usage"]["total_tokens"]


async def test_per_request_overrides_within_limits(
    client: httpx.AsyncClient,
    settings: Any,
    world: World,
    generative: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "llm_allowed_models", ["openai/other-model"])
    r = await _answer(
        client, world, query=QUESTION, temperature=0.7, max_tokens=64, model="openai/other-model"
    )
    assert r.status_code == 200, r.text
    sent = generative.requests[-1]["body"]
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("other-model", 0.7, 64)
    r = await _answer(client, world, query=QUESTION, model="openai/gpt-5")
    assert r.status_code == 422
    assert "openai/gpt-5" in r.json()["detail"]
    r = await _answer(client, world, query=QUESTION, max_tokens=settings.llm_max_tokens_limit + 1)
    assert r.status_code == 422
    assert "max_tokens is limited" in r.json()["detail"]
    r = await _answer(client, world, query=QUESTION, temperature=3)
    assert r.status_code == 422


async def test_generative_answer_streams(
    client: httpx.AsyncClient, app: Any, world: World, generative: LLMServer
) -> None:
    generative.behaviour["answer"] = "Chloroplasts capture light to make glucose [1]."
    r = await _answer(client, world, query=QUESTION, stream=True, top_k=2)
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    names = [e.event for e in events]
    assert names[0] == "retrieval" and names[-1] == "done"
    assert names.count("delta") == len(generative.behaviour["answer"].split(" "))
    assert [s["number"] for s in events[0].data["sources"]] == [1, 2]
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == generative.behaviour["answer"]
    done = events[-1].data
    assert done["answer"] == text
    assert done["mode"] == "generative"
    assert [c["number"] for c in done["citations"]] == [1]
    assert done["usage"]["prompt_tokens"] == 50
    assert done["usage"]["completion_tokens"] == names.count("delta")
    assert generative.requests[-1]["body"]["stream"] is True
    assert (await usage(client, world))["llm_tokens"] == done["usage"]["total_tokens"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "expected"), [(500, 502), (401, 502), (429, 502)])
async def test_provider_errors_become_502(
    client: httpx.AsyncClient,
    world: World,
    generative: LLMServer,
    status: int,
    expected: int,
    stream: bool,
) -> None:
    generative.behaviour["status"] = status
    r = await _answer(client, world, query=QUESTION, stream=stream)
    assert r.status_code == expected, r.text
    body = r.json()
    assert body["error"] == "BadGateway"
    assert str(status) in body["detail"] and "openai/test-model" in body["detail"]


@pytest.mark.parametrize("stream", [False, True])
async def test_provider_timeout_becomes_504_without_hanging(
    client: httpx.AsyncClient,
    settings: Any,
    world: World,
    generative: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    monkeypatch.setattr(settings, "llm_timeout_seconds", 1.0)
    # The provider answers only once the test lets it, after the response: the response can
    # only come from the timeout, never from waiting the provider out.
    release = threading.Event()
    generative.behaviour["hold"] = release
    await client_warm_litellm()
    try:
        r = await _answer(client, world, query=QUESTION, stream=stream)
        assert r.status_code == 504, r.text
        assert r.json()["error"] == "GatewayTimeout"
        assert "did not answer within 1 s" in r.json()["detail"]

        # It was the provider that kept it waiting: the question reached it.
        def asked() -> bool:
            return any(q["path"].endswith("/chat/completions") for q in generative.requests)

        await _until(asked)
    finally:
        release.set()


async def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def client_warm_litellm() -> None:
    """Import litellm first (it takes seconds): the timeout is spent on the provider."""
    from atrium.kit.litellm import litellm_module

    await litellm_module()


@dataclass
class StallingServer:
    url: str
    #: Set by the test to let the stalled stream go on (and end).
    release: threading.Event
    #: Set by the server once it has sent its two pieces and stalls.
    stalled: threading.Event


@pytest.fixture
def stalling_server() -> Iterator[StallingServer]:
    """An OpenAI-compatible server whose stream sends two pieces, then stalls until released."""
    release, stalled = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def handle(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                super().handle()

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for word in ("Partial", " answer"):
                chunk = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            stalled.set()
            release.wait(120)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield StallingServer(f"http://127.0.0.1:{server.server_address[1]}/v1", release, stalled)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


async def test_stream_that_stalls_midway_ends_with_an_error_event(
    client: httpx.AsyncClient,
    settings: Any,
    world: World,
    generative: LLMServer,
    stalling_server: StallingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "llm_api_base", stalling_server.url)
    monkeypatch.setattr(settings, "llm_timeout_seconds", 1.0)
    await client_warm_litellm()
    r = await _answer(client, world, query=QUESTION, stream=True)
    # The stream ended while the provider was stalled mid-answer (it goes on only once the
    # fixture releases it, after the test): the per-chunk timeout ended it.
    assert stalling_server.stalled.is_set()
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert [e.event for e in events] == ["retrieval", "delta", "delta", "error"]
    assert events[-1].data["status"] == 504
    assert events[-1].data["error"] == "GatewayTimeout"
