"""Atrium scaled out: two API replicas and two Celery workers behind the shipped nginx and Caddy
configurations (issue 18).

The replicas are gunicorn with ``deployment/gunicorn.conf.py``; the workers ``atrium worker``
with their own ``--hostname``; nginx runs ``deployment/nginx/atrium.conf.template`` rendered for
loopback (TLS with a throw-away certificate) and Caddy ``deployment/caddy/Caddyfile`` with its
placeholders set (plain HTTP). All of them share the session's MariaDB database, Redis dbs and
embedded PostgreSQL, and are started once for the module (tests/support/replicas.py).

Checks that need "through replica A, then replica B" address the replicas directly: a proxy
chooses the replica itself. Everything else goes through each proxy. The last test kills a
replica, so it must stay last.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from atrium.retrieval.cache import CARRY_SECONDS
from tests.support import services
from tests.support.apikeys import create_api_key, key_header
from tests.support.factories import DEFAULT_PASSWORD, create_tenant, create_user
from tests.support.llm_server import LLMServer
from tests.support.replicas import (
    DEPLOY,
    NGINX_TEMPLATE,
    ROOT,
    ApiReplica,
    CaddyProxy,
    NginxProxy,
    binary,
    self_signed_certificate,
    tail,
)
from tests.support.retrieval import Event, parse_sse

pytestmark = pytest.mark.xdist_group("replicas")

#: Each replica's "server" parameters, as the nginx template's header writes them.
SERVER_PARAMS = "max_fails=2 fail_timeout=10s"
#: Above both proxies' limits (nginx 210m = 220,200,960 bytes; Caddy 210,000,000).
OVER_PROXY_LIMIT = 230_000_000
#: Generous, for a loaded 2-core machine: only reached when something is broken.
DEADLINE = 60.0


@dataclass
class Cluster:
    """The replicas, workers and proxies of the module."""

    a: ApiReplica
    b: ApiReplica
    workers: list[services.WorkerProcess]
    nginx: NginxProxy
    caddy: CaddyProxy
    ca_file: Path

    def client(self, base_url: str) -> httpx.AsyncClient:
        """An HTTP client for one replica or proxy (trusting the test certificate)."""
        verify: ssl.SSLContext | bool = True
        if base_url.startswith("https:"):
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.AsyncClient(base_url=base_url, verify=verify, timeout=DEADLINE)

    def proxy_url(self, name: str) -> str:
        """The base URL of the proxy ``name`` (nginx or caddy)."""
        return self.nginx.url if name == "nginx" else self.caddy.url


def _wait_for_nodes(names: set[str], timeout: float = 90.0) -> None:
    """Wait until every Celery node in ``names`` answers a ping of its own."""
    from atrium.worker import celery_app

    deadline = time.monotonic() + timeout
    answered: set[str] = set()
    while time.monotonic() < deadline:
        replies = celery_app.control.ping(destination=sorted(names), timeout=1.0) or []
        answered = {node for reply in replies for node in reply}
        if names <= answered:
            return
    raise AssertionError(f"Celery workers {sorted(names - answered)} never answered a ping")


@pytest.fixture(scope="module")
def cluster(
    test_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two replicas, two workers, nginx and Caddy, started together (the slow part is each
    process importing Atrium, so they boot side by side)."""
    # Fail loudly, before anything starts, when a proxy is not installed.
    binary("nginx")
    binary("caddy")
    work = tmp_path_factory.mktemp("replicas")
    # The replicas answer generatively through the session's loopback LLM (as live_server).
    env = {
        **os.environ,
        "ATRIUM_LLM_MODEL": "openai/test-model",
        "ATRIUM_LLM_API_BASE": test_env["llm"].base_url,
        "ATRIUM_LLM_API_KEY": "sk-test",
    }
    a, b = ApiReplica("a", env, work), ApiReplica("b", env, work)
    workers = []
    nginx = caddy = None
    try:
        for replica in (a, b):
            replica.spawn()
        host = socket.gethostname()
        for name in ("worker1", "worker2"):
            metrics = work / f"{name}-metrics"
            metrics.mkdir()
            worker = services.WorkerProcess(
                {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
                work / f"{name}.log",
                # Distinct node names, as two workers on one host need (docs/scaling.md).
                argv=("--pool=solo", f"--hostname={name}@%h"),
            )
            workers.append(worker)
            # Returns at the first pong of any worker: the second boots while the replicas do.
            worker.start(timeout=DEADLINE * 2)
        for replica in (a, b):
            replica.wait_ready()
        _wait_for_nodes({f"worker1@{host}", f"worker2@{host}"})
        ca_file = self_signed_certificate(work / "tls")
        nginx = NginxProxy(work / "nginx", [a.port, b.port], work / "tls")
        nginx.write(SERVER_PARAMS)
        nginx.start()
        caddy = CaddyProxy(work / "caddy", [a.port, b.port])
        caddy.start()
        yield Cluster(a, b, workers, nginx, caddy, ca_file)
    finally:
        # Side by side: each waits for its process's graceful shutdown.
        stops = [p.stop for p in (nginx, caddy, a, b, *workers) if p is not None]
        with ThreadPoolExecutor(len(stops)) as pool:
            for done in [pool.submit(stop) for stop in stops]:
                done.result()


@dataclass
class World:
    """A tenant on the enterprise plan (no plan limit in the way), its owner, an API key with
    every scope, and a collection with one processed document."""

    tenant: Any
    owner_email: str
    key: str
    collection_id: str
    documents: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """The API key's Authorization header."""
        return key_header(self.key)

    def url(self, path: str) -> str:
        """A path under the tenant."""
        return f"/v1/tenants/{self.tenant.id}/{path}"


async def _tenant(app: Any, plan: str) -> tuple[Any, str]:
    """A tenant on ``plan`` with its vector partition, and its owner's address."""
    from atrium.kit.vectordb import ensure_tenant_partition
    from atrium.models import Tenant

    user = await create_user(app)
    tenant = await create_tenant(app, user)
    async with app.state.sessionmaker() as session:
        row = await session.get(Tenant, tenant.id)
        assert row is not None
        row.plan = plan
        await session.commit()
    async with app.state.vector_pool.connection() as conn:
        await ensure_tenant_partition(conn, tenant.id)
    return tenant, user.email


async def _collection(client: httpx.AsyncClient, world: World, name: str) -> str:
    r = await client.post(world.url("collections"), json={"name": name}, headers=world.headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _upload(
    client: httpx.AsyncClient, world: World, collection_id: str, title: str, text: str
) -> httpx.Response:
    return await client.post(
        world.url(f"collections/{collection_id}/documents"),
        json={"title": title, "text": text, "metadata": {}},
        headers=world.headers,
    )


async def _wait_ready(
    client: httpx.AsyncClient, world: World, collection_id: str, document_ids: list[str]
) -> None:
    """Poll until every document is ``ready`` (processed by one of the workers)."""
    pending = set(document_ids)
    deadline = time.monotonic() + DEADLINE * 2
    while pending and time.monotonic() < deadline:
        for doc_id in sorted(pending):
            r = await client.get(
                world.url(f"collections/{collection_id}/documents/{doc_id}"),
                headers=world.headers,
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] != "failed", r.text
            if r.json()["status"] == "ready":
                pending.discard(doc_id)
        if pending:
            await asyncio.sleep(0.2)
    assert not pending, f"never processed: {sorted(pending)}"


PHOTOSYNTHESIS = (
    "Photosynthesis is the process by which green plants turn sunlight, water and carbon "
    "dioxide into glucose and oxygen. It takes place in the chloroplasts of leaf cells."
)


@pytest.fixture(scope="module")
async def world(app: Any, cluster: Cluster, test_env: dict[str, Any]) -> AsyncIterator[World]:
    tenant, email = await _tenant(app, "enterprise")
    _, secret = await create_api_key(app, tenant)
    w = World(tenant=tenant, owner_email=email, key=secret, collection_id="")
    async with cluster.client(cluster.a.url) as a:
        w.collection_id = await _collection(a, w, "handbook")
        r = await _upload(a, w, w.collection_id, "Photosynthesis", PHOTOSYNTHESIS)
        assert r.status_code == 202, r.text
        w.documents["Photosynthesis"] = r.json()["documents"][0]["id"]
        await _wait_ready(a, w, w.collection_id, list(w.documents.values()))
    # Each replica loads litellm (seconds of CPU) on its first answer: both at once here, so
    # that the streaming tests time the proxies, not an import.
    async with cluster.client(cluster.a.url) as a, cluster.client(cluster.b.url) as b:
        for r in await asyncio.gather(
            *(
                c.post(w.url("answer"), json={"query": "warm up", "top_k": 1}, headers=w.headers)
                for c in (a, b)
            )
        ):
            assert r.status_code == 200, r.text
    yield w
    services.reset_state(test_env["mysql_db"], test_env["redis_db"])


@pytest.fixture(params=["nginx", "caddy"])
def proxy(request: pytest.FixtureRequest) -> str:
    """Which proxy a test goes through."""
    return str(request.param)


# --- The shipped files, checked by their own tools -------------------------------------------


def test_nginx_accepts_the_rendered_template(cluster: Cluster) -> None:
    """``nginx -t`` on the site the module runs, and the template's header says what the
    module renders (its envsubst names, and the server parameters)."""
    text = NGINX_TEMPLATE.read_text()
    assert f"server 10.0.0.11:8000 {SERVER_PARAMS};" in text
    r = subprocess.run(
        cluster.nginx.command("-t"), capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr
    rendered = cluster.nginx.site.read_text().splitlines()
    assert not [line for line in rendered if "${" in line and not line.startswith("#")]


def test_caddy_validates_the_shipped_caddyfile(cluster: Cluster, tmp_path: Path) -> None:
    """``caddy validate`` with the module's placeholders, and with none (the defaults an
    operator gets: api.example.com, one replica on 127.0.0.1:8000)."""
    r = cluster.caddy.validate()
    assert r.returncode == 0, r.stdout + r.stderr
    bare = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    r = cluster.caddy.validate(bare)
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of every unit, in a throw-away root.

    The units name /opt/atrium/.venv/bin/{gunicorn,atrium} (the layout they document) and
    system programs; the root holds this checkout's own entry points at those paths and the
    host's, so a unit naming a program that `uv sync` does not install fails. The root also
    holds the host's system units (sysinit.target...), which verify loads. Warnings (an unknown
    key, a bad value) make systemd-analyze print but still exit 0: any output fails the test.
    User=atrium and EnvironmentFile are not checked by verify (no such user or file here).
    """
    import re

    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copytree(
        "/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True
    )
    names = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        shutil.copy(unit, units / unit.name)
        names.append(unit.name)
        for program in re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", unit.read_text(), re.M):
            if program.startswith("/opt/atrium/"):
                source = ROOT / program.removeprefix("/opt/atrium/")
            else:
                # Debian is merged-/usr: /bin/kill is /usr/bin/kill.
                source = Path(program).resolve()
            assert source.is_file(), f"{unit.name} runs {program}, which {source} is not"
            target = root / program.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    r = subprocess.run(
        [
            "/usr/bin/systemd-analyze",
            "verify",
            "--man=no",
            f"--root={root}",
            *names,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r.stdout + r.stderr


# --- 1. Streaming --------------------------------------------------------------------------


async def _events(response: httpx.Response) -> AsyncIterator[Event]:
    """The SSE events of a response, each as soon as its blank line arrives."""
    block: list[str] = []
    async for line in response.aiter_lines():
        if line:
            block.append(line)
            continue
        for event in parse_sse("\n".join(block)):
            yield event
        block = []


async def test_streamed_answer_reaches_the_client_while_the_model_is_still_answering(
    cluster: Cluster, world: World, llm_server: LLMServer, proxy: str
) -> None:
    """The model sends its first word and then waits (``gate``) until the test has received
    that word through the proxy: a proxy that buffers the stream would deliver nothing until
    the model finished, which it never does while the gate is closed."""
    gate = threading.Event()
    answer = "Plants turn sunlight into sugar in their leaves [1]."
    llm_server.behaviour.clear()
    llm_server.behaviour.update(answer=answer, gate=gate)
    ends = len(llm_server.stream_ends)
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    try:
        async with (
            cluster.client(cluster.proxy_url(proxy)) as c,
            c.stream(
                "POST",
                world.url("answer"),
                json={"query": "How do plants make sugar?", "top_k": 1, "stream": True},
                headers=world.headers,
            ) as r,
        ):
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _events(r)
            text, done = "", {}
            try:
                while not seen or seen[-1][1] != "delta":
                    event = await asyncio.wait_for(anext(events), 30)
                    seen.append((time.monotonic() - t0, event.event))
                    if event.event == "delta":
                        text += event.data["text"]
            except TimeoutError:
                pytest.fail(
                    f"no answer text through {proxy} within 30 s while the model held its "
                    f"answer after the first word (events so far: {seen}): it buffers the stream"
                )
            # The model is still waiting: what arrived was sent mid-answer.
            assert len(llm_server.stream_ends) == ends
            gate.set()
            async for event in events:
                seen.append((time.monotonic() - t0, event.event))
                if event.event == "delta":
                    text += event.data["text"]
                if event.event == "done":
                    done = event.data
    finally:
        gate.set()
        llm_server.behaviour.clear()
    first_delta = next(t for t, name in seen if name == "delta")
    model_done = llm_server.stream_ends[ends] - t0
    print(
        f"{proxy}: retrieval at {seen[0][0]:.3f} s, first word at {first_delta:.3f} s, model "
        f"finished at {model_done:.3f} s, done event at {seen[-1][0]:.3f} s"
    )
    assert seen[0][1] == "retrieval" and seen[-1][1] == "done"
    assert first_delta < model_done <= seen[-1][0]
    assert text.strip() == answer == done["answer"]
    assert done["mode"] == "generative"


# --- 2. Revocation ---------------------------------------------------------------------------


async def test_a_key_revoked_through_one_replica_is_refused_by_the_other(
    app: Any, cluster: Cluster, world: World
) -> None:
    key, secret = await create_api_key(app, world.tenant, name="revoked through A")
    url = world.url("collections")
    async with (
        cluster.client(cluster.a.url) as a,
        cluster.client(cluster.b.url) as b,
        cluster.client(cluster.nginx.url) as nginx,
        cluster.client(cluster.caddy.url) as caddy,
    ):
        # Both replicas have seen (and cached) the key before it is revoked.
        for c in (a, b):
            assert (await c.get(url, headers=key_header(secret))).status_code == 200
        r = await a.delete(world.url(f"api-keys/{key.id}"), headers=world.headers)
        assert r.status_code == 204, r.text
        r = await b.get(url, headers=key_header(secret))
        assert r.status_code == 401, r.text
        for c in (a, nginx, caddy):
            assert (await c.get(url, headers=key_header(secret))).status_code == 401


async def test_a_logout_through_one_replica_is_refused_by_the_other(
    cluster: Cluster, world: World
) -> None:
    async with cluster.client(cluster.a.url) as a, cluster.client(cluster.b.url) as b:
        r = await a.post(
            "/v1/auth/login", data={"username": world.owner_email, "password": DEFAULT_PASSWORD}
        )
        assert r.status_code == 200, r.text
        token = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await b.get("/v1/users/me", headers=token)).status_code == 200
        assert (await a.post("/v1/auth/logout", headers=token)).status_code == 204
        r = await b.get("/v1/users/me", headers=token)
        assert r.status_code == 401, r.text


# --- 3. Rate limits --------------------------------------------------------------------------

LIMIT = 5


async def _count_admitted(
    app: Any, world: World, clients: list[httpx.AsyncClient]
) -> tuple[list[int], list[str]]:
    """Send LIMIT + 3 requests with a fresh key limited to LIMIT a minute, taking the clients
    in turn; their statuses and request ids."""
    _, secret = await create_api_key(app, world.tenant, rate_limit_per_minute=LIMIT)
    statuses, ids = [], []
    for i in range(LIMIT + 3):
        r = await clients[i % len(clients)].get(
            world.url("collections"), headers=key_header(secret)
        )
        statuses.append(r.status_code)
        ids.append(r.headers["x-request-id"])
    return statuses, ids


def _served_by(cluster: Cluster, request_id: str) -> set[str]:
    """The replica that logged ``request_id`` (its access line is written just after the
    response went out, so it may lag the client a little)."""
    deadline = time.monotonic() + 10
    while True:
        names = {r.name for r in (cluster.a, cluster.b) if r.served(request_id)}
        if names or time.monotonic() > deadline:
            assert len(names) == 1, f"request {request_id} was logged by {names or 'no replica'}"
            return names
        time.sleep(0.05)


async def test_a_key_limit_counts_requests_to_both_replicas(
    app: Any, cluster: Cluster, world: World
) -> None:
    async with cluster.client(cluster.a.url) as a, cluster.client(cluster.b.url) as b:
        statuses, _ = await _count_admitted(app, world, [a, b])
    assert statuses == [200] * LIMIT + [429] * 3


async def test_a_key_limit_holds_through_the_proxy(
    app: Any, cluster: Cluster, world: World, proxy: str
) -> None:
    async with cluster.client(cluster.proxy_url(proxy)) as c:
        statuses, ids = await _count_admitted(app, world, [c])
    assert statuses == [200] * LIMIT + [429] * 3
    # The proxy's request id reached the app: exactly one replica served each request.
    served = [_served_by(cluster, rid) for rid in ids]
    if proxy == "nginx":
        # Round robin: the admitted requests were shared by the two replicas.
        assert set().union(*served[:LIMIT]) == {"a", "b"}, served


# --- 4. One search cache, fresh after a write ------------------------------------------------


async def test_a_document_uploaded_through_one_replica_is_found_through_the_other(
    cluster: Cluster, world: World
) -> None:
    async with (
        cluster.client(cluster.a.url) as a,
        cluster.client(cluster.b.url) as b,
        cluster.client(cluster.nginx.url) as nginx,
        cluster.client(cluster.caddy.url) as caddy,
    ):
        coll = await _collection(b, world, f"logbooks {uuid.uuid4().hex[:6]}")
        query = {"query": "lighthouse keeper logbook storm", "collection_ids": [coll]}
        before = await b.post(world.url("search"), json=query, headers=world.headers)
        assert before.status_code == 200, before.text
        assert before.json()["results"] == [] and not before.json()["cache_hit"]
        # One cache for every replica: A answers from what B stored. B sends its cache fill
        # with its next search's round trip or, with none coming, CARRY_SECONDS later.
        deadline = time.monotonic() + 10
        while True:
            await asyncio.sleep(CARRY_SECONDS * 2)
            cached = await a.post(world.url("search"), json=query, headers=world.headers)
            assert cached.status_code == 200 and cached.json()["results"] == [], cached.text
            if cached.json()["cache_hit"] or time.monotonic() > deadline:
                break
        assert cached.json()["cache_hit"]
        r = await _upload(
            a,
            world,
            coll,
            "Lighthouse log",
            "The lighthouse keeper wrote in his logbook that the storm broke the lantern glass.",
        )
        assert r.status_code == 202, r.text
        doc_id = r.json()["documents"][0]["id"]
        await _wait_ready(b, world, coll, [doc_id])
        for c in (b, nginx, caddy):
            after = await c.post(world.url("search"), json=query, headers=world.headers)
            assert after.status_code == 200, after.text
            assert [hit["document_id"] for hit in after.json()["results"]][:1] == [doc_id]


# --- 5. Body limits --------------------------------------------------------------------------


def _announce(
    base_url: str, ca_file: Path, path: str, length: int, headers: dict[str, str]
) -> tuple[int, bytes]:
    """Send only the head of a POST announcing ``length`` bytes; the status and the body of
    the answer (whoever refuses must answer without waiting for a body that never comes)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(ca_file))
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        head = {
            "Host": parts.netloc,
            "Content-Type": "application/json",
            "Content-Length": str(length),
            "Connection": "close",
            **headers,
        }
        lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode())
        data = b""
        # Read the answer, not until the connection closes: after a 413, nginx keeps reading
        # for a while (lingering close) in case the body comes after all.
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _length(data: bytes) -> int:
    """The Content-Length of a response whose head is in ``data`` (0 when it has none)."""
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return 0


async def test_the_proxy_refuses_bodies_over_its_limit_and_the_app_its_own(
    app: Any, cluster: Cluster, world: World, proxy: str
) -> None:
    base = cluster.proxy_url(proxy)
    # A collection id no replica has seen: if either logged it, the app got the request.
    probe = uuid.uuid4()
    path = world.url(f"collections/{probe}/documents")
    status, body = await asyncio.to_thread(
        _announce, base, cluster.ca_file, path, OVER_PROXY_LIMIT, world.headers
    )
    assert status == 413 and b'"error"' not in body, body
    assert str(probe) not in tail(cluster.a.log, 10**7) + tail(cluster.b.log, 10**7)

    # Under the proxy's limit, the app's own limits answer, with their JSON error: every
    # route but uploads takes 1 MiB (ATRIUM_MAX_REQUEST_BODY_BYTES) ...
    async with cluster.client(base) as c:
        big_query = json.dumps({"query": "x" * (1024 * 1024 + 1)})
        r = await c.post(
            world.url("search"),
            content=big_query,
            headers={**world.headers, "Content-Type": "application/json"},
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "PayloadTooLarge"
        # ... and an upload the tenant's plan (free: 10 MiB a document).
        tenant, _ = await _tenant(app, "free")
        _, secret = await create_api_key(app, tenant)
        small = World(tenant=tenant, owner_email="", key=secret, collection_id="")
        coll = await _collection(c, small, "uploads")
        r = await c.post(
            small.url(f"collections/{coll}/documents"),
            files={"files": ("big.txt", b"word " * (11 * 1024 * 1024 // 5), "text/plain")},
            headers=small.headers,
        )
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "PayloadTooLarge"


async def test_with_the_proxy_limit_raised_the_app_refuses_with_its_own_413(
    cluster: Cluster, world: World, tmp_path: Path
) -> None:
    """The shipped Caddyfile with MAX_BODY_BYTES raised far above the app's limits: the same
    announced body now reaches a replica, which refuses it from its Content-Length (the
    tenant's plan: 200 MiB a JSON document) with its JSON error. Caddy, unlike nginx, passes
    the request on before the body arrives, so no body need be sent; nginx (which spools the
    whole body first) is not run this way."""
    raised = CaddyProxy(
        tmp_path / "caddy", [cluster.a.port, cluster.b.port], MAX_BODY_BYTES=str(10**12)
    )
    assert raised.validate().returncode == 0
    raised.start()
    try:
        path = world.url(f"collections/{world.collection_id}/documents")
        status, body = await asyncio.to_thread(
            _announce, raised.url, cluster.ca_file, path, OVER_PROXY_LIMIT, world.headers
        )
    finally:
        raised.stop()
    assert status == 413, body
    assert json.loads(body)["error"] == "PayloadTooLarge"


# --- 6. A replica dies (last: it leaves one replica) -----------------------------------------


async def test_a_killed_replica_loses_no_acknowledged_upload(
    cluster: Cluster, world: World
) -> None:
    """Uploads and reads run through nginx while replica B is SIGKILLed; then more go through
    both proxies, which must send everything to A.

    Only an upload that B had received when it died may fail (502: nginx never sends a POST
    twice); every read succeeds (nginx retries it on A); every upload that was answered 202
    ends up as a processed document.
    """
    accepted: list[str] = []
    failed: list[tuple[int, str]] = []
    reads: list[int] = []
    killed = asyncio.Event()
    caddy_lines: list[int] = []
    async with (
        cluster.client(cluster.nginx.url) as nginx,
        cluster.client(cluster.caddy.url) as caddy,
        cluster.client(cluster.a.url) as a,
    ):
        coll = await _collection(a, world, f"crash {uuid.uuid4().hex[:6]}")

        async def upload(c: httpx.AsyncClient, label: str) -> None:
            r = await _upload(c, world, coll, label, f"Entry {label}: {uuid.uuid4().hex} words.")
            if r.status_code == 202:
                accepted.append(r.json()["documents"][0]["id"])
            else:
                failed.append((r.status_code, r.headers.get("x-request-id", "")))

        async def uploader(n: int) -> None:
            for i in range(8):
                await upload(nginx, f"u{n}-{i}")
                if n == 0 and i == 2:
                    # B dies with requests in flight (the other uploader's, the reader's).
                    caddy_lines.append(cluster.caddy.log_lines())
                    await asyncio.to_thread(cluster.b.kill)
                    killed.set()

        async def reader() -> None:
            while not killed.is_set() or len(reads) < 20:
                r = await nginx.get(
                    world.url(f"collections/{coll}/documents"), headers=world.headers
                )
                reads.append(r.status_code)

        await asyncio.gather(uploader(0), uploader(1), reader())
        assert cluster.b.proc is not None and cluster.b.proc.returncode == -9
        # Caddy 2.6 cannot resend an upload that B refused (see the Caddyfile): everything
        # goes to A once its health check has taken B out, which it says in its log.
        cluster.caddy.wait_health_check_failed(f"127.0.0.1:{cluster.b.port}", caddy_lines[0])
        # After the kill, both proxies send everything to A, uploads included.
        for c, name in ((nginx, "nginx"), (caddy, "caddy")):
            for i in range(4):
                before = len(failed)
                await upload(c, f"after-{name}-{i}")
                assert len(failed) == before, f"upload through {name} after the kill: {failed}"
                r = await c.get(world.url(f"collections/{coll}/documents"), headers=world.headers)
                assert r.status_code == 200, r.text

        assert set(reads) == {200}, reads
        # Only requests B had when it died may fail: at most one per concurrent uploader.
        assert len(failed) <= 2 and {s for s, _ in failed} <= {502}, failed
        # nginx's log agrees: every failed request had been sent to B alone, and requests
        # that found B gone went on to A.
        b_addr, a_addr = f"127.0.0.1:{cluster.b.port}", f"127.0.0.1:{cluster.a.port}"
        entries = cluster.nginx.entries()
        assert all(addrs == [b_addr] for _, status, addrs in entries if status >= 500), entries
        assert len([e for e in entries if e[1] >= 500]) == len(failed)
        failovers = [e for e in entries if e[2] == [b_addr, a_addr]]
        r = await a.get(
            world.url(f"collections/{coll}/documents"), params={"size": 100}, headers=world.headers
        )
        listed = {d["id"] for d in r.json()["items"]}
        assert set(accepted) <= listed, set(accepted) - listed
        await _wait_ready(a, world, coll, accepted)
        print(
            f"kill: {len(accepted)} uploads accepted, {len(failed)} failed {failed}, "
            f"{len(reads)} reads {sorted(set(reads))}, {len(failovers)} went on from B to A, "
            f"{len(listed)} documents"
        )
