"""Reranking through litellm against a real rerank HTTP server on loopback.

No service fixtures: these tests need only the loopback server, so they run without MariaDB,
Redis or PostgreSQL. The first one pays for importing litellm (seconds, once per process).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from atrium.config import Settings
from atrium.kit.errors import BadGateway, GatewayTimeout, Unprocessable
from atrium.retrieval.rerank import (
    MAX_DOCUMENT_CHARS,
    RerankNotConfigured,
    check_rerank,
    is_configured,
    rerank,
)
from tests.support.rerank_server import RerankServer, score

API_KEY = "rk-test-secret-0123456789"
QUERY = "red apple pie"
DOCS = [
    "A red car parked outside.",  # red: 1/3
    "Grandmother's red apple pie recipe.",  # 3/3
    "Pears and plums.",  # 0/3
    "An apple a day.",  # 1/3
    "Apple pie with cream.",  # 2/3
]


@pytest.fixture(scope="module")
def server() -> Iterator[RerankServer]:
    srv = RerankServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def provider(server: RerankServer) -> Iterator[RerankServer]:
    server.requests.clear()
    server.behaviour.clear()
    yield server
    hold = server.behaviour.get("hold")
    if hold is not None:
        hold.set()  # let a held reply finish so its thread ends
    server.behaviour.clear()


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "test",
        "secret_key": "test-secret-key-that-is-long-enough-0123456789",
        "rerank_model": "cohere/rerank-english-v3.0",
        "rerank_api_key": API_KEY,
        "rerank_timeout_seconds": 5,
        **overrides,
    }
    # No .env file: these tests must not depend on the developer's configuration.
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# (model, what follows the server's address in api_base, the path litellm posts to)
PROVIDERS = [
    pytest.param("cohere/rerank-english-v3.0", "", "/v2/rerank", id="cohere-v2"),
    pytest.param("cohere/rerank-english-v3.0", "/v1/rerank", "/v1/rerank", id="cohere-v1"),
    pytest.param("jina_ai/jina-reranker-v2-base-multilingual", "", "/v1/rerank", id="jina_ai"),
    pytest.param("voyage/rerank-2", "/v1", "/v1/rerank", id="voyage"),
]


@pytest.mark.parametrize(("model", "suffix", "path"), PROVIDERS)
async def test_ranks_best_first_and_sends_the_request_to_the_provider(
    provider: RerankServer, model: str, suffix: str, path: str
) -> None:
    settings = make_settings(rerank_model=model, rerank_api_base=provider.base_url + suffix)

    out = await rerank(settings, QUERY, DOCS, top_n=3)

    assert [i for i, _ in out.ranking] == [1, 4, 0]  # ties (0 and 3) keep the documents' order
    assert [s for _, s in out.ranking] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert out.model == model
    assert out.elapsed_ms > 0
    [request] = provider.requests
    assert request["path"] == path
    assert request["headers"]["authorization"] == f"Bearer {API_KEY}"
    body = request["body"]
    assert body["model"] == model.split("/", 1)[1]
    assert body["query"] == QUERY
    assert body["documents"] == DOCS
    assert body.get("top_n", body.get("top_k")) == 3  # litellm sends Voyage top_k


async def test_top_n_beyond_the_documents_keeps_them_all(provider: RerankServer) -> None:
    settings = make_settings(rerank_api_base=provider.base_url)

    out = await rerank(settings, QUERY, DOCS[:2], top_n=10)

    assert [i for i, _ in out.ranking] == [1, 0]
    # Sent as the number of documents: some providers refuse a top_n above it.
    assert provider.requests[0]["body"]["top_n"] == 2


async def test_long_documents_are_cut_before_they_are_sent(provider: RerankServer) -> None:
    settings = make_settings(rerank_api_base=provider.base_url)
    long_doc = "apple " * 2000  # 12,000 characters
    docs = [long_doc, "red apple pie", "x" * MAX_DOCUMENT_CHARS]

    out = await rerank(settings, QUERY, docs, top_n=3)

    sent = provider.requests[0]["body"]["documents"]
    assert sent == [long_doc[:MAX_DOCUMENT_CHARS], "red apple pie", "x" * MAX_DOCUMENT_CHARS]
    assert out.ranking[0] == (1, 1.0)


async def test_a_provider_error_is_a_502_naming_the_model_without_the_key(
    provider: RerankServer,
) -> None:
    settings = make_settings(rerank_api_base=provider.base_url)
    # A provider that echoes the credentials it got: they must not reach the client.
    provider.behaviour.update(status=500, message=f"internal error for key {API_KEY}")

    with pytest.raises(BadGateway) as caught:
        await rerank(settings, QUERY, DOCS, top_n=2)

    err = caught.value
    assert err.status_code == 502
    assert "cohere/rerank-english-v3.0" in err.message
    assert "500" in err.message
    assert API_KEY not in err.message
    assert "***" in err.message
    assert len(provider.requests) == 1  # no retries


@pytest.mark.parametrize(
    "results",
    [
        [{"index": 9, "relevance_score": 0.5}],  # no such document
        [{"index": 0, "relevance_score": 0.5}, {"index": 0, "relevance_score": 0.4}],
        [{"index": 0}],
    ],
    ids=["out-of-range", "duplicate", "no-score"],
)
async def test_nonsense_from_the_provider_is_a_502(
    provider: RerankServer, results: list[dict[str, Any]]
) -> None:
    settings = make_settings(rerank_api_base=provider.base_url)
    provider.behaviour["results"] = results

    with pytest.raises(BadGateway, match=r"cohere/rerank-english-v3\.0"):
        await rerank(settings, QUERY, DOCS[:2], top_n=2)


async def test_an_unreachable_provider_is_a_502(provider: RerankServer) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(rerank_api_base=f"http://127.0.0.1:{port}")

    with pytest.raises(BadGateway) as caught:
        await rerank(settings, QUERY, DOCS, top_n=2)

    assert caught.value.message.startswith(
        "Could not reach the rerank provider (cohere/rerank-english-v3.0)"
    )


async def test_a_slow_provider_is_a_504_after_the_time_out(provider: RerankServer) -> None:
    settings = make_settings(rerank_api_base=provider.base_url, rerank_timeout_seconds=0.3)
    provider.behaviour["hold"] = threading.Event()  # never answers until the test ends

    with pytest.raises(GatewayTimeout) as caught:
        await rerank(settings, QUERY, DOCS, top_n=2)

    err = caught.value
    assert err.status_code == 504
    assert "cohere/rerank-english-v3.0" in err.message
    assert "0.3 s" in err.message
    assert len(provider.requests) == 1


async def test_reranking_when_not_configured_is_a_clear_400(provider: RerankServer) -> None:
    settings = make_settings(rerank_model="")
    assert not is_configured(settings)

    with pytest.raises(RerankNotConfigured) as caught:
        await rerank(settings, QUERY, DOCS, top_n=2)
    with pytest.raises(RerankNotConfigured):
        check_rerank(settings, 10)

    err = caught.value
    assert err.status_code == 400
    assert err.name == "RerankNotConfigured"
    assert "ATRIUM_RERANK_MODEL" in err.message
    assert "without rerank" in err.message
    assert provider.requests == []


async def test_more_candidates_than_allowed_are_refused(provider: RerankServer) -> None:
    settings = make_settings(rerank_api_base=provider.base_url, rerank_max_candidates=3)
    check_rerank(settings, 3)

    with pytest.raises(Unprocessable, match="limited to 3"):
        check_rerank(settings, 4)
    with pytest.raises(Unprocessable, match="limited to 3"):
        await rerank(settings, QUERY, DOCS, top_n=2)
    assert provider.requests == []


async def test_no_documents_calls_no_provider(provider: RerankServer) -> None:
    settings = make_settings(rerank_api_base=provider.base_url)

    out = await rerank(settings, QUERY, [], top_n=5)

    assert out.ranking == []
    assert out.elapsed_ms == 0
    assert provider.requests == []


def test_the_stand_in_scores_by_shared_query_words() -> None:
    assert score("Red apple", "a RED apple.") == 1.0
    assert score("red apple", "a red car") == 0.5
    assert score("", "anything") == 0.0
