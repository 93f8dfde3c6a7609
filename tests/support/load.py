"""A load a person can generate, through the HTTP API of a running Atrium.

Used by ``tests/ops/test_embedded_load.py`` (6 uploaders x 40 documents + 3 searchers, checked
exactly) and by ``bench/load.py`` (the same shape at 1,000 documents, figures printed). Several
uploaders each send one document per request while searchers query in a loop until every
document is ``ready``; every response and transport error is counted.

The documents are real prose that every Debian machine has: the licence texts under
``/usr/share/common-licenses``, cut into passages of a few hundred words.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LICENSES = Path("/usr/share/common-licenses")
PASSWORD = "correct horse battery staple"
QUERIES = [
    "permission to copy and distribute the program",
    "warranty of merchantability or fitness for a particular purpose",
    "source code of a modified version",
    "patent license granted by a contributor",
    "conditions for redistribution in binary form",
    "termination of the license after a violation",
]


def prose_documents(count: int, words: int = 250) -> list[tuple[str, bytes]]:
    """``count`` distinct passages of real English prose, as ``(filename, bytes)``.

    Passages are taken with a stride over the licence texts, so documents overlap a little but
    each is unique (a numbered heading makes sure of it).
    """
    texts = [p.read_text(errors="replace") for p in sorted(LICENSES.iterdir()) if p.is_file()]
    tokens = [w for text in texts for w in text.split()]
    if len(tokens) < words * 4:
        raise RuntimeError(f"not enough prose under {LICENSES} ({len(tokens)} words)")
    stride = max(1, (len(tokens) - words) // max(1, count))
    docs = []
    for i in range(count):
        start = (i * stride) % (len(tokens) - words)
        body = " ".join(tokens[start : start + words])
        docs.append((f"passage-{i:05d}.md", f"# Passage {i}\n\n{body}\n".encode()))
    return docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevServer:
    """``atrium dev`` as ``./scripts/run`` starts it: no ATRIUM_* setting but a data
    directory, a port and ``extra`` (e.g. ``ATRIUM_DATABASE_URL``)."""

    def __init__(self, data_dir: Path, extra: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            {"ATRIUM_DATA_DIR": str(data_dir), "ATRIUM_PORT": str(self.port), **(extra or {})}
        )
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"{data_dir.name}-dev.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atrium.cli", "dev"],
            env=self.env,
            cwd=self.data_dir.parent,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"atrium dev exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"atrium dev never became ready:\n{self.tail()}")

    def create_superuser(self, address: str) -> None:
        """The operator's command, against the running servers."""
        r = subprocess.run(
            [
                *(sys.executable, "-m", "atrium.cli", "create-superuser"),
                "--email",
                address,
            ],
            # From the environment, as automation should (an argument shows in `ps`).
            env={**self.env, "ATRIUM_SUPERUSER_PASSWORD": PASSWORD},
            cwd=self.data_dir.parent,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"create-superuser failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Tenant:
    """What a load needs: a tenant, an API key with every data scope, a collection."""

    tenant_id: str
    key: str
    collection_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def documents_url(self) -> str:
        return f"/v1/tenants/{self.tenant_id}/collections/{self.collection_id}/documents"


def _latest_token(outbox: Path, address: str) -> str:
    for path in sorted(outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True):
        with path.open("rb") as fh:
            message = email.message_from_binary_file(fh, policy=email.policy.default)
        if address not in str(message["To"]):
            continue
        body = message.get_body(("plain",))
        assert body is not None
        match = re.search(r"token=([\w.-]+)", body.get_content())  # type: ignore[attr-defined]
        if match:
            return match[1]
    raise AssertionError(f"no mail with a token for {address} in {outbox}")


async def login(
    client: httpx.AsyncClient, address: str, password: str = PASSWORD
) -> dict[str, str]:
    """Log in; the ``Authorization`` header of the access token."""
    r = await client.post("/v1/auth/login", data={"username": address, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def sign_up(
    client: httpx.AsyncClient, outbox: Path, admin: dict[str, str] | None = None
) -> Tenant:
    """Register, verify through the outbox, log in, and make a key and a collection.

    With ``admin`` (a superuser's ``Authorization`` header) the tenant is put on the
    enterprise plan first, so the load meets no quota or per-key rate limit of the free plan.
    """
    address = f"load-{uuid.uuid4().hex[:10]}@example.com"
    r = await client.post(
        "/v1/auth/register",
        json={"email": address, "password": PASSWORD, "name": "Load", "tenant_name": "Load"},
    )
    assert r.status_code in (200, 201, 202), r.text
    token = ""
    for _ in range(100):  # the mail is written by the worker
        try:
            token = _latest_token(outbox, address)
            break
        except AssertionError:
            await asyncio.sleep(0.2)
    assert token, f"no verification mail for {address} in {outbox}"
    r = await client.post("/v1/auth/verify", json={"token": token})
    assert r.status_code == 200, r.text
    access = await login(client, address)
    r = await client.get("/v1/tenants", headers=access)
    assert r.status_code == 200, r.text
    tenant_id = r.json()["items"][0]["id"] if "items" in r.json() else r.json()[0]["id"]
    if admin is not None:
        r = await client.put(
            f"/v1/admin/tenants/{tenant_id}/plan", json={"plan": "enterprise"}, headers=admin
        )
        assert r.status_code == 200, r.text
    scopes = ["collections:write", "collections:read", "documents:write", "documents:read"]
    r = await client.post(
        f"/v1/tenants/{tenant_id}/api-keys",
        json={"name": "load", "scopes": [*scopes, "search", "answer", "usage:read"]},
        headers=access,
    )
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    r = await client.post(
        f"/v1/tenants/{tenant_id}/collections",
        json={"name": "load"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 201, r.text
    return Tenant(tenant_id, key, r.json()["id"])


@dataclass
class LoadReport:
    """Every outcome of one load, and the figures derived from them."""

    documents: int
    uploaders: int
    searchers: int
    upload_statuses: Counter[int] = field(default_factory=Counter)
    search_statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    search_ms: list[float] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    upload_seconds: float = 0.0
    ready_seconds: float = 0.0
    final_statuses: Counter[str] = field(default_factory=Counter)
    chunks_by_document: int = 0
    collection_chunks: int = 0
    collection_documents: int = 0

    @property
    def server_errors(self) -> int:
        return sum(
            n for code, n in (self.upload_statuses + self.search_statuses).items() if code >= 500
        )

    def summary(self) -> dict[str, Any]:
        ms = sorted(self.search_ms)
        p = (lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]) if ms else (lambda q: float("nan"))
        return {
            "documents": self.documents,
            "uploads_per_s": round(self.documents / self.upload_seconds, 2)
            if self.upload_seconds
            else None,
            "ready_per_s": round(self.documents / self.ready_seconds, 2)
            if self.ready_seconds
            else None,
            "searches": len(ms),
            "search_p50_ms": round(statistics.median(ms), 1) if ms else None,
            "search_p99_ms": round(p(0.99), 1) if ms else None,
            "responses_5xx": self.server_errors,
            "transport_errors": sum(self.transport_errors.values()),
            "upload_statuses": dict(self.upload_statuses),
            "search_statuses": dict(self.search_statuses),
            "final_statuses": dict(self.final_statuses),
        }


async def _uploader(
    client: httpx.AsyncClient, tenant: Tenant, docs: list[tuple[str, bytes]], report: LoadReport
) -> None:
    for name, body in docs:
        try:
            r = await client.post(
                tenant.documents_url,
                files=[("files", (name, body, "text/markdown"))],
                headers=tenant.headers,
            )
        except httpx.HTTPError as exc:
            report.transport_errors[type(exc).__name__] += 1
            report.errors.append(f"upload {name}: {exc!r}")
            continue
        report.upload_statuses[r.status_code] += 1
        if r.status_code == 202:
            report.document_ids.extend(d["id"] for d in r.json()["documents"])
        else:
            report.errors.append(f"upload {name}: {r.status_code} {r.text[:300]}")


async def _searcher(
    client: httpx.AsyncClient, tenant: Tenant, stop: asyncio.Event, report: LoadReport, n: int
) -> None:
    i = n
    while not stop.is_set():
        query = QUERIES[i % len(QUERIES)]
        i += 1
        started = time.perf_counter()
        try:
            r = await client.post(
                f"/v1/tenants/{tenant.tenant_id}/search",
                json={"query": query, "top_k": 5},
                headers=tenant.headers,
            )
        except httpx.HTTPError as exc:
            report.transport_errors[type(exc).__name__] += 1
            report.errors.append(f"search: {exc!r}")
            continue
        report.search_ms.append((time.perf_counter() - started) * 1000)
        report.search_statuses[r.status_code] += 1
        if r.status_code != 200:
            report.errors.append(f"search: {r.status_code} {r.text[:300]}")
        await asyncio.sleep(0.05)


async def _statuses(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, dict[str, Any]]:
    """Every document of the collection by id (all pages)."""
    found: dict[str, dict[str, Any]] = {}
    page = 1
    while True:
        r = await client.get(
            tenant.documents_url, params={"page": page, "size": 100}, headers=tenant.headers
        )
        if r.status_code != 200:
            raise RuntimeError(f"listing documents: {r.status_code} {r.text[:300]}")
        body = r.json()
        for item in body["items"]:
            found[item["id"]] = item
        if page >= (body.get("pages") or 1):
            return found
        page += 1


async def run_load(
    base_url: str,
    tenant: Tenant,
    docs: list[tuple[str, bytes]],
    *,
    uploaders: int = 6,
    searchers: int = 3,
    ready_timeout: float = 900.0,
) -> LoadReport:
    """Upload ``docs`` with ``uploaders`` clients while ``searchers`` query, until all are done.

    Returns when every uploaded document is ``ready`` or ``failed`` (or ``ready_timeout``
    passed); the report holds every status and error seen.
    """
    report = LoadReport(len(docs), uploaders, searchers)
    share = [docs[i::uploaders] for i in range(uploaders)]
    limits = httpx.Limits(max_connections=uploaders + searchers + 2)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        stop = asyncio.Event()
        started = time.perf_counter()
        search_tasks = [
            asyncio.create_task(_searcher(client, tenant, stop, report, n))
            for n in range(searchers)
        ]
        try:
            await asyncio.gather(*(_uploader(client, tenant, s, report) for s in share))
            report.upload_seconds = time.perf_counter() - started
            deadline = time.monotonic() + ready_timeout
            pending = set(report.document_ids)
            while pending and time.monotonic() < deadline:
                found = await _statuses(client, tenant)
                pending = {
                    i for i in pending if found.get(i, {}).get("status") not in ("ready", "failed")
                }
                if pending:
                    await asyncio.sleep(0.5)
            report.ready_seconds = time.perf_counter() - started
        finally:
            stop.set()
            await asyncio.gather(*search_tasks)
        found = await _statuses(client, tenant)
        report.final_statuses = Counter(
            found[i]["status"] if i in found else "missing" for i in report.document_ids
        )
        report.chunks_by_document = sum(
            int(found[i]["chunk_count"]) for i in report.document_ids if i in found
        )
        r = await client.get(
            f"/v1/tenants/{tenant.tenant_id}/collections/{tenant.collection_id}",
            headers=tenant.headers,
        )
        r.raise_for_status()
        report.collection_chunks = int(r.json()["chunk_count"])
        report.collection_documents = int(r.json()["document_count"])
    return report
