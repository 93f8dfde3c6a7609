"""Search through HTTP against the real services: ranking, filters, hybrid, scoping, cache."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from atrium.auth.permissions import Scope
from tests.support.apikeys import create_api_key, key_header
from tests.support.factories import bearer, create_user
from tests.support.quota import set_plan
from tests.support.retrieval import (
    World,
    create_collection,
    make_tenant,
    seed_corpus,
    upload,
    usage,
    wait_ready,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _search(client: httpx.AsyncClient, world: World, **body: Any) -> dict[str, Any]:
    headers = {**world.headers, **body.pop("headers", {})}
    r = await client.post(world.url("search"), json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _titles(body: dict[str, Any]) -> list[str]:
    return [r["title"] for r in body["results"]]


@pytest.fixture
async def world(client: httpx.AsyncClient, app: Any, celery_worker: Any) -> World:
    """A tenant whose corpus went through upload, the Celery worker and the vector store."""
    return await seed_corpus(client, await make_tenant(app, client))


async def test_vector_search_ranks_by_meaning(client: httpx.AsyncClient, world: World) -> None:
    query = "How do plants make food from light?"
    assert (await _search(client, world, query=query, top_k=1))["mode"] == "hybrid"  # default
    body = await _search(client, world, query=query, top_k=3, mode="vector")
    assert body["mode"] == "vector"
    assert body["cache_hit"] is False
    first = body["results"][0]
    assert first["title"] == "Photosynthesis"
    assert first["document_id"] == str(world.documents["Photosynthesis"])
    assert first["collection_id"] == str(world.collections["general"])
    assert "chloroplasts" in first["text"]
    assert first["metadata"] == {"lang": "en", "year": 2021, "tags": ["biology"]}
    assert 0 < first["score"] <= 1
    assert first["score"] == first["vector_score"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert len(body["results"]) == 3
    timings = body["timings"]
    for stage in ("embedding_ms", "search_ms", "fusion_ms", "cache_ms", "total_ms"):
        assert timings[stage] >= 0
    assert timings["search_ms"] > 0
    assert timings["total_ms"] >= timings["search_ms"]


async def test_top_k_and_min_score(client: httpx.AsyncClient, world: World) -> None:
    body = await _search(client, world, query="tallest mountain in Germany", top_k=1)
    assert _titles(body) == ["Zugspitze"]
    everything = await _search(client, world, query="tallest mountain in Germany", top_k=100)
    assert len(everything["results"]) == len(world.documents)
    cut = everything["results"][2]["score"]
    body = await _search(
        client, world, query="tallest mountain in Germany", top_k=100, min_score=cut
    )
    assert len(body["results"]) == 3
    assert all(r["score"] >= cut for r in body["results"])
    for bad in ({"top_k": 0}, {"top_k": 101}, {"min_score": 2}, {"query": "   "}, {"mode": "x"}):
        r = await client.post(
            world.url("search"), json={"query": "q", **bad}, headers=world.headers
        )
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"] == "ValidationError"


async def test_collections_restrict_and_unknown_ones_are_404(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    support = world.collections["support"]
    body = await _search(
        client, world, query="famous tower in Paris", collection_ids=[str(support)], top_k=10
    )
    assert set(_titles(body)) == {"Zugspitze", "Widget XJ-9000 manual"}
    missing = uuid.uuid4()
    r = await client.post(
        world.url("search"),
        json={"query": "q", "collection_ids": [str(support), str(missing)]},
        headers=world.headers,
    )
    assert r.status_code == 404
    assert r.json()["detail"]["collection_ids"] == [str(missing)]


async def test_metadata_filters(client: httpx.AsyncClient, world: World) -> None:
    q = "places and things"

    async def titles(filters: dict[str, Any]) -> set[str]:
        return set(_titles(await _search(client, world, query=q, top_k=100, filters=filters)))

    assert await titles({"lang": "de"}) == {"Zugspitze"}
    assert await titles({"lang": {"$eq": "de"}}) == {"Zugspitze"}
    # Equality on a list field matches documents whose list contains the value.
    assert await titles({"tags": "travel"}) == {"Eiffel Tower", "Zugspitze"}
    assert await titles({"tags": {"$in": ["cooking", "software"]}}) == {
        "Sourdough",
        "Kubernetes scheduling",
    }
    assert await titles({"year": {"$gte": 2022, "$lt": 2024}}) == {
        "Zugspitze",
        "Kubernetes scheduling",
    }
    assert await titles({"year": {"$lte": 1889}}) == {"Eiffel Tower"}
    assert await titles({"reviewed": {"$exists": True}}) == {"Eiffel Tower", "API key rotation"}
    assert len(await titles({"reviewed": {"$exists": False}})) == len(world.documents) - 2
    assert await titles({"product": "XJ-9000", "year": 2024}) == {"Widget XJ-9000 manual"}
    assert await titles({"lang": "en", "tags": "geography"}) == {"Pacific Ocean"}
    assert await titles({"lang": "fr"}) == set()
    # Strings compare as strings, numbers as numbers: never across types.
    assert await titles({"year": {"$gte": "2000"}}) == set()
    assert await titles({"lang": {"$gt": "d", "$lt": "e"}}) == {"Zugspitze"}
    # The title is searchable metadata too.
    assert await titles({"title": "Sourdough"}) == {"Sourdough"}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"year": {"$gte": True}}, "filters.year.$gte"),
        ({"year": {"$between": [1, 2]}}, "filters.year.$between: unknown operator"),
        ({"tags": {"$in": []}}, "filters.tags.$in"),
        ({"tags": {"$in": "travel"}}, "filters.tags.$in"),
        ({"tags": ["a", "b"]}, "filters.tags: a list is not a value here"),
        ({"reviewed": {"$exists": "yes"}}, "filters.reviewed.$exists: expected true or false"),
        ({"$or": [{"a": 1}]}, "filters.$or: operators go inside"),
        ({"lang": {}}, "filters.lang: empty object"),
        ({"lang": {"$eq": "en", "$in": ["de"]}}, "filters.lang: $eq cannot be combined"),
        ({"lang": {"nested": 1}}, "filters.lang.nested: unknown operator"),
    ],
)
async def test_bad_filters_get_422_naming_the_part(
    client: httpx.AsyncClient, app: Any, filters: dict[str, Any], expected: str
) -> None:
    w = await make_tenant(app, client)
    r = await client.post(
        w.url("search"), json={"query": "q", "filters": filters}, headers=w.headers
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "ValidationError"
    assert body["detail"][0]["loc"] == ["body", "filters"]
    assert expected in body["detail"][0]["msg"], body


async def test_hybrid_search_fuses_full_text_rank(client: httpx.AsyncClient, world: World) -> None:
    query = "What does E42 mean?"
    hybrid = await _search(client, world, query=query, mode="hybrid", top_k=3)
    assert hybrid["mode"] == "hybrid"
    first = hybrid["results"][0]
    assert first["title"] == "Widget XJ-9000 manual"
    assert first["text_score"] is not None and first["text_score"] > 0
    assert 0 < first["score"] <= 1
    assert first["vector_score"] < 1
    others = hybrid["results"][1:]
    assert all(r["text_score"] is None for r in others)
    assert hybrid["timings"]["fusion_ms"] >= 0
    # An excluded word ("-word") keeps its chunks out of the BM25 ranking.
    body = await _search(
        client, world, query='"filter cartridge" -kubernetes', mode="hybrid", top_k=1
    )
    assert _titles(body) == ["Widget XJ-9000 manual"]
    # Filters and collections apply to both rankings.
    body = await _search(
        client,
        world,
        query=query,
        mode="hybrid",
        top_k=10,
        filters={"lang": "de"},
        collection_ids=[str(world.collections["support"])],
    )
    assert _titles(body) == ["Zugspitze"]


async def test_search_never_returns_another_tenants_chunks(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    other = await seed_corpus(client, await make_tenant(app, client))
    mine = {str(d) for d in world.documents.values()}
    theirs = {str(d) for d in other.documents.values()}
    attempts: list[dict[str, Any]] = [
        {},
        {"filters": {"lang": "en"}},
        {"filters": {"reviewed": {"$exists": False}}},
        {"filters": {"tenant_id": str(other.tenant_id)}},
        {"filters": {"year": {"$gte": -1e300}}},
        {"mode": "hybrid"},
        {"mode": "hybrid", "filters": {"tags": {"$in": ["travel", "support", "biology"]}}},
        {"mode": "lexical"},
        {"mode": "lexical", "filters": {"tenant_id": str(other.tenant_id)}},
    ]
    for extra in attempts:
        body = await _search(client, world, query="Eiffel Tower E42 sourdough", top_k=100, **extra)
        found = {r["document_id"] for r in body["results"]}
        assert found or "tenant_id" in extra.get("filters", {}), extra
        assert found <= mine, extra
        assert not found & theirs, extra
    # Naming the other tenant's collections is the same as naming none that exist.
    r = await client.post(
        world.url("search"),
        json={"query": "q", "collection_ids": [str(c) for c in other.collections.values()]},
        headers=world.headers,
    )
    assert r.status_code == 404
    # Calling the other tenant's path with my token is a 404, as with my API key.
    r = await client.post(other.url("search"), json={"query": "q"}, headers=world.headers)
    assert r.status_code == 404


async def test_api_keys_need_the_search_scope(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    from tests.support.factories import create_tenant

    class _T:
        id = world.tenant_id

    _, secret = await create_api_key(app, _T(), [Scope.search.value])  # type: ignore[arg-type]
    r = await client.post(
        world.url("search"), json={"query": "Paris tower", "top_k": 1}, headers=key_header(secret)
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["title"] == "Eiffel Tower"
    r = await client.post(
        world.url("answer"), json={"query": "Paris tower"}, headers=key_header(secret)
    )
    assert r.status_code == 403
    assert r.json()["detail"]["missing_permission"] == "answer"
    _, docs_only = await create_api_key(app, _T(), [Scope.documents_read.value])  # type: ignore[arg-type]
    r = await client.post(world.url("search"), json={"query": "q"}, headers=key_header(docs_only))
    assert r.status_code == 403
    stranger = await create_tenant(app)
    _, foreign = await create_api_key(app, stranger, [Scope.search.value])
    # Another tenant's valid key authenticates (not 401), but it may not even learn that this
    # tenant exists: the same 404 as for a tenant that does not (the authorization matrix).
    r = await client.post(world.url("search"), json={"query": "q"}, headers=key_header(foreign))
    assert r.status_code == 404, r.text
    nowhere = await client.post(
        f"/v1/tenants/{uuid.uuid4()}/search", json={"query": "q"}, headers=key_header(foreign)
    )
    assert nowhere.status_code == 404 and r.json() == nowhere.json()
    r = await client.post(world.url("search"), json={"query": "q"})
    assert r.status_code == 401


async def test_cache_hits_and_no_stale_result_after_a_write(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    query = {"query": "volcano eruption on Iceland", "top_k": 3}
    first = await _search(client, world, **query)
    assert first["cache_hit"] is False
    second = await _search(client, world, **query)
    assert second["cache_hit"] is True
    assert second["results"] == first["results"]
    # The same request written differently is the same cache entry.
    again = await _search(client, world, query="  volcano   eruption on Iceland ", top_k=3)
    assert again["cache_hit"] is True
    # Bypass on request.
    bypass = await _search(client, world, **query, headers={"Cache-Control": "no-cache"})
    assert bypass["cache_hit"] is False
    # A write to a collection searched: the next search sees it, at once.
    doc = await upload(
        client,
        world,
        "general",
        "Eyjafjallajökull",
        "The 2010 eruption of the Eyjafjallajökull volcano in Iceland closed European airspace "
        "for days.",
        {"lang": "en"},
    )
    await wait_ready(client, world, "general", doc)
    after = await _search(client, world, **query)
    assert after["cache_hit"] is False
    assert after["results"][0]["title"] == "Eyjafjallajökull"
    assert (await _search(client, world, **query))["cache_hit"] is True
    # A deletion too: from the moment it is accepted, before the worker removed the chunks.
    r = await client.delete(
        world.url(f"collections/{world.collections['general']}/documents/{doc}"),
        headers=world.headers,
    )
    assert r.status_code == 202, r.text
    gone = await _search(client, world, **query)
    assert gone["cache_hit"] is False
    assert "Eyjafjallajökull" not in _titles(gone)
    # Deleting a collection hides all of its documents at once as well.
    r = await client.delete(
        world.url(f"collections/{world.collections['general']}"), headers=world.headers
    )
    assert r.status_code == 202, r.text
    left = await _search(client, world, **{**query, "top_k": 100})
    assert set(_titles(left)) == {"Zugspitze", "Widget XJ-9000 manual"}
    r = await client.post(
        world.url("search"),
        json={**query, "collection_ids": [str(world.collections["general"])]},
        headers=world.headers,
    )
    assert r.status_code == 404


async def test_a_new_collection_is_searched_at_once(
    client: httpx.AsyncClient, world: World
) -> None:
    # Search processes keep the tenant's collection list in memory: creating a collection
    # must reach it (and the result cache) before the next search, not some time later.
    query = {"query": "sourdough bread baking with rye flour", "top_k": 3}
    assert (await _search(client, world, **query))["cache_hit"] is False
    assert (await _search(client, world, **query))["cache_hit"] is True
    await create_collection(client, world, "recipes")
    doc = await upload(
        client,
        world,
        "recipes",
        "Rye sourdough",
        "Rye sourdough bread needs a ripe starter, rye flour, water and salt; bake it slowly.",
        {},
    )
    await wait_ready(client, world, "recipes", doc)
    body = await _search(client, world, **query)
    assert body["cache_hit"] is False
    assert body["results"][0]["title"] == "Rye sourdough"
    assert body["results"][0]["collection_id"] == str(world.collections["recipes"])


async def test_searches_are_metered(client: httpx.AsyncClient, world: World) -> None:
    before = (await usage(client, world)).get("searches", 0)
    for _ in range(3):
        await _search(client, world, query="Paris")
    assert (await usage(client, world))["searches"] == before + 3
    r = await client.post(
        world.url("search"), json={"query": "q", "top_k": 0}, headers=world.headers
    )
    assert r.status_code == 422
    assert (await usage(client, world))["searches"] == before + 3


async def test_tenant_without_documents_finds_nothing(client: httpx.AsyncClient, app: Any) -> None:
    w = await make_tenant(app, client)
    body = await _search(client, w, query="anything at all")
    assert body["results"] == []
    body = await _search(client, w, query="anything at all", mode="hybrid")
    assert body["results"] == []
    # A tenant whose vector partition does not exist (yet) has no results either, through
    # both the single-statement and the pipelined (larger top_k) paths.
    bare = await make_tenant(app)
    from atrium.kit.vectordb import drop_tenant_partition

    async with app.state.vector_pool.connection() as conn:
        await drop_tenant_partition(conn, bare.tenant_id)
    r = await client.post(bare.url("collections"), json={"name": "docs"}, headers=bare.headers)
    assert r.status_code == 201, r.text
    for extra in ({}, {"top_k": 50}, {"mode": "hybrid"}):
        assert (await _search(client, bare, query="anything", **extra))["results"] == []
    # The pooled connections are still usable afterwards.
    assert (await _search(client, w, query="anything at all", top_k=50))["results"] == []


async def test_searches_and_answers_beyond_the_plan_get_402(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    from tests.support.factories import bearer, create_user

    admin = await bearer(await create_user(app, superuser=True))
    r = await client.put(
        f"/v1/admin/tenants/{world.tenant_id}/plan",
        json={"plan": "free", "overrides": {"searches_per_month": 2, "answers_per_month": 0}},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    used = (await usage(client, world)).get("searches", 0)
    for _ in range(2 - used):
        await _search(client, world, query="Paris")
    r = await client.post(world.url("search"), json={"query": "Paris"}, headers=world.headers)
    assert r.status_code == 402, r.text
    assert r.json()["detail"]["metric"] == "searches"
    r = await client.post(world.url("answer"), json={"query": "Paris"}, headers=world.headers)
    assert r.status_code == 402, r.text
    assert r.json()["detail"]["metric"] == "answers"
    assert (await usage(client, world))["searches"] == 2


async def test_the_rate_limit_is_counted_with_the_quota_hold(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    """Search and answer count the key's rate limit in their hold's Redis script: a request
    over the limit is refused with 429 and holds nothing; one the plan refuses (402) still
    counts against the limit and reports it, as when the limit ran on its own before."""

    class _T:
        id = world.tenant_id

    scopes = [Scope.search.value, Scope.answer.value]
    _, secret = await create_api_key(app, _T(), scopes, rate_limit_per_minute=4)  # type: ignore[arg-type]
    key = key_header(secret)
    before = await usage(client, world)
    remaining = []
    for path in ("search", "answer"):
        r = await client.post(world.url(path), json={"query": "Paris"}, headers=key)
        assert r.status_code == 200, r.text
        assert r.headers["X-RateLimit-Limit"] == "4"
        remaining.append(r.headers["X-RateLimit-Remaining"])
    assert remaining == ["3", "2"]
    admin = await bearer(await create_user(app, superuser=True))
    searches = before.get("searches", 0) + 1
    await set_plan(client, admin, world.tenant_id, "free", {"searches_per_month": searches})
    r = await client.post(world.url("search"), json={"query": "Paris"}, headers=key)
    assert r.status_code == 402, r.text
    assert r.headers["X-RateLimit-Remaining"] == "1"
    await set_plan(client, admin, world.tenant_id, "free", {"searches_per_month": None})
    r = await client.post(world.url("search"), json={"query": "Paris"}, headers=key)
    assert r.status_code == 200, r.text
    assert r.headers["X-RateLimit-Remaining"] == "0"
    for path in ("search", "answer"):
        r = await client.post(world.url(path), json={"query": "Paris"}, headers=key)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["detail"]["limit"] == 4
    after = await usage(client, world)
    # Two searches and one answer were done; the refused requests used and hold nothing.
    assert after["searches"] == searches + 1
    assert after["answers"] == before.get("answers", 0) + 1
    r = await client.get(world.url("usage"), headers=world.headers)
    assert all(m["reserved"] == 0 for m in r.json()["metrics"] if "reserved" in m), r.text
    # A key without the permission is counted before its 403, as on every tenant route.
    _, reader = await create_api_key(
        app, _T(), [Scope.documents_read.value], rate_limit_per_minute=1
    )  # type: ignore[arg-type]
    statuses = []
    for _ in range(2):
        r = await client.post(world.url("search"), json={"query": "q"}, headers=key_header(reader))
        statuses.append(r.status_code)
    assert statuses == [403, 429]


async def test_one_log_line_per_query_with_stage_timings(
    client: httpx.AsyncClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from structlog.testing import CapturingLogger

    from atrium.llm import service as answer_service
    from atrium.retrieval import service as search_service

    captured = CapturingLogger()
    monkeypatch.setattr(search_service, "log", captured)
    monkeypatch.setattr(answer_service, "log", captured)
    await _search(client, world, query="deep ocean trench", mode="hybrid")
    await _search(client, world, query="deep ocean trench", mode="hybrid")
    r = await client.post(world.url("answer"), json={"query": "deep ocean"}, headers=world.headers)
    assert r.status_code == 200
    lines = [c for c in captured.calls if c.args == ("query",)]
    assert len(lines) == 3
    first, second, third = (c.kwargs for c in lines)
    assert first["kind"] == "search" and first["cache_hit"] is False
    assert second["cache_hit"] is True
    for key in ("embedding_ms", "search_ms", "fusion_ms", "total_ms", "tenant_id", "mode"):
        assert key in first, key
    assert first["search_ms"] > 0
    assert third["kind"] == "answer" and third["answer_mode"] == "extractive"
    for key in ("llm_ms", "prompt_tokens", "completion_tokens", "embedding_ms", "cache_hit"):
        assert key in third, key


async def test_query_vector_cache_is_not_shared_between_tenants(
    client: httpx.AsyncClient, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atrium.embedding.query import query_embedder

    embedder = query_embedder(app.state.settings)
    embedded: list[list[str]] = []
    real_embed = embedder.embed

    def embed(texts: list[str]) -> Any:
        embedded.append(list(texts))
        return real_embed(texts)

    monkeypatch.setattr(embedder, "embed", embed)
    a, b = await make_tenant(app, client), await make_tenant(app, client)
    for w in (a, b):
        await create_collection(client, w, "docs")
    text = f"what did my competitor search {uuid.uuid4().hex}"

    first = await _search(client, a, query=text)
    assert embedded == [[text]] and first["cache_hit"] is False
    # Within tenant A the vector is reused (another top_k: not a result-cache hit).
    await _search(client, a, query=text, top_k=3)
    assert embedded == [[text]]
    # Tenant B's first search of the same text runs the model: nothing tells B that A
    # searched it (a shared vector would show as embedding_ms of a warm hit).
    theirs = await _search(client, b, query=text)
    assert embedded == [[text], [text]]
    assert theirs["cache_hit"] is False
