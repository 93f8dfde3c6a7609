"""Request bodies are limited as they stream, on every route, chunked or not (issue 13)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest

from atrium.ingestion.limits import max_request_bytes
from atrium.kit import bodylimit

MiB = 1024 * 1024
CHUNK = 64 * 1024


class Stream:
    """A body made by an async generator, never held in memory, that counts what was pulled."""

    def __init__(self, total: int, head: bytes = b"", tail: bytes = b"", fill: bytes = b"a"):
        self.total, self.head, self.tail, self.fill = total, head, tail, fill
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        block = self.fill * CHUNK
        yield self.head
        self.pulled = len(self.head)
        while self.pulled < self.total:
            self.pulled += len(block)
            yield block
        yield self.tail


@pytest.fixture
def no_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop nothing after a 413, so what the client was asked for is what the app read."""
    monkeypatch.setattr(bodylimit, "LINGER_BYTES", 0)


def _is_413(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "PayloadTooLarge"
    for word in words:
        assert word in body["detail"]
    assert r.headers["x-request-id"]


async def test_a_declared_body_over_the_limit_is_refused_before_the_route(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/auth/forgot-password",
        content=b'{"email": "' + b"a" * (2 * MiB) + b'"}',
        headers={"content-type": "application/json"},
    )
    _is_413(r, "larger than 1.0 MB", "send less data")
    assert r.headers["connection"] == "close"
    # Under the limit the route runs as before.
    ok = await client.post("/v1/auth/forgot-password", json={"email": "a@example.com"})
    assert ok.status_code == 202


@pytest.mark.parametrize("path", ["/v1/auth/register", "/v1/auth/login"])
async def test_a_chunked_body_without_length_is_cut_off_at_the_limit(
    client: httpx.AsyncClient, no_linger: None, path: str
) -> None:
    # Unauthenticated routes whose rate limits read the body (by e-mail address).
    stream = Stream(200 * MiB, head=b'{"email": "', tail=b'"}')
    content_type = "application/json"
    if path.endswith("login"):
        stream = Stream(200 * MiB, head=b"password=x&username=")
        content_type = "application/x-www-form-urlencoded"
    r = await client.post(path, content=stream, headers={"content-type": content_type})
    _is_413(r, "larger than 1.0 MB")
    assert stream.pulled <= MiB + 2 * CHUNK


async def test_a_chunked_upload_over_the_plans_limit_gets_413(
    app: Any, client: httpx.AsyncClient, no_linger: None
) -> None:
    from tests.support.documents import setup_tenant
    from tests.support.quota import set_plan, superuser_headers

    ctx = await setup_tenant(app, client)
    await set_plan(
        client, await superuser_headers(app), ctx.tenant.id, "pro", {"max_upload_bytes": CHUNK}
    )
    boundary = "atrium-test-boundary"
    stream = Stream(
        30 * MiB,
        head=(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            'filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n'
        ).encode(),
        tail=f"\r\n--{boundary}--\r\n".encode(),
        fill=b"word ",
    )
    r = await client.post(
        ctx.docs,
        content=stream,
        headers={**ctx.headers, "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    _is_413(r, "100 files of up to 64.0 KB each")
    # Refused once the tenant's own request limit was passed, not after the whole body.
    assert stream.pulled <= max_request_bytes(CHUNK, multipart=True) + 2 * CHUNK * 5

    text = Stream(30 * MiB, head=b'{"text": "', tail=b'"}')
    r = await client.post(
        ctx.docs, content=text, headers={**ctx.headers, "content-type": "application/json"}
    )
    _is_413(r, "the largest document allowed is 64.0 KB")
    assert text.pulled <= max_request_bytes(CHUNK, multipart=False) + 2 * CHUNK
    # Within the plan, uploads still work.
    r = await client.post(ctx.docs, json={"text": "A small document. " * 50}, headers=ctx.headers)
    assert r.status_code == 202, r.text


async def test_a_json_upload_gets_the_document_size_plus_1_mib_not_six_times_it(
    app: Any, client: httpx.AsyncClient, no_linger: None
) -> None:
    """JSON text is buffered and parsed whole, holding the GIL: the body may exceed the largest
    document by 1 MiB of escapes and fields, not by six times it (review M2)."""
    from tests.support.documents import setup_tenant
    from tests.support.quota import set_plan, superuser_headers

    ctx = await setup_tenant(app, client)
    await set_plan(
        client, await superuser_headers(app), ctx.tenant.id, "pro", {"max_upload_bytes": CHUNK}
    )
    # 1.3 MiB: under the old 6 x 64 KiB + 1 MiB, over 64 KiB + 1 MiB.
    text = Stream(MiB + 5 * CHUNK, head=b'{"text": "', tail=b'"}')
    r = await client.post(
        ctx.docs, content=text, headers={**ctx.headers, "content-type": "application/json"}
    )
    _is_413(r, "the largest document allowed is 64.0 KB", "multipart/form-data")
    assert text.pulled <= CHUNK + MiB + 2 * CHUNK, text.pulled
    # A document of the largest size still goes as JSON with its escapes (x3 here: "é" is two
    # UTF-8 bytes, six as \u00e9).
    body = json.dumps({"text": "é" * (CHUNK // 2), "title": "Accents"}).encode()
    assert len(body) > 3 * CHUNK
    r = await client.post(
        ctx.docs, content=body, headers={**ctx.headers, "content-type": "application/json"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["documents"][0]["size_bytes"] == CHUNK


# The real server: a 300 MB chunked body, the process's memory, and /healthz meanwhile --------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api_server(test_env: dict[str, Any], clean_state: None) -> Iterator[tuple[int, int]]:
    """``atrium.app`` under uvicorn in its own process (as gunicorn's workers run it)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "atrium.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "the API process exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _post_chunked(
    port: int, path: str, body: AsyncIterator[bytes]
) -> tuple[int, dict[str, str], bytes]:
    """POST a chunked body while reading the answer, as curl and browsers do: stops sending as
    soon as the server has answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )

    async def send() -> None:
        try:
            async for chunk in body:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                # drain() does not yield while the socket takes data (and the server's
                # lingering close reads up to 64 MiB after its 413): give the reader its turn
                # to see the answer, as a client reading while it sends does.
                await asyncio.sleep(0)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server closed after answering

    sender = asyncio.create_task(send())
    try:
        status = int((await asyncio.wait_for(reader.readline(), 120)).split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        content = await reader.readexactly(int(headers["content-length"]))
    finally:
        sender.cancel()
        writer.close()
    return status, headers, content


async def test_a_300_mb_chunked_body_is_refused_early_with_flat_memory(
    api_server: tuple[int, int],
) -> None:
    port, pid = api_server
    process = psutil.Process(pid)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as other:
        # Warm the route up (imports, pools) before the baseline.
        for _ in range(3):
            r = await other.post("/v1/auth/forgot-password", json={"email": "warm@example.com"})
            assert r.status_code == 202
        baseline = process.memory_info().rss
        peak = baseline
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.005)

        health: list[float] = []
        total = 300 * 1000 * 1000
        pulled = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal pulled
            yield b'{"email": "'
            block = b"a" * CHUNK
            while pulled < total:
                if pulled == 4 * CHUNK:
                    # The request is being handled: another client is served meanwhile.
                    start = time.monotonic()
                    r = await other.get("/healthz")
                    health.append(time.monotonic() - start)
                    assert r.status_code == 200
                pulled += len(block)
                yield block
            yield b'"}'

        sampler = asyncio.create_task(sample())
        try:
            status, headers, content = await _post_chunked(port, "/v1/auth/forgot-password", body())
        finally:
            done.set()
            await sampler
        peak = max(peak, process.memory_info().rss)

        assert status == 413
        assert json.loads(content)["error"] == "PayloadTooLarge"
        assert "larger than 1.0 MB" in json.loads(content)["detail"]
        assert headers["connection"] == "close"
        # Early: the answer came after the first megabytes, not after 300 MB.
        assert pulled < 64 * MiB, pulled
        assert peak - baseline < 150 * MiB, (peak - baseline) / MiB
        # The bound the issue sets for a liveness probe during the upload.
        assert health and health[0] < 1.0, health
        assert (await other.get("/healthz")).status_code == 200
