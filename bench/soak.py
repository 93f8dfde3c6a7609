"""Soak: ten minutes of mixed traffic on the embedded default, watching errors, memory and
search latency over time.

    .venv/bin/python bench/soak.py                  # 10 minutes, into docs/performance.md
    .venv/bin/python bench/soak.py --minutes 3 --no-write

``atrium dev`` is started exactly as ``./scripts/run`` starts it (a fresh data directory; SQLite
for accounts, embedded PostgreSQL and Redis, a Celery worker and beat), with answers produced by
an OpenAI-compatible server on loopback (``tests/support/llm_server.py``: no paid model). Then,
for ``--minutes``, at the same time:

- sign-ups: register, verify through the outbox, log in — one every ``--signup-every`` seconds;
- logins of the users signed up so far, round robin (each at most once per 40 s);
- uploads: two clients, one Markdown passage of real prose per request, paced so ingestion
  keeps up (a steady load, not a growing backlog);
- searches: two clients in a loop;
- streamed answers: one client, Server-Sent Events read to ``done``;
- key rotations: a key rotated by its owner, the new secret used at once, the old one refused.

Each simulated person comes from their own address (``X-Forwarded-For``, which the dev server
trusts from loopback only, as uvicorn does by default), as a thousand real users would.

Printed (and written to ``docs/performance.md``): responses by route and status, responses
>= 500 and transport errors, resident memory (RSS of the process tree) of the API and of the
worker at 2 minutes and at the end, and search p50/p99 in the second minute and the last one.
Targets (issue 14): 0 responses >= 500; memory growth after the first 2 minutes <= 10 %; search
p99 in the last minute <= 1.5 x the second minute's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from _perfdoc import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.llm_server import LLMServer  # noqa: E402
from tests.support.load import (  # noqa: E402
    PASSWORD,
    QUERIES,
    DevServer,
    Tenant,
    _latest_token,
    _statuses,
    login,
    prose_documents,
    sign_up,
)

DOC = ROOT / "docs" / "performance.md"
SECTION = "## Soak on the embedded default"
ANSWER_TEXT = (
    "The licence allows copying and distribution of the program [1], provided the notice is "
    "kept and the source is offered [2]; it comes without any warranty [1]."
)


@dataclass
class Soak:
    """Everything seen during one soak."""

    started: float = field(default_factory=time.monotonic)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    transport_errors: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    searches: list[tuple[float, float]] = field(default_factory=list)  # (t, ms)
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # (t, api, worker)
    users: list[str] = field(default_factory=list)
    answers_done: int = 0
    rotations_checked: int = 0
    document_ids: list[str] = field(default_factory=list)
    final_statuses: Counter[str] = field(default_factory=Counter)
    settle_seconds: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    def record(self, kind: str, response: httpx.Response, expected: tuple[int, ...]) -> None:
        self.record_status(kind, response.status_code, expected, response.text)

    def record_status(self, kind: str, status: int, expected: tuple[int, ...], text: str) -> None:
        self.statuses.setdefault(kind, Counter())[status] += 1
        if status not in expected and len(self.errors) < 50:
            self.errors.append(f"{kind}: {status} {text[:200]}")

    def failed(self, kind: str, exc: BaseException) -> None:
        self.transport_errors[f"{kind}: {type(exc).__name__}"] += 1
        if len(self.errors) < 50:
            self.errors.append(f"{kind}: {exc!r}")


def _address(n: int) -> str:
    """A distinct client address per simulated person (documentation range 198.18.0.0/15)."""
    return f"198.18.{n // 250}.{n % 250 + 1}"


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its long-lived descendants (the parser's short forks excluded)."""
    total = 0
    now = time.time()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            if p is not proc and now - p.create_time() < 10:
                continue
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _roles(dev_pid: int) -> dict[str, psutil.Process]:
    roles: dict[str, psutil.Process] = {}
    for child in psutil.Process(dev_pid).children():
        cmd = child.cmdline()
        if "serve" in cmd:
            roles["api"] = child
        elif "worker" in cmd:
            roles["worker"] = child
    if set(roles) != {"api", "worker"}:
        raise RuntimeError(f"could not find the API and the worker under pid {dev_pid}: {roles}")
    return roles


async def _sample_memory(soak: Soak, dev_pid: int, stop: asyncio.Event) -> None:
    roles = _roles(dev_pid)
    while not stop.is_set():
        soak.memory.append((soak.now(), _tree_rss(roles["api"]), _tree_rss(roles["worker"])))
        await asyncio.sleep(5)


async def _signup(base_url: str, outbox: Path, n: int, soak: Soak) -> str | None:
    """One person signs up from their own address; their e-mail address, or None."""
    address = f"soak-{uuid.uuid4().hex[:10]}@example.com"
    headers = {"X-Forwarded-For": _address(n)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        try:
            r = await client.post(
                "/v1/auth/register",
                json={"email": address, "password": PASSWORD, "name": "Soak", "tenant_name": "S"},
            )
            soak.record("register", r, (201, 202))
            token = ""
            deadline = time.monotonic() + 120  # the mail is written by the busy worker
            while not token and time.monotonic() < deadline:
                try:
                    token = _latest_token(outbox, address)
                except AssertionError:
                    await asyncio.sleep(0.5)
            if not token:
                soak.errors.append(f"no verification mail for {address} in 120 s")
                return None
            r = await client.post("/v1/auth/verify", json={"token": token})
            soak.record("verify", r, (200,))
            r = await client.post(
                "/v1/auth/login", data={"username": address, "password": PASSWORD}
            )
            soak.record("login", r, (200,))
        except httpx.HTTPError as exc:
            soak.failed("signup", exc)
            return None
    return address


async def _signups(base_url: str, outbox: Path, every: float, soak: Soak, end: float) -> None:
    n = 1000
    while soak.now() < end:
        n += 1
        address = await _signup(base_url, outbox, n, soak)
        if address:
            soak.users.append(address)
        await asyncio.sleep(every)


async def _logins(client: httpx.AsyncClient, soak: Soak, end: float) -> None:
    i = 0
    while soak.now() < end:
        if not soak.users:
            await asyncio.sleep(1)
            continue
        address = soak.users[i % len(soak.users)]
        i += 1
        try:
            r = await client.post(
                "/v1/auth/login",
                data={"username": address, "password": PASSWORD},
                headers={"X-Forwarded-For": _address(5000 + i)},
            )
            soak.record("login", r, (200,))
        except httpx.HTTPError as exc:
            soak.failed("login", exc)
        # Each address at most once per 40 s: the per-address login limit is 10 per 5 minutes.
        await asyncio.sleep(max(2.0, 40.0 / len(soak.users)))


async def _uploads(
    client: httpx.AsyncClient,
    tenant: Tenant,
    docs: list[tuple[str, bytes]],
    soak: Soak,
    end: float,
    every: float,
) -> None:
    for name, body in docs:
        if soak.now() >= end:
            return
        try:
            r = await client.post(
                tenant.documents_url,
                files=[("files", (name, body, "text/markdown"))],
                headers=tenant.headers,
            )
            soak.record("upload", r, (202,))
            if r.status_code == 202:
                soak.document_ids.extend(d["id"] for d in r.json()["documents"])
        except httpx.HTTPError as exc:
            soak.failed("upload", exc)
        await asyncio.sleep(every)


async def _settle(
    client: httpx.AsyncClient, tenant: Tenant, soak: Soak, timeout: float = 300.0
) -> None:
    """After the traffic: wait until every accepted upload is ``ready`` or ``failed``.

    Nothing lost means every 202 ends in a final status; the statuses are counted as they are
    when everything settled (or when ``timeout`` ran out, with what was still pending).
    """
    started = time.monotonic()
    while True:
        found = await _statuses(client, tenant)
        final = Counter(found.get(i, {}).get("status", "missing") for i in soak.document_ids)
        if set(final) <= {"ready", "failed", "missing"} or time.monotonic() - started > timeout:
            soak.final_statuses = final
            if set(final) <= {"ready", "failed", "missing"}:
                soak.settle_seconds = round(time.monotonic() - started, 1)
            return
        await asyncio.sleep(1)


async def _searches(
    client: httpx.AsyncClient, tenant: Tenant, soak: Soak, end: float, n: int
) -> None:
    i = n
    while soak.now() < end:
        i += 1
        mode = ("hybrid", "vector")[i % 2]
        started = time.perf_counter()
        try:
            r = await client.post(
                f"/v1/tenants/{tenant.tenant_id}/search",
                json={"query": QUERIES[i % len(QUERIES)], "top_k": 5, "mode": mode},
                headers=tenant.headers,
            )
        except httpx.HTTPError as exc:
            soak.failed("search", exc)
            continue
        soak.searches.append((soak.now(), (time.perf_counter() - started) * 1000))
        soak.record("search", r, (200,))
        await asyncio.sleep(0.1)


async def _answers(client: httpx.AsyncClient, tenant: Tenant, soak: Soak, end: float) -> None:
    i = 0
    while soak.now() < end:
        i += 1
        try:
            async with client.stream(
                "POST",
                f"/v1/tenants/{tenant.tenant_id}/answer",
                json={"query": QUERIES[i % len(QUERIES)], "top_k": 3, "stream": True},
                headers=tenant.headers,
            ) as r:
                lines = [line async for line in r.aiter_lines()]
            events = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
            soak.record_status("answer (stream)", r.status_code, (200,), "\n".join(lines))
            if r.status_code == 200:
                if events and events[-1] == "done":
                    soak.answers_done += 1
                elif len(soak.errors) < 50:
                    soak.errors.append(f"answer stream ended with {events[-3:]}")
        except httpx.HTTPError as exc:
            soak.failed("answer", exc)
        await asyncio.sleep(1)


async def _rotations(
    client: httpx.AsyncClient, base_url: str, owner: str, tenant: Tenant, soak: Soak, end: float
) -> None:
    """The owner rotates a key; the new secret works at once and the old one is refused."""
    access = await login(client, owner)
    logged_in = soak.now()
    r = await client.post(
        f"/v1/tenants/{tenant.tenant_id}/api-keys",
        json={"name": "rotated", "scopes": ["search"]},
        headers=access,
    )
    r.raise_for_status()
    key_id, secret = r.json()["id"], r.json()["key"]
    search = f"/v1/tenants/{tenant.tenant_id}/search"
    while soak.now() < end:
        await asyncio.sleep(10)
        try:
            if soak.now() - logged_in > 240:  # well within the access token's lifetime
                access = await login(client, owner)
                logged_in = soak.now()
            r = await client.post(
                f"/v1/tenants/{tenant.tenant_id}/api-keys/{key_id}/rotate", headers=access
            )
            soak.record("key rotation", r, (201,))
            if r.status_code != 201:
                continue
            old, key_id, secret = secret, r.json()["id"], r.json()["key"]
            new_ok = await client.post(
                search, json={"query": "warranty"}, headers={"Authorization": f"Bearer {secret}"}
            )
            old_refused = await client.post(
                search, json={"query": "warranty"}, headers={"Authorization": f"Bearer {old}"}
            )
            soak.record("search (rotated key)", new_ok, (200,))
            soak.record("search (old key)", old_refused, (401,))
            if new_ok.status_code == 200 and old_refused.status_code == 401:
                soak.rotations_checked += 1
        except httpx.HTTPError as exc:
            soak.failed("rotation", exc)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def _median_at(samples: list[tuple[float, int, int]], lo: float, hi: float, i: int) -> int | None:
    window = [s[i] for s in samples if lo <= s[0] < hi]
    return int(statistics.median(window)) if window else None


def summarise(soak: Soak, seconds: float) -> dict[str, Any]:
    """The figures the issue's targets are stated in."""
    second = [ms for t, ms in soak.searches if 60 <= t < 120]
    last = [ms for t, ms in soak.searches if seconds - 60 <= t < seconds]
    mib = 1024 * 1024
    memory: dict[str, Any] = {}
    for i, role in ((1, "api"), (2, "worker")):
        at2 = _median_at(soak.memory, 110, 130, i)
        end = _median_at(soak.memory, seconds - 30, seconds + 1, i)
        growth = round(100 * (end - at2) / at2, 1) if at2 and end else None
        memory[role] = {
            "rss_2min_mib": round(at2 / mib) if at2 else None,
            "rss_end_mib": round(end / mib) if end else None,
            "growth_pct": growth,
        }
    p99_second, p99_last = _pct(second, 0.99), _pct(last, 0.99)
    return {
        "minutes": round(seconds / 60, 1),
        "statuses": {k: dict(sorted(v.items())) for k, v in sorted(soak.statuses.items())},
        "responses_5xx": sum(n for c in soak.statuses.values() for s, n in c.items() if s >= 500),
        "transport_errors": dict(soak.transport_errors),
        "signups": len(soak.users),
        "answers_done": soak.answers_done,
        "rotations_checked": soak.rotations_checked,
        "documents_uploaded": len(soak.document_ids),
        "documents_final": dict(sorted(soak.final_statuses.items())),
        "documents_settled_after_s": soak.settle_seconds,
        "memory": memory,
        "search_p50_ms_second_minute": _pct(second, 0.5),
        "search_p99_ms_second_minute": p99_second,
        "search_p50_ms_last_minute": _pct(last, 0.5),
        "search_p99_ms_last_minute": p99_last,
        "p99_ratio_last_to_second": round(p99_last / p99_second, 2)
        if p99_second and p99_last
        else None,
        "first_errors": soak.errors[:10],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start ``atrium dev``, load it for ``args.minutes``, and return the summary."""
    llm = LLMServer()
    llm.start()
    llm.behaviour["answer"] = ANSWER_TEXT
    data_dir = Path(tempfile.mkdtemp(prefix="atrium-soak-")) / "data"
    server = DevServer(
        data_dir,
        {
            "ATRIUM_LLM_MODEL": "openai/soak-model",
            "ATRIUM_LLM_API_BASE": llm.base_url,
            "ATRIUM_LLM_API_KEY": "sk-loopback",
        },
    )
    server.start()
    seconds = args.minutes * 60
    try:
        server.create_superuser("ops@example.com")
        outbox = data_dir / "outbox"
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as setup:
            admin = await login(setup, "ops@example.com")
            setup.headers["X-Forwarded-For"] = _address(1)
            tenant = await sign_up(setup, outbox, admin)
        owner = _owner_of(outbox)
        docs = prose_documents(args.docs)
        soak = Soak()
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=20)
        timeout = httpx.Timeout(120.0, connect=10.0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as c:
            sampler = asyncio.create_task(_sample_memory(soak, server.proc.pid, stop))  # type: ignore[union-attr]
            await asyncio.gather(
                _signups(server.url, outbox, args.signup_every, soak, seconds),
                _logins(c, soak, seconds),
                _uploads(c, tenant, docs[0::2], soak, seconds, args.upload_every),
                _uploads(c, tenant, docs[1::2], soak, seconds, args.upload_every),
                _searches(c, tenant, soak, seconds, 0),
                _searches(c, tenant, soak, seconds, 3),
                _answers(c, tenant, soak, seconds),
                _rotations(c, server.url, owner, tenant, soak, seconds),
            )
            stop.set()
            await sampler
            await _settle(c, tenant, soak)
        return summarise(soak, seconds)
    finally:
        server.stop()


def _owner_of(outbox: Path) -> str:
    """The address ``sign_up`` registered (the only ``load-`` address in the outbox)."""
    for path in outbox.glob("*.eml"):
        text = path.read_text(errors="replace")
        for word in text.split():
            if word.startswith("load-") and word.endswith("@example.com"):
                return word
    raise RuntimeError(f"no sign-up mail in {outbox}")


def _markdown(s: dict[str, Any], args: argparse.Namespace) -> str:
    mem = s["memory"]
    rows = [
        ("responses >= 500", s["responses_5xx"]),
        ("transport errors", sum(s["transport_errors"].values())),
        ("sign-ups completed (register, verify, login)", s["signups"]),
        ("streamed answers read to `done`", s["answers_done"]),
        ("key rotations checked (new works, old refused)", s["rotations_checked"]),
        (
            "documents accepted → final status after the traffic",
            f"{s['documents_uploaded']} → "
            + ", ".join(f"{n} {status}" for status, n in s["documents_final"].items())
            + (
                f" (settled {s['documents_settled_after_s']} s after)"
                if s["documents_settled_after_s"] is not None
                else " (not settled within 300 s)"
            ),
        ),
        (
            "API RSS at 2 min → end (MiB)",
            f"{mem['api']['rss_2min_mib']} → {mem['api']['rss_end_mib']} "
            f"({mem['api']['growth_pct']:+} %)",
        ),
        (
            "worker RSS at 2 min → end (MiB)",
            f"{mem['worker']['rss_2min_mib']} → {mem['worker']['rss_end_mib']} "
            f"({mem['worker']['growth_pct']:+} %)",
        ),
        (
            "search p50 / p99, second minute (ms)",
            f"{s['search_p50_ms_second_minute']} / {s['search_p99_ms_second_minute']}",
        ),
        (
            "search p50 / p99, last minute (ms)",
            f"{s['search_p50_ms_last_minute']} / {s['search_p99_ms_last_minute']}",
        ),
        ("p99 last minute ÷ second minute", s["p99_ratio_last_to_second"]),
    ]
    statuses = "; ".join(
        f"{kind} " + ", ".join(f"{code}: {n}" for code, n in codes.items())
        for kind, codes in s["statuses"].items()
    )
    lines = [
        SECTION,
        "",
        f"`bench/soak.py --minutes {args.minutes}`: `atrium dev` as `./scripts/run` starts it "
        "(SQLite, embedded PostgreSQL and Redis, one worker), answers from a loopback "
        "OpenAI-compatible server; at once: a sign-up every "
        f"{args.signup_every:g} s, logins of those users (each at most once per 40 s, as the "
        "per-address limit allows), two uploaders (one passage per request, "
        f"{args.upload_every:g} s apart), two searchers, one streamed answer a second, "
        "a key rotation every 10 s. "
        "RSS is the process tree's (the parser's short-lived forks excluded), median of the "
        "samples around 2 minutes and over the last 30 s. Targets: 0 responses >= 500, growth "
        f"<= 10 %, p99 ratio <= 1.5. 2-core machine, measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| | |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in rows),
        "",
        f"Responses by route: {statuses}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--docs", type=int, default=2000, help="passages available to upload")
    parser.add_argument("--signup-every", type=float, default=15.0)
    parser.add_argument(
        "--upload-every",
        type=float,
        default=2.0,
        help="seconds between one uploader's requests (two uploaders; steady, not a backlog)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/performance.md")
    args = parser.parse_args()
    if args.minutes < 3:
        parser.error("--minutes must be at least 3 (the second and the last minute are compared)")
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        write_section(SECTION, _markdown(summary, args), DOC)


if __name__ == "__main__":
    main()
