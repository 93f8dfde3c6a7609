"""The MCP server at /mcp, driven by the ``mcp`` SDK's own client over streamable HTTP against
``atrium serve`` (the live server), with a corpus ingested by the real worker.

One module-wide setup (tenants, corpus, keys); every test only reads, except the ones that
use their own tenant or key (quota, rate limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import pytest
import redis.exceptions
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from atrium.apikeys import service as apikeys
from atrium.apikeys.secrets import generate_key
from atrium.auth.permissions import Scope
from atrium.models import Tenant, utcnow
from atrium.retrieval import service as retrieval
from tests.support.apikeys import create_api_key
from tests.support.factories import bearer, create_user
from tests.support.llm_server import LLMServer
from tests.support.quota import set_plan
from tests.support.retrieval import CORPUS, World, make_tenant, seed_corpus
from tests.support.sdk import clean_state
from tests.support.sql import sql_log

pytestmark = pytest.mark.asyncio(loop_scope="session")

#: Three documents of the shared corpus, in both collections: enough to rank and to scope.
A_CORPUS = [d for d in CORPUS if d[0] in {"Photosynthesis", "API key rotation", "Zugspitze"}]
B_CORPUS = [
    (
        "Espresso",
        "Espresso is brewed by forcing hot water through finely ground coffee under pressure. "
        "A shot takes about twenty-five seconds.",
        {"lang": "en"},
        "recipes",
    )
]
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}


@dataclass
class Setup:
    """The module's tenants and keys."""

    url: str
    a: World
    b: World
    key_a: str
    key_b: str
    keys: dict[str, str] = field(default_factory=dict)


async def _key(app: Any, tenant_id: uuid.UUID, scopes: list[str] | None = None, **kw: Any) -> str:
    """A new API key of the tenant (every scope unless given); its secret."""
    async with app.state.sessionmaker() as session:
        tenant = await session.get(Tenant, tenant_id)
    _, secret = await create_api_key(app, tenant, scopes, **kw)
    return secret


@pytest.fixture(scope="module")
async def setup(
    app: Any, live_server: Any, celery_worker: Any, test_env: dict[str, Any]
) -> AsyncIterator[Setup]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50011))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        a = await make_tenant(app, client)
        b = await make_tenant(app, client)
        await seed_corpus(client, a, A_CORPUS)
        await seed_corpus(client, b, B_CORPUS)
    every_but_search = [s.value for s in Scope if s is not Scope.search]
    yield Setup(
        url=live_server.url + "/mcp",
        a=a,
        b=b,
        key_a=await _key(app, a.tenant_id),
        key_b=await _key(app, b.tenant_id),
        keys={
            "no_search": await _key(app, a.tenant_id, every_but_search),
            "revoked": await _key(app, a.tenant_id, revoked=True),
            "expired": await _key(app, a.tenant_id, expires_at=utcnow() - dt.timedelta(minutes=1)),
        },
    )
    clean_state(test_env)


@contextlib.asynccontextmanager
async def mcp_client(url: str, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP, sending the key as a bearer token."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60)
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:  # type: ignore[arg-type]
        yield client


@contextlib.asynccontextmanager
async def in_process_client(app: Any, key: str) -> AsyncIterator[Client]:
    """The SDK's client against the in-process app (whose settings a test may change)."""
    http = httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app),
        base_url="http://testserver",
        headers={"Authorization": f"Bearer {key}"},
    )
    transport = streamable_http_client("http://testserver/mcp", http_client=http)
    async with http, Client(transport) as client:  # type: ignore[arg-type]
        yield client


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def test_handshake_lists_the_tools_and_search_returns_cited_chunks(setup: Setup) -> None:
    # mode="legacy": the initialize handshake, as Claude Desktop (mcp-remote) and Cursor do.
    async with mcp_client(setup.url, setup.key_a, mode="legacy") as client:
        assert client.server_info is not None and client.server_info.name == "atrium"
        assert client.protocol_version == "2025-11-25"
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"search", "answer", "list_collections", "get_document"}
        assert tools["search"].input_schema["required"] == ["query"]
        assert tools["search"].output_schema is not None
        assert all(t.annotations and t.annotations.read_only_hint for t in tools.values())

        result = await client.call_tool(
            "search", {"query": "How do plants make food from light?", "top_k": 2}
        )
        body = _ok(result)
        first = body["results"][0]
        assert first["number"] == 1
        assert first["title"] == "Photosynthesis"
        assert first["document_id"] == str(setup.a.documents["Photosynthesis"])
        assert first["collection_id"] == str(setup.a.collections["general"])
        assert "chloroplasts" in first["text"]
        assert 0 < first["score"] <= 1
        assert len(body["results"]) == 2
        # The text the model reads cites the same chunk.
        text = result.content[0].text  # type: ignore[union-attr]
        assert "[1] Photosynthesis" in text and str(first["document_id"]) in text


async def test_search_options_and_the_other_tools(setup: Setup, llm_server: LLMServer) -> None:
    llm_server.behaviour.clear()
    # mode="auto": the SDK's default (2026-07-28 per-request envelope when offered).
    async with mcp_client(setup.url, setup.key_a) as client:
        assert client.protocol_version == "2026-07-28"
        general = str(setup.a.collections["general"])
        support = str(setup.a.collections["support"])
        body = _ok(
            await client.call_tool(
                "search",
                {"query": "höchster Berg", "collection_ids": [support], "mode": "hybrid"},
            )
        )
        assert [r["title"] for r in body["results"]] == ["Zugspitze"]
        assert body["mode"] == "hybrid"

        listed = _ok(await client.call_tool("list_collections", {}))
        assert listed["total"] == 2
        names = {c["name"]: c for c in listed["collections"]}
        assert names["general"]["id"] == general and names["general"]["document_count"] == 2

        doc_id = str(setup.a.documents["Zugspitze"])
        doc = _ok(await client.call_tool("get_document", {"document_id": doc_id}))
        assert doc["title"] == "Zugspitze" and doc["status"] == "ready"
        assert doc["collection_id"] == support and doc["chunk_count"] >= 1
        wrong = await client.call_tool(
            "get_document", {"document_id": doc_id, "collection_id": general}
        )
        assert wrong.is_error and wrong.structured_content["error"] == "NotFound"  # type: ignore[index]

        answer = _ok(
            await client.call_tool(
                "answer", {"query": "How do plants turn sunlight into sugar?", "top_k": 2}
            )
        )
        # The live server answers through the session's loopback LLM (tests/conftest.py).
        assert answer["mode"] == "generative"
        assert answer["citations"] and answer["citations"][0]["title"] == "Photosynthesis"
        assert answer["sources"][0]["document_id"] == str(setup.a.documents["Photosynthesis"])
        assert "[1]" in answer["answer"]


async def test_bad_arguments_are_tool_errors_a_person_can_act_on(setup: Setup) -> None:
    async with mcp_client(setup.url, setup.key_a) as client:
        bad = await client.call_tool("search", {"query": "x", "top_k": 500})
        assert bad.is_error
        assert "top_k" in bad.content[0].text  # type: ignore[union-attr]
        bad = await client.call_tool("search", {"query": "x", "filters": {"year": {"$near": 1}}})
        assert bad.is_error
        assert bad.structured_content["error"] == "Unprocessable"  # type: ignore[index]
        assert "filters" in bad.content[0].text  # type: ignore[union-attr]
        missing = await client.call_tool(
            "search", {"query": "x", "collection_ids": [str(uuid.uuid4())]}
        )
        assert missing.is_error and "not found" in missing.content[0].text  # type: ignore[union-attr]
        bad = await client.call_tool("get_document", {"document_id": "not-a-uuid"})
        assert bad.is_error and "document_id" in bad.content[0].text  # type: ignore[union-attr]


async def test_a_key_sees_only_its_own_tenant(setup: Setup) -> None:
    async with mcp_client(setup.url, setup.key_b) as client:
        body = _ok(await client.call_tool("search", {"query": "plants and sunlight", "top_k": 10}))
        assert [r["title"] for r in body["results"]] == ["Espresso"]
        listed = _ok(await client.call_tool("list_collections", {}))
        assert [c["name"] for c in listed["collections"]] == ["recipes"]
        a_doc = str(setup.a.documents["Photosynthesis"])
        missing = await client.call_tool("get_document", {"document_id": a_doc})
        assert missing.is_error
        assert missing.structured_content == {  # exactly like a document that never existed
            "error": "NotFound",
            "detail": "Document not found",
            "status": 404,
        }
        a_collection = str(setup.a.collections["general"])
        other = await client.call_tool("search", {"query": "x", "collection_ids": [a_collection]})
        assert other.is_error and other.structured_content["error"] == "NotFound"  # type: ignore[index]


async def test_a_key_without_the_scope_cannot_call_the_tool(setup: Setup) -> None:
    async with mcp_client(setup.url, setup.keys["no_search"]) as client:
        refused = await client.call_tool("search", {"query": "plants"})
        assert refused.is_error
        detail = refused.structured_content["detail"]  # type: ignore[index]
        assert detail["missing_permission"] == "search"
        assert detail["missing_scopes"] == ["search"]
        assert "'search' scope" in refused.content[0].text  # type: ignore[union-attr]
        # Its other scopes still work.
        assert not (await client.call_tool("list_collections", {})).is_error


async def test_bad_credentials_get_401_before_any_mcp_handling(setup: Setup) -> None:
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    malformed = "atr_" + "x" * 49
    unknown = "atr_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
    async with httpx.AsyncClient(timeout=30) as http:
        for key in (None, malformed, unknown, setup.keys["revoked"], setup.keys["expired"]):
            headers = dict(MCP_HEADERS)
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            r = await http.post(setup.url, json=tools_list, headers=headers)
            assert r.status_code == 401, (key, r.text)
            body = r.json()
            assert body["error"] == "Unauthorized" and isinstance(body["detail"], str)
            assert r.headers["www-authenticate"] == "Bearer"
        # A person's access token is not an API key.
        r = await http.post(setup.url, json=tools_list, headers={**MCP_HEADERS, **setup.a.headers})
        assert r.status_code == 401 and "API key" in r.json()["detail"]
        # Stateless: no SSE stream to GET, no session to DELETE.
        auth = {"Authorization": f"Bearer {setup.key_a}"}
        for method in ("GET", "DELETE"):
            r = await http.request(method, setup.url, headers={**MCP_HEADERS, **auth})
            assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
            assert r.json()["error"] == "MethodNotAllowed"
    # The SDK's client cannot even connect (its transport reports the 401 as an error).
    refused = False
    try:
        async with mcp_client(setup.url, setup.keys["revoked"]) as client:
            await client.list_tools()
    except* MCPError:
        refused = True
    assert refused


async def test_a_key_revoked_or_rotated_after_use_is_refused(app: Any, setup: Setup) -> None:
    # The server remembers each key's tenant once it has served it (apikeys.service.
    # tenant_of_key): that must never let a revoked or rotated key back in.
    async with app.state.sessionmaker() as session:
        tenant = await session.get(Tenant, setup.a.tenant_id)
    revoked, revoked_secret = await create_api_key(app, tenant)
    rotated, rotated_secret = await create_api_key(app, tenant)
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50013))
    async with (
        httpx.AsyncClient(timeout=30) as http,
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as api,
    ):

        async def status(secret: str) -> int:
            headers = {**MCP_HEADERS, "Authorization": f"Bearer {secret}"}
            return (await http.post(setup.url, json=tools_list, headers=headers)).status_code

        assert await status(revoked_secret) == 200
        assert await status(rotated_secret) == 200
        keys = f"/v1/tenants/{setup.a.tenant_id}/api-keys"
        r = await api.delete(f"{keys}/{revoked.id}", headers=setup.a.headers)
        assert r.status_code == 204, r.text
        r = await api.post(f"{keys}/{rotated.id}/rotate", json={}, headers=setup.a.headers)
        assert r.status_code == 201, r.text
        assert await status(revoked_secret) == 401
        assert await status(rotated_secret) == 401
        assert await status(r.json()["key"]) == 200


def _in_process(app: Any, port: int) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", port))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)


async def test_an_unknown_key_costs_one_database_read_however_many_ask(app: Any) -> None:
    # Anyone can mint a well-formed key (the checksum is CRC32): 50 requests at once with one
    # that does not exist share one database read, and the next ones read only Redis.
    unknown = generate_key()
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {unknown}"}
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with _in_process(app, 50014) as http:
        with sql_log(app) as statements:
            answers = await asyncio.gather(
                *(http.post("/mcp", json=tools_list, headers=headers) for _ in range(50))
            )
            answers.append(await http.post("/mcp", json=tools_list, headers=headers))
    for r in answers:
        assert r.status_code == 401, r.text
        assert r.json()["detail"] == "Invalid API key"
    lookups = [s for s in statements if "key_hash IN" in s]
    assert len(lookups) == 1, statements


async def test_a_key_created_after_a_miss_on_its_secret_works_at_once(
    app: Any, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = generate_key()
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {secret}"}
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with _in_process(app, 50015) as http:
        r = await http.post("/mcp", json=tools_list, headers=headers)
        assert r.status_code == 401, r.text  # and now remembered as unknown
        monkeypatch.setattr(apikeys, "generate_key", lambda: secret)
        r = await http.post(
            f"/v1/tenants/{setup.a.tenant_id}/api-keys",
            json={"name": "late", "scopes": ["search"]},
            headers=setup.a.headers,
        )
        assert r.status_code == 201 and r.json()["key"] == secret, r.text
        r = await http.post("/mcp", json=tools_list, headers=headers)
        assert r.status_code == 200, r.text


async def test_more_than_one_authorization_header_is_refused(setup: Setup) -> None:
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    one = {**MCP_HEADERS, "Authorization": f"Bearer {setup.key_a}"}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(setup.url, json=tools_list, headers=one)).status_code == 200
        for other in (setup.key_a, setup.key_b):
            headers = [
                *MCP_HEADERS.items(),
                ("Authorization", f"Bearer {setup.key_a}"),
                ("Authorization", f"Bearer {other}"),
            ]
            r = await http.post(setup.url, json=tools_list, headers=headers)
            assert r.status_code == 401, r.text
            assert "one Authorization header" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"


async def test_rate_limit_refuses_as_the_routes_do(app: Any, setup: Setup) -> None:
    key = await _key(app, setup.a.tenant_id, rate_limit_per_minute=2)
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {key}"}
    tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with httpx.AsyncClient(timeout=30) as http:
        for remaining in ("1", "0"):
            r = await http.post(setup.url, json=tools_list, headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-limit"] == "2"
            assert r.headers["x-ratelimit-remaining"] == remaining
        r = await http.post(setup.url, json=tools_list, headers=headers)
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "TooManyRequests"
    assert int(r.headers["retry-after"]) > 0


async def test_a_tenant_over_its_search_quota_is_refused(app: Any, setup: Setup) -> None:
    world = await make_tenant(app)
    admin = await bearer(await create_user(app, superuser=True))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50012))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await set_plan(client, admin, world.tenant_id, "free", {"searches_per_month": 0})
    key = await _key(app, world.tenant_id)
    async with mcp_client(setup.url, key) as client:
        refused = await client.call_tool("search", {"query": "anything"})
    assert refused.is_error
    body = refused.structured_content
    assert body is not None and body["error"] == "QuotaExceeded" and body["status"] == 402
    assert body["detail"]["metric"] == "searches" and body["detail"]["limit"] == 0
    assert "Upgrade the plan" in refused.content[0].text  # type: ignore[union-attr]


async def test_generative_answer_with_its_citations(setup: Setup, llm_server: LLMServer) -> None:
    # The live server's LLM is the session's OpenAI-compatible loopback server.
    llm_server.behaviour.clear()
    async with mcp_client(setup.url, setup.key_a) as client:
        result = await client.call_tool(
            "answer", {"query": "How do plants turn sunlight into sugar?", "top_k": 2}
        )
    body = _ok(result)
    assert body["mode"] == "generative" and body["model"] == "openai/test-model"
    assert body["usage"]["total_tokens"] > 0
    assert body["citations"][0]["number"] == 1
    assert body["citations"][0]["document_id"] == str(setup.a.documents["Photosynthesis"])
    text = result.content[0].text  # type: ignore[union-attr]
    assert "[1]" in text and "Sources:\n[1] Photosynthesis" in text


@pytest.mark.parametrize(
    ("failure", "error", "words"),
    [
        (RuntimeError("secret internals"), "InternalError", "Quote request id"),
        (redis.exceptions.ConnectionError("refused"), "ServiceUnavailable", "Redis is unavailable"),
    ],
)
async def test_a_failing_service_is_a_tool_error_never_a_500(
    app: Any,
    setup: Setup,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    error: str,
    words: str,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise failure

    # Inside the search the route also runs (retrieval.service.metered_search).
    monkeypatch.setattr(retrieval, "search", broken)
    async with in_process_client(app, setup.key_a) as client:
        result = await client.call_tool("search", {"query": "plants"})
    assert result.is_error
    assert result.structured_content is not None
    assert result.structured_content["error"] == error
    text = result.content[0].text  # type: ignore[union-attr]
    assert words in text and "secret internals" not in text
