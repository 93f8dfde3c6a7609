"""Lexical (BM25) search through HTTP: partial matches, IDF, statistics, collection languages."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from tests.support.rerank_server import RerankServer
from tests.support.retrieval import (
    World,
    create_collection,
    make_tenant,
    seed_corpus,
    upload,
    wait_ready,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _search(client: httpx.AsyncClient, world: World, **body: Any) -> dict[str, Any]:
    r = await client.post(
        world.url("search"),
        json=body,
        headers={**world.headers, "Cache-Control": "no-cache"},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _titles(body: dict[str, Any]) -> list[str]:
    return [r["title"] for r in body["results"]]


async def _statistics(app: Any, tenant_id: uuid.UUID) -> tuple[dict[str, int], tuple[int, int]]:
    """The tenant's lexicon and totals as kept, and as recounted from its chunks.

    All four reads see one snapshot (REPEATABLE READ): under READ COMMITTED each statement
    sees its own, and a deletion committing between reading the totals and recounting them
    made correct statistics look one chunk off.
    """
    async with app.state.vector_pool.connection() as conn:
        # psycopg opens the transaction; its first statement may still set the level.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = await conn.execute(
            "SELECT lexeme, df FROM lexicon WHERE tenant_id = %s AND df <> 0", (tenant_id,)
        )
        kept = dict(await cur.fetchall())
        cur = await conn.execute(
            "SELECT u.lexeme, count(*) FROM chunks c, unnest(c.tsv) u"
            " WHERE c.tenant_id = %s GROUP BY u.lexeme",
            (tenant_id,),
        )
        counted = dict(await cur.fetchall())
        assert kept == counted
        cur = await conn.execute(
            "SELECT chunks, total_len FROM text_stats WHERE tenant_id = %s", (tenant_id,)
        )
        stats = await cur.fetchone()
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(tsv_len), 0) FROM chunks WHERE tenant_id = %s",
            (tenant_id,),
        )
        recount = await cur.fetchone()
        await conn.rollback()
    assert stats is not None and recount is not None
    assert (int(stats[0]), int(stats[1])) == (int(recount[0]), int(recount[1]))
    return kept, (int(stats[0]), int(stats[1]))


@pytest.fixture
async def world(client: httpx.AsyncClient, app: Any, celery_worker: Any) -> World:
    """A tenant whose corpus went through upload, the Celery worker and the vector store."""
    return await seed_corpus(client, await make_tenant(app, client))


async def test_lexical_search_ranks_by_bm25(
    client: httpx.AsyncClient, app: Any, world: World
) -> None:
    # Most words of the question are in the Eiffel Tower chunk, but not all ("famous",
    # "engineer", "build" are not): every term may match, so it is found, and first.
    question = "Which famous engineer's company designed the lattice tower in Paris?"
    body = await _search(client, world, query=question, mode="lexical", top_k=3)
    assert body["mode"] == "lexical"
    first = body["results"][0]
    assert first["title"] == "Eiffel Tower"
    assert first["vector_score"] is None
    assert first["text_score"] > 0
    assert 0 < first["score"] < 1
    assert body["timings"]["embedding_ms"] == 0
    # Rare terms weigh more: "water" is in two documents, "Kubernetes" in one.
    body = await _search(client, world, query="water Kubernetes", mode="lexical", top_k=5)
    assert _titles(body)[0] == "Kubernetes scheduling"
    assert {"Photosynthesis", "Sourdough"} <= set(_titles(body))
    # Words that no chunk holds find nothing; stop words alone are no query.
    assert (await _search(client, world, query="zeppelin quasar", mode="lexical"))["results"] == []
    assert (await _search(client, world, query="the and of", mode="lexical"))["results"] == []
    # An excluded word ("-word") must not be in any result; quotes do not require a phrase
    # (pasted text quotes freely): their words are scored like the others.
    body = await _search(client, world, query='"filter cartridge" -kubernetes', mode="lexical")
    assert _titles(body) == ["Widget XJ-9000 manual"]
    body = await _search(client, world, query="cartridge -filter", mode="lexical")
    assert body["results"] == []
    body = await _search(client, world, query="tower -Paris -the", mode="lexical")
    assert body["results"] == []
    body = await _search(
        client, world, query='Gustave Eiffel "designed and built" "no such words"', mode="lexical"
    )
    assert _titles(body)[0] == "Eiffel Tower"
    # Whatever the text, the SQL built from its words holds: quotes, backslashes, tsquery
    # operators, only stop words or only punctuation are words or nothing, never a 500.
    for nasty in (
        "\\' \"'\\\\",
        "tower & | ! <-> : * ( )",
        "'tower':* | !paris",
        "-- ; DROP TABLE chunks; --",
        "-" * 50,
        "ünïcödé ЭЙФЕЛЬ 埃菲尔铁塔 🗼",
        " ".join(f"w{i}" for i in range(300)),
    ):
        for mode in ("lexical", "hybrid"):
            await _search(client, world, query=nasty, mode=mode)
    # Hybrid fuses the BM25 ranking with the vector one.
    body = await _search(client, world, query=question, mode="hybrid", top_k=3)
    assert _titles(body)[0] == "Eiffel Tower"
    assert body["results"][0]["text_score"] > 0 and body["results"][0]["vector_score"] > 0
    # min_score applies to the 0-1 lexical score.
    body = await _search(client, world, query=question, mode="lexical", min_score=0.99)
    assert body["results"] == []
    # Filters and collections restrict lexical search too.
    body = await _search(
        client,
        world,
        query="Zugspitze XJ-9000 tower",
        mode="lexical",
        filters={"lang": "de"},
        collection_ids=[str(world.collections["support"])],
    )
    assert _titles(body) == ["Zugspitze"]

    # The statistics (IDF, mean length) follow every write: upload, re-index, delete.
    kept, (chunks, _) = await _statistics(app, world.tenant_id)
    assert kept["tower"] == 1 and chunks == len(world.documents)
    doc = await upload(
        client,
        world,
        "general",
        "CN Tower",
        "The CN Tower in Toronto is a concrete communications tower, 553 metres tall.",
        {"lang": "en"},
    )
    await wait_ready(client, world, "general", doc)
    kept, (chunks, _) = await _statistics(app, world.tenant_id)
    assert kept["tower"] == 2 and chunks == len(world.documents)
    coll = world.collections["general"]
    r = await client.post(
        world.url(f"collections/{coll}/documents/{doc}/reindex"), headers=world.headers
    )
    assert r.status_code == 202, r.text
    await wait_ready(client, world, "general", doc)
    kept, (chunks, _) = await _statistics(app, world.tenant_id)
    assert kept["tower"] == 2 and chunks == len(world.documents)
    r = await client.delete(world.url(f"collections/{coll}/documents/{doc}"), headers=world.headers)
    assert r.status_code == 202, r.text
    for _ in range(200):
        kept, (chunks, _) = await _statistics(app, world.tenant_id)
        if kept.get("tower") == 1:
            break
        await asyncio.sleep(0.05)
    assert kept["tower"] == 1 and chunks == len(world.documents) - 1
    # Deleting a collection takes its chunks out of the statistics as well.
    r = await client.delete(world.url(f"collections/{coll}"), headers=world.headers)
    assert r.status_code == 202, r.text
    for _ in range(200):
        kept, (chunks, _) = await _statistics(app, world.tenant_id)
        if chunks == 2:
            break
        await asyncio.sleep(0.05)
    assert chunks == 2 and "tower" not in kept


async def test_each_collection_is_stemmed_in_its_language(
    client: httpx.AsyncClient, app: Any, celery_worker: Any
) -> None:
    world = await make_tenant(app, client)
    r = await client.post(
        world.url("collections"), json={"name": "de", "language": "German"}, headers=world.headers
    )
    assert r.status_code == 201, r.text
    assert r.json()["language"] == "german"
    world.collections["de"] = uuid.UUID(r.json()["id"])
    await create_collection(client, world, "en")
    text = "Die Zugspitze ist der höchste Berg Deutschlands, an der Grenze zu Österreich."
    docs = [
        ("de", await upload(client, world, "de", "Zugspitze", text, {})),
        ("en", await upload(client, world, "en", "Zugspitze (en)", text, {})),
    ]
    for coll, doc in docs:
        await wait_ready(client, world, coll, doc)
    # German stemming: "höchsten Bergen" matches "höchste Berg" only where the text was
    # stemmed as German; in the English collection the words stay apart.
    body = await _search(client, world, query="höchsten Bergen", mode="lexical")
    assert _titles(body) == ["Zugspitze"]
    # A search over both collections analyses the query in each language.
    body = await _search(client, world, query="Grenze Österreich", mode="lexical")
    assert sorted(_titles(body)) == ["Zugspitze", "Zugspitze (en)"]
    # The language is validated, and fixed once the collection exists.
    coll_url = world.url(f"collections/{world.collections['de']}")
    r = await client.patch(coll_url, json={"language": "english"}, headers=world.headers)
    assert r.status_code == 409, r.text
    assert "fixed at creation" in r.json()["detail"]
    r = await client.patch(
        coll_url, json={"language": "german", "description": "d"}, headers=world.headers
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        world.url("collections"), json={"name": "x", "language": "klingon"}, headers=world.headers
    )
    assert r.status_code == 422
    assert "unknown language 'klingon'" in r.text and "simple" in r.text


@pytest.fixture
def reranker(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Cohere-shaped rerank provider on loopback, configured as the server's rerank model."""
    server = RerankServer()
    server.start()
    monkeypatch.setattr(settings, "rerank_model", "cohere/rerank-english-v3.0")
    monkeypatch.setattr(settings, "rerank_api_base", server.base_url + "/v1/rerank")
    monkeypatch.setattr(settings, "rerank_api_key", type(settings.rerank_api_key)("rk-test"))
    yield server
    server.stop()


async def test_reranking_reorders_the_candidates(
    client: httpx.AsyncClient, settings: Any, world: World, reranker: Any, monkeypatch: Any
) -> None:
    # The loopback model scores the share of the query's words a chunk holds: the Eiffel Tower
    # chunk holds every word of this query, though vector search ranks others first.
    query = "tower paris company designed"
    body = await _search(client, world, query=query, mode="vector", top_k=2)
    assert "Eiffel Tower" in _titles(await _search(client, world, query=query, top_k=8))
    body = await _search(
        client, world, query=query, mode="vector", top_k=2, rerank=True, rerank_top_n=8
    )
    assert _titles(body)[0] == "Eiffel Tower" and len(body["results"]) == 2
    first = body["results"][0]
    assert first["rerank_score"] == first["score"] == 1.0
    assert body["timings"]["rerank_ms"] > 0
    sent = reranker.requests[-1]["body"]
    assert sent["query"] == query and len(sent["documents"]) == 8 and sent["top_n"] == 2
    # Answers cite from the reranked list.
    r = await client.post(
        world.url("answer"),
        json={"query": query, "top_k": 1, "rerank": True, "mode": "lexical"},
        headers=world.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["sources"][0]["title"] == "Eiffel Tower"
    # A failing provider is a 502 that names the model.
    reranker.behaviour["status"] = 500
    r = await client.post(
        world.url("search"), json={"query": query, "rerank": True}, headers=world.headers
    )
    assert r.status_code == 502, r.text
    assert "cohere/rerank-english-v3.0" in r.json()["detail"]
    reranker.behaviour.clear()
    # Too many candidates: 422; no rerank model: 400 with what to do.
    monkeypatch.setattr(settings, "rerank_max_candidates", 10)
    r = await client.post(
        world.url("search"),
        json={"query": query, "rerank": True, "rerank_top_n": 11},
        headers=world.headers,
    )
    assert r.status_code == 422, r.text
    monkeypatch.setattr(settings, "rerank_model", "")
    r = await client.post(
        world.url("search"), json={"query": query, "rerank": True}, headers=world.headers
    )
    assert r.status_code == 400, r.text
    assert "ATRIUM_RERANK_MODEL" in r.json()["detail"]
