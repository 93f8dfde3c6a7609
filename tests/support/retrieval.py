"""Search and answer test helpers: a small real corpus, tenants that own it, SSE parsing."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.factories import bearer, create_tenant, create_user

#: (title, text, metadata, collection) — one short document per topic, two collections.
CORPUS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "Eiffel Tower",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889 "
        "as the entrance arch to the World's Fair. Gustave Eiffel's company designed and "
        "built it.",
        {"lang": "en", "year": 1889, "tags": ["travel", "history"], "reviewed": True},
        "general",
    ),
    (
        "Photosynthesis",
        "Photosynthesis is the process by which green plants turn sunlight, water and carbon "
        "dioxide into glucose and oxygen. It takes place in the chloroplasts of leaf cells.",
        {"lang": "en", "year": 2021, "tags": ["biology"]},
        "general",
    ),
    (
        "API key rotation",
        "To rotate an API key, create a new key, deploy it to every client, then revoke the "
        "old key. Rotating keys regularly limits the damage of a leaked secret.",
        {"lang": "en", "year": 2024, "tags": ["security"], "reviewed": True},
        "general",
    ),
    (
        "Sourdough",
        "Sourdough bread rises because wild yeast and lactic acid bacteria ferment the dough. "
        "A starter is fed flour and water every day to keep it active.",
        {"lang": "en", "year": 2019, "tags": ["cooking"]},
        "general",
    ),
    (
        "Pacific Ocean",
        "The Pacific Ocean is the largest and deepest of the world's five oceans. The Mariana "
        "Trench, its deepest point, reaches about eleven kilometres below sea level.",
        {"lang": "en", "year": 2018, "tags": ["geography"]},
        "general",
    ),
    (
        "Kubernetes scheduling",
        "The Kubernetes scheduler assigns pods to nodes according to their CPU and memory "
        "requests. Taints and tolerations keep pods away from unsuitable nodes.",
        {"lang": "en", "year": 2023, "tags": ["software"]},
        "general",
    ),
    (
        "Zugspitze",
        "Die Zugspitze ist mit 2962 Metern der höchste Berg Deutschlands. Sie liegt im "
        "Wettersteingebirge an der Grenze zu Österreich.",
        {"lang": "de", "year": 2022, "tags": ["geography", "travel"]},
        "support",
    ),
    (
        "Widget XJ-9000 manual",
        "Error code E42 on the XJ-9000 means the filter cartridge must be replaced. Hold the "
        "reset button for five seconds after changing it.",
        {"lang": "en", "year": 2024, "tags": ["support"], "product": "XJ-9000"},
        "support",
    ),
]


@dataclass
class World:
    """A tenant with its owner, collections and documents."""

    tenant_id: uuid.UUID
    headers: dict[str, str]
    collections: dict[str, uuid.UUID] = field(default_factory=dict)
    documents: dict[str, uuid.UUID] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"/v1/tenants/{self.tenant_id}/{path}"


async def make_tenant(app: Any, client: httpx.AsyncClient | None = None) -> World:
    """A tenant created through the API (so it has its vector partition) and its owner."""
    user = await create_user(app)
    headers = await bearer(user)
    if client is None:
        tenant = await create_tenant(app, user)
        from atrium.kit.vectordb import ensure_tenant_partition

        async with app.state.vector_pool.connection() as conn:
            await ensure_tenant_partition(conn, tenant.id)
        return World(tenant_id=tenant.id, headers=headers)
    r = await client.post(
        "/v1/tenants", json={"name": f"T {uuid.uuid4().hex[:6]}"}, headers=headers
    )
    assert r.status_code == 201, r.text
    return World(tenant_id=uuid.UUID(r.json()["id"]), headers=headers)


async def create_collection(client: httpx.AsyncClient, world: World, name: str) -> uuid.UUID:
    """Create a collection through the API."""
    r = await client.post(world.url("collections"), json={"name": name}, headers=world.headers)
    assert r.status_code == 201, r.text
    cid = uuid.UUID(r.json()["id"])
    world.collections[name] = cid
    return cid


async def upload(
    client: httpx.AsyncClient,
    world: World,
    collection: str,
    title: str,
    text: str,
    metadata: dict[str, Any],
) -> uuid.UUID:
    """Upload a text document (JSON) through the API; returns its id (processing is queued)."""
    r = await client.post(
        world.url(f"collections/{world.collections[collection]}/documents"),
        json={"title": title, "text": text, "metadata": metadata},
        headers=world.headers,
    )
    assert r.status_code == 202, r.text
    doc_id = uuid.UUID(r.json()["documents"][0]["id"])
    world.documents[title] = doc_id
    return doc_id


async def wait_ready(
    client: httpx.AsyncClient, world: World, collection: str, document_id: uuid.UUID
) -> dict[str, Any]:
    """Poll the document until the worker has processed it."""
    url = world.url(f"collections/{world.collections[collection]}/documents/{document_id}")
    deadline = time.monotonic() + 120
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(url, headers=world.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] == "ready":
            return body
        assert body["status"] != "failed", body
        await asyncio.sleep(0.1)
    raise AssertionError(f"document {document_id} was not processed: {body}")


async def seed_corpus(
    client: httpx.AsyncClient,
    world: World,
    corpus: list[tuple[str, str, dict[str, Any], str]] = CORPUS,
) -> World:
    """Create the collections, upload every document of ``corpus`` and wait until all are
    processed by the Celery worker (real extraction, chunking, embedding and COPY)."""
    for _, _, _, coll in corpus:
        if coll not in world.collections:
            await create_collection(client, world, coll)
    pending = [
        (coll, await upload(client, world, coll, title, text, metadata))
        for title, text, metadata, coll in corpus
    ]
    for coll, doc_id in pending:
        await wait_ready(client, world, coll, doc_id)
    return world


async def usage(client: httpx.AsyncClient, world: World) -> dict[str, int]:
    """Used amounts of the monthly metrics, from the billing API."""
    r = await client.get(world.url("usage"), headers=world.headers)
    assert r.status_code == 200, r.text
    return {m["metric"]: m["used"] for m in r.json()["metrics"]}


@dataclass
class Event:
    """One Server-Sent Event."""

    event: str
    data: Any


def parse_sse(text: str) -> list[Event]:
    """The events of an SSE body (comments and pings skipped)."""
    events: list[Event] = []
    for block in re.split(r"\r?\n\r?\n", text):
        name, data = "message", []
        for line in re.split(r"\r?\n", block):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append(Event(name, json.loads("\n".join(data))))
    return events
