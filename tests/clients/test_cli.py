"""The ``atr`` command line, run through its console script against the live server (real
worker, embeddings and vector store). One tenant and one uploaded directory serve the module."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from atrium_client import Atrium
from atrium_client._cli import upload
from rich.console import Console

from atrium.kit.vectordb import ensure_tenant_partition
from tests.support.apikeys import create_api_key
from tests.support.factories import create_tenant, create_user
from tests.support.files import make_docx, make_pdf
from tests.support.llm_server import LLMServer
from tests.support.load import free_port
from tests.support.sdk import clean_state, uploaded_document

# One worker runs the whole module: its tests share one tenant and upload.
pytestmark = pytest.mark.xdist_group("cli")

ATR = Path(sys.executable).parent / "atr"

#: The uploaded directory: name -> bytes (a PDF and a DOCX besides text and Markdown).
TEXTS = {
    "refunds.md": "# Refunds\n\nRefunds are paid back to the original card within 14 days of "
    "the return reaching our warehouse.\n",
    "shipping.txt": "Shipping is free for orders above 50 euros. Parcels leave the warehouse "
    "within two working days.\n",
    "guides/security.md": "# Security\n\nRotate API keys every ninety days and revoke a key as "
    "soon as it leaks.\n",
}
PDF = make_pdf(
    [["Every kettle carries a two year warranty against manufacturing defects."]],
    title="Warranty",
)
DOCX = make_docx(title="Travel policy", paragraphs=2)
FILES = [*TEXTS, "travel.docx", "warranty.pdf"]


@dataclass
class Cli:
    """The module's tenant and key, and the upload of the directory."""

    env: dict[str, str]
    tenant_id: str
    collection: str
    root: Path
    upload: subprocess.CompletedProcess[str]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """``atr ARGS`` with the module's configuration (``env`` overrides it); one that is
        still running after 180 s is killed and reported as exit -9 with what it printed."""
        try:
            return subprocess.run(
                [str(ATR), *args],
                env={**self.env, **env},
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out, err = (
                (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")
                for b in (exc.stdout, exc.stderr)
            )
            return subprocess.CompletedProcess(exc.cmd, -9, out, err + "\n(killed after 180 s)")


@pytest.fixture(scope="module")
async def cli(
    app: Any,
    live_server: Any,
    test_env: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Cli]:
    user = await create_user(app)
    tenant = await create_tenant(app, user)
    async with app.state.vector_pool.connection() as conn:
        await ensure_tenant_partition(conn, tenant.id)
    _, secret = await create_api_key(app, tenant, name="cli tests")
    env = {
        **os.environ,
        "ATRIUM_URL": live_server.url,
        "ATRIUM_API_KEY": secret,
        "ATRIUM_TENANT": str(tenant.id),
        "COLUMNS": "200",  # rich's tables: room for ids and file names
    }
    root = tmp_path_factory.mktemp("cli") / "handbook"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "travel.docx").write_bytes(DOCX)
    (root / "warranty.pdf").write_bytes(PDF)
    (root / ".hidden.md").write_text("never uploaded")
    collection = f"handbook-{uuid.uuid4().hex[:6]}"
    cli = Cli(env, str(tenant.id), collection, root, None)  # type: ignore[arg-type]
    # The CLI's own deadline comes before run()'s: a stuck document is then named in its table.
    cli.upload = cli.run(
        "upload", str(root), "--collection", collection, "--parallel", "3", "--wait-timeout", "150"
    )
    if cli.upload.returncode != 0:
        # What the worker and the server were doing: a failed upload is otherwise opaque here.
        logs = {name: test_env["data_dir"] / name for name in ("worker.log", "live-server.log")}
        tails = "".join(
            f"\n--- {name} ---\n{path.read_text(errors='replace')[-6000:]}"
            for name, path in logs.items()
            if path.exists()
        )
        cli.upload.stderr += tails
    yield cli
    clean_state(test_env)


@pytest.fixture(scope="module")
async def revoked_key(app: Any, cli: Cli) -> str:
    from atrium.models import Tenant

    async with app.state.sessionmaker() as session:
        tenant = await session.get(Tenant, uuid.UUID(cli.tenant_id))
    _, secret = await create_api_key(app, tenant, revoked=True)
    return secret


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a rich table printed without colour: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_upload_a_directory_with_progress_and_a_summary(cli: Cli) -> None:
    r = cli.upload
    assert r.returncode == 0, r.stderr + r.stdout
    # The collection did not exist: it was created, and the command said so.
    assert f"Created collection '{cli.collection}'" in r.stderr
    # The progress bars (drawn on stderr; a pipe gets their final state): bytes, then processing.
    assert "Uploading 5 files" in r.stderr and "100%" in r.stderr
    total = sum(len(t.encode()) for t in TEXTS.values()) + len(PDF) + len(DOCX)
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB" in r.stderr
    assert "Processing" in r.stderr and "5/5 processed" in r.stderr
    # The summary lists every file (hidden ones skipped) as ready, with its chunks.
    assert "Upload summary" in r.stdout
    rows = table_rows(r.stdout)
    assert sorted(n for n in rows if n in FILES) == sorted(FILES)
    for name in FILES:
        assert rows[name][0] == "ready", rows[name]
        assert int(rows[name][1]) >= 1
    assert ".hidden.md" not in r.stdout


def test_search_prints_a_table_or_json(cli: Cli) -> None:
    r = cli.run("search", "How long do refunds take?", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    assert "Results for 'How long do refunds take?'" in r.stdout
    assert "Refunds" in r.stdout and "14 days" in r.stdout
    r = cli.run("search", "kettle warranty", "-c", cli.collection, "--mode", "hybrid", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["mode"] == "hybrid"
    assert "two year warranty" in body["results"][0]["text"]


def test_ask_streams_the_answer_then_its_sources(
    cli: Cli, llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The live server's LLM is the session's loopback server: it says this, token by token.
    said = "Refunds reach the card within 14 days [1]. See also [8]."
    monkeypatch.setitem(llm_server.behaviour, "answer", said)
    r = cli.run("ask", "How long do refunds take?", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    chat = [q for q in llm_server.requests if q["path"].endswith("/chat/completions")][-1]
    assert chat["body"]["stream"] is True and chat["body"]["model"] == "test-model"
    # The streamed text as the model wrote it, then the sources it cites ([8] names none).
    answer, _, sources = r.stdout.partition("\n\nSources:\n")
    assert answer == said
    lines = sources.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[1] Refunds (document ")
    # --json: the whole answer at once, as the API gives it.
    r = cli.run("ask", "How long do refunds take?", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["mode"] == "generative" and body["model"] == "openai/test-model"
    assert body["answer"] == said
    assert [c["number"] for c in body["citations"]] == [1]
    assert body["citations"][0]["title"] == "Refunds"


def test_collections_documents_and_usage(cli: Cli) -> None:
    r = cli.run("collections")
    assert r.returncode == 0, r.stderr
    assert table_rows(r.stdout)[cli.collection][1] == "5"  # id, then documents
    (coll,) = json.loads(cli.run("collections", "--json").stdout)
    assert coll["name"] == cli.collection and coll["document_count"] == 5

    # Every collection: a table each, titled with its name and id; every document ready.
    r = cli.run("documents")
    assert r.returncode == 0, r.stderr
    assert f"{cli.collection} ({coll['id']})" in r.stdout
    assert r.stdout.count(" ready ") == 5 and all(name in r.stdout for name in FILES)
    # The collection by id, a status filter, JSON.
    r = cli.run("documents", "--collection", coll["id"], "--status", "ready", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(d["filename"] for d in json.loads(r.stdout)) == sorted(FILES)

    r = cli.run("usage")
    assert r.returncode == 0, r.stderr
    assert "Plan " in r.stdout and "Metric" in r.stdout
    usage = json.loads(cli.run("usage", "--json").stdout)
    assert usage["tenant_id"] == cli.tenant_id
    used = {m["metric"]: m["used"] for m in usage["metrics"]}
    assert used["documents"] == 5
    assert set(table_rows(r.stdout)) >= set(used)


def test_a_failed_document_fails_the_upload(cli: Cli, tmp_path: Path) -> None:
    # Accepted (it looks like a PDF) but unreadable: the worker marks it failed.
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 garbage")
    created = re.search(r"Created collection '[^']+' \(([0-9a-f-]{36})\)", cli.upload.stderr)
    assert created
    r = cli.run("upload", str(broken), "-c", created.group(1), "--json")
    assert r.returncode == 1, r.stderr + r.stdout
    assert f"Collection '{cli.collection}'" in r.stderr  # found by id, not created
    (outcome,) = json.loads(r.stdout)
    assert outcome["file"] == "broken.pdf" and outcome["status"] == "failed"
    assert outcome["error"]
    assert r.stderr.strip().splitlines()[-1] == "Error: 1 of 1 files failed"


def test_errors_are_one_line_with_an_exit_code(cli: Cli, revoked_key: str) -> None:
    def error(r: subprocess.CompletedProcess[str]) -> str:
        assert r.stdout == ""
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("Error: ")
        return line

    r = cli.run("collections", ATRIUM_API_KEY=revoked_key)
    assert r.returncode == 4
    assert "401 Unauthorized" in error(r) and "ATRIUM_API_KEY" in error(r)

    r = cli.run("search", "anything", ATRIUM_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3
    assert "Cannot reach the Atrium server" in error(r)

    r = cli.run("usage", ATRIUM_TENANT="")
    assert r.returncode == 2
    assert "--tenant (or ATRIUM_TENANT)" in error(r)

    r = cli.run("search", "anything", "-c", "no such collection")
    assert r.returncode == 1
    assert "No collection named or with id 'no such collection'" in error(r)

    # An id that no collection has is not taken for the name of a new one.
    missing = str(uuid.uuid4())
    r = cli.run("upload", str(cli.root / "refunds.md"), "-c", missing)
    assert r.returncode == 1
    assert f"No collection with id {missing}" in error(r)


def test_the_upload_bar_counts_the_body_as_it_goes_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The byte bar is fed by the SDK's ``on_progress``: it moves piece by piece as the body is
    taken (here by a mock transport, which reads it), not a whole file at a time."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 300_000)
    answer = uploaded_document(filename="big.bin", size_bytes=300_000)
    bodies: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(len(request.read()))
        return httpx.Response(201, json=answer)

    shown: list[float] = []
    monkeypatch.setattr(
        upload._ByteProgress,
        "set",
        lambda self, name, done: shown.append(done),
    )
    transport = httpx.MockTransport(handler)
    with Atrium("http://atrium.test", api_key="k", tenant_id="t", transport=transport) as client:
        (outcome,) = upload.upload_all(
            client,
            answer["documents"][0]["collection_id"],
            upload.collect([big]),
            parallel=1,
            console=Console(file=io.StringIO()),
        )
    assert outcome.error is None and outcome.document is not None
    # Scaled from the multipart body (a little longer) to the file: 0 first, then one step per
    # 64 KiB piece, reaching the file's size once the whole body is out.
    assert bodies[0] > 300_000
    assert shown[0] == 0 and len(shown) >= 6
    assert shown == sorted(shown) and shown[-1] == 300_000
    steps = [b - a for a, b in itertools.pairwise(shown)]
    assert max(steps) < 300_000 / 4
