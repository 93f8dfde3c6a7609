"""Untrusted files cannot hurt (security issue 13, findings 2 and 3).

* Every regular expression in ``src/`` runs in linear time: each gets 1 MB adversarial inputs
  in a subprocess that must finish (the old Markdown title pattern took minutes on 5 KB).
* The API only sniffs uploads: a ReDoS Markdown file, a DOCX (ZIP) bomb and a PDF with
  thousands of text-less pages leave it answering ``/healthz`` within a second while they are
  uploaded, and its resident memory grows by less than 150 MB.
* The worker parses them in a sandbox: the bomb and the huge PDF end ``failed`` with a reason,
  and another tenant's document processed next by the same real worker still becomes ``ready``.
* The sandbox's memory and time limits hold with the ONNX model loaded in the process, and its
  children start from a reader server without threads: no lock a worker thread holds, none of
  the worker's settings and not its model reach them.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from atrium.ingestion import detect, extract, sandbox, zipdir
from atrium.ingestion.exceptions import BadDocument
from tests.support.documents import prose, setup_tenant, upload_files, wait_document
from tests.support.files import make_docx

SRC = Path(__file__).resolve().parents[2] / "src"

# The regex test --------------------------------------------------------------------------------


_RE_FUNCTIONS = {"compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "subn"}
_RE_FUNCTIONS |= {"split"}


def _is_re_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "re"
        and node.func.attr in _RE_FUNCTIONS
    )


def _patterns_in_src() -> tuple[list[tuple[str, str | bytes, list[str], list[str]]], list[str]]:
    """Every pattern given to ``re`` in src/: where, the pattern, its flags' names, and how it is
    applied (``match``/``fullmatch`` anchor it at the start; anything else, or a use this scan
    cannot see, is taken as a scan of every position). Also the calls whose pattern is not a
    literal (refused: this test could not reach them)."""
    found: list[tuple[str, str | bytes, list[str], list[str]]] = []
    opaque: list[str] = []
    for path in sorted((SRC / "atrium").rglob("*.py")):
        where = str(path.relative_to(SRC))
        tree = ast.parse(path.read_text(), where)
        # name -> methods called on it in this file (``_X.match(...)``, ``self._x.sub(...)``)
        methods: dict[str, set[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(
                node.value, (ast.Name, ast.Attribute)
            ):
                owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                methods.setdefault(owner, set()).add(node.attr)
        names: dict[int, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _is_re_call(node.value):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        names[id(node.value)] = target.id
                    elif isinstance(target, ast.Attribute):
                        names[id(node.value)] = target.attr
        for node in ast.walk(tree):
            if not _is_re_call(node):
                continue
            assert isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, (str, bytes))):
                opaque.append(f"{where}:{node.lineno}")
                continue
            flags = sorted(
                {
                    sub.attr
                    for arg in [*node.args[1:], *(k.value for k in node.keywords)]
                    for sub in ast.walk(arg)
                    if isinstance(sub, ast.Attribute)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id == "re"
                }
            )
            if node.func.attr != "compile":
                uses = {node.func.attr}
            else:
                uses = methods.get(names.get(id(node), ""), set()) & _RE_FUNCTIONS
            anchored = bool(uses) and uses <= {"match", "fullmatch"}
            found.append(
                (f"{where}:{node.lineno}", first.value, flags, sorted(uses) if anchored else [])
            )
    return found, opaque


_MB = 1_000_000

# Each is about 1 MB: runs of what makes a backtracking engine re-scan (whitespace inside and
# across lines, unclosed brackets and quotes, repeated openers, half-matching prefixes).
_ADVERSARIAL = """
N = 1_000_000
INPUTS = [
    "# a" + " " * N + "b",
    "# a" + " " * N + "#" * 10 + " " * 10 + "x",
    "#" * N,
    "# " * (N // 2),
    "#" + " " * N,
    "#" + "\\n" * N,
    "  " + "#" * 6 + "\\t" * N + "\\n",
    "[" * N,
    "[a" * (N // 2),
    "[a](b" * (N // 5),
    "](" * (N // 2),
    "*" * N,
    "**a" * (N // 3),
    "`" * N,
    "|" * N,
    "| " * (N // 2) + "x",
    "|" + " " * N + "x",
    "-" + " " * N,
    "- " * (N // 2),
    "1." + " " * N,
    "1" * N,
    ">" * N,
    "\\n" * N,
    " \\n" * (N // 2),
    "\\n" + " " * N + "x",
    "\\n" + " " * N + "-",
    "\\n\\t" * (N // 2) + "x",
    ". " * (N // 2),
    ".\\n" * (N // 2),
    '." ' * (N // 3),
    "[1," * (N // 3),
    "[" + "1," * (N // 2),
    "[" + "1 , " * (N // 4),
    "http://" * (N // 7),
    "https://" + "a" * N,
    "<" * N,
    "<!--" * (N // 4),
    " " * N + "<",
    "=== " * (N // 4),
    "=== system ===" * (N // 14),
    "Heading " * (N // 8),
    "\\u2022 " * (N // 2),
]
"""

_RUNNER = (
    """
import sys, time
"""
    + _ADVERSARIAL
    + """
import json, re
slowest = (0.0, "")
for where, source, flags, anchored, is_bytes in json.loads(sys.stdin.read()):
    if is_bytes:
        source = source.encode("latin-1")
    pattern = re.compile(source, sum((getattr(re, flag) for flag in flags), 0))
    for i, text in enumerate(INPUTS):
        subject = text.encode("utf-8") if isinstance(pattern.pattern, bytes) else text
        start = time.perf_counter()
        if anchored:  # only ever applied at the start (match, fullmatch)
            for method in anchored:
                getattr(pattern, method)(subject)
        else:  # every start position, as search, findall, finditer, sub and split try
            for _ in pattern.finditer(subject):
                pass
            pattern.sub(type(subject)(), subject)
        took = time.perf_counter() - start
        slowest = max(slowest, (took, f"{where} on input {i}"))
from atrium.ingestion import detect, extract
from atrium.ingestion.exceptions import BadDocument
for text in INPUTS:
    data = text.encode("utf-8")
    extract.markdown_title(text)
    detect.fallback_title(data)
    detect._looks_like_markdown(text)
    try:
        kind = detect.detect(data)
        extract.extract(data, detect.MARKDOWN if kind == detect.MARKDOWN else detect.TEXT)
    except BadDocument:
        pass
print("slowest", round(slowest[0], 3), slowest[1])
print("done")
"""
)


def test_every_regex_in_src_runs_in_linear_time_on_1_mb_adversarial_inputs() -> None:
    found, opaque = _patterns_in_src()
    assert not opaque, f"give re a literal pattern so this test covers it: {opaque}"
    files = {where.split(":")[0] for where, _, _, _ in found}
    # The ones user text reaches (uploads, chunks quoted in answers, LLM output), among others.
    assert {
        "atrium/ingestion/detect.py",
        "atrium/ingestion/extract.py",
        "atrium/llm/extractive.py",
        "atrium/llm/service.py",
    } <= files
    payload = [
        (
            where,
            source.decode("latin-1") if isinstance(source, bytes) else source,
            flags,
            anchored,
            isinstance(source, bytes),
        )
        for where, source, flags, anchored in found
    ]
    # Linear: ~40 inputs of 1 MB per pattern take seconds in all. A super-linear pattern does
    # not finish (the old title pattern: 3 s on 1 KB, 18 s on 2 KB, ~n³), so the bound below
    # only says "finished", with a wide margin for a loaded machine.
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=240,  # under pytest-timeout's 300 s, so a hang fails here, with this message
        cwd=SRC.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("done"), result.stdout


def test_markdown_title_keeps_its_meaning() -> None:
    assert extract.markdown_title("intro\n# Guide\n## Part") == "Guide"
    assert extract.markdown_title("## Closing hashes ##  \nx") == "Closing hashes"
    assert extract.markdown_title("# C# in depth\n") == "C# in depth"
    assert extract.markdown_title("   ### Indented\n") == "Indented"
    assert extract.markdown_title("#######  seven\n# # #\n# real") == "#"
    assert extract.markdown_title("#hashtag\n    # code") is None
    assert extract.markdown_title("# a" + " " * _MB + "b") == "a b"


# Upload checks are bounded -----------------------------------------------------------------------


def docx_bomb(inflated: int = 200 * 1024 * 1024) -> bytes:
    """A real DOCX whose document links an image part of ``inflated`` zero bytes (~240 KB
    compressed for 200 MB). Linked, so python-docx loads it (it loads every related part)."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(make_docx())) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb,
    ):
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "[Content_Types].xml" and b'Extension="png"' not in data:
                data = data.replace(
                    b"<Default ", b'<Default Extension="png" ContentType="image/png"/><Default ', 1
                )
            if info.filename == "word/_rels/document.xml.rels":
                data = data.replace(
                    b"</Relationships>",
                    b'<Relationship Id="rIdBomb" Type="http://schemas.openxmlformats.org/'
                    b'officeDocument/2006/relationships/image" Target="media/bomb.png"/>'
                    b"</Relationships>",
                )
            bomb.writestr(info, data)
        with bomb.open("word/media/bomb.png", "w") as part:
            block = b"\0" * (1024 * 1024)
            for _ in range(inflated // len(block)):
                part.write(block)
    return out.getvalue()


def blank_pdf(pages: int) -> bytes:
    """A real PDF (reportlab) of ``pages`` pages without text."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    for _ in range(pages):
        pdf.line(100, 100, 200, 200)
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def test_the_upload_check_reads_a_zip_directory_without_inflating() -> None:
    assert detect.inspect_upload(docx_bomb(), None) == detect.DOCX
    # A directory announcing more parts than any Word file is refused from its last bytes.
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as archive:
        archive.writestr("word/document.xml", b"<w/>")
        for i in range(zipdir.MAX_ZIP_ENTRIES):
            archive.writestr(f"p/{i}", b"")
    with pytest.raises(BadDocument) as info:
        detect.inspect_upload(many.getvalue(), None, "File 'x'")
    assert info.value.status_code == 422 and "parts" in info.value.message


# Crafted ZIP directories (the reviewer's files, built here) -----------------------------------

_NAME = b"word/document.xml"
_LOCAL = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(_NAME), 0) + _NAME


def _cd_record(name: bytes, version: int = 20) -> bytes:
    """A central directory record (46 bytes and the name) for a stored, empty part."""
    return (
        struct.pack(
            "<4s6H3I5H2I",
            b"PK\x01\x02",
            20,
            version,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            len(name),
            0,
            0,
            0,
            0,
            0,
            0,
        )
        + name
    )


def _end_record(entries: int, directory: bytes, offset: int) -> bytes:
    return struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, entries, entries, len(directory), offset, 0)


def understated_directory_zip(entries: int = 200_000) -> bytes:
    """A ZIP whose end record announces 1 entry while its directory (whose real size the end
    record gives) holds ``entries``, ``word/document.xml`` first: ~10 MB for 200,000, which
    ``zipfile`` turns into 200,000 objects (+95 MB, over a second)."""
    directory = b"".join(_cd_record(_NAME if i == 0 else b"%x" % i) for i in range(entries))
    return _LOCAL + directory + _end_record(1, directory, len(_LOCAL))


def future_version_zip() -> bytes:
    """A ZIP whose one entry needs format version 6.4: ``zipfile`` raises NotImplementedError."""
    directory = _cd_record(_NAME, version=64)
    return _LOCAL + directory + _end_record(1, directory, len(_LOCAL))


def bogus_zip64_locator_zip() -> bytes:
    """A ZIP64 locator whose disk field spells the ZIP64 record's signature and whose offset
    points at it: the old count lookup read past the end (struct.error)."""
    at = len(_LOCAL) + 20
    locator = b"PK\x06\x07" + b"PK\x06\x06" + struct.pack("<QI", at - 16, 1)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0)
    return _LOCAL + locator + end


class _CountingZipInfo(zipfile.ZipInfo):
    """zipfile's per-entry object, counted (zipfile builds one per directory record)."""

    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made += 1
        super().__init__(*args, **kwargs)


def test_an_end_record_understating_the_directory_is_refused_in_bounded_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = understated_directory_zip()
    assert len(data) > 10 * _MB
    monkeypatch.setattr(zipfile, "ZipInfo", _CountingZipInfo)
    _CountingZipInfo.made = 0
    baseline = _rss_bytes()
    tracemalloc.start()
    try:
        with _PeakRSS() as rss, pytest.raises(BadDocument) as info:
            detect.inspect_upload(data, None, "File 'x'")
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status_code == 422
    assert "more than 5,000 parts" in info.value.message, info.value.message
    # The old check trusted the end record's count and let zipfile build the whole directory:
    # 200,000 objects, +95 MB. The walk stops at the first record past the limit.
    assert _CountingZipInfo.made <= zipdir.MAX_ZIP_ENTRIES + 1, _CountingZipInfo.made
    assert traced_peak < 20 * 1024 * 1024, traced_peak / 2**20
    assert rss.peak - baseline < 20 * 1024 * 1024, (rss.peak - baseline) / 2**20
    # The worker's check walks the same way before zipfile opens the file.
    _CountingZipInfo.made = 0
    with pytest.raises(BadDocument) as info:
        extract.check_zip_parts(data, "File 'x'", extract.Limits())
    assert "more than 5,000 parts" in info.value.message
    assert _CountingZipInfo.made == 0


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        # H2: the directory's 200,000 records are never all read.
        ("many.docx", understated_directory_zip, "more than 5,000 parts"),
        # H3: zipfile's NotImplementedError and the old lookup's struct.error were 500s.
        ("v64.docx", future_version_zip, "version 6.4"),
        ("zip64.docx", bogus_zip64_locator_zip, "damaged"),
    ],
    ids=["understated-directory", "format-version-64", "bogus-zip64-locator"],
)
async def test_crafted_zip_directories_get_a_422_on_upload_not_a_500(
    app: Any, client: httpx.AsyncClient, name: str, make: Any, words: str
) -> None:
    ctx = await setup_tenant(app, client)
    r = await upload_files(client, ctx, [(name, make(), None)])
    assert r.status_code == 422, (r.status_code, r.text)
    detail = str(r.json()["detail"])
    assert f"File '{name}'" in detail and words in detail, r.json()
    r = await client.get(ctx.docs, headers=ctx.headers)
    assert r.json()["total"] == 0


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _PeakRSS:
    """The highest resident size of this process (the in-process API) while it runs."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


async def test_hostile_uploads_leave_the_api_answering_and_small(
    app: Any, client: httpx.AsyncClient
) -> None:
    ctx = await setup_tenant(app, client)
    hostile = [
        # The ReDoS (``# a`` + spaces + ``b``) at 2.5 KB: ~30 s of CPU for the old title
        # regex (~n³: the report's 5 KB took minutes), a thread-pool thread held all along.
        ("redos.md", ("# a" + " " * 2500 + "b").encode(), None),
        ("bomb.docx", docx_bomb(), None),
        ("blank.pdf", blank_pdf(3000), None),
    ]
    baseline = _rss_bytes()
    latencies: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            r = await client.get("/healthz")
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 200
            await asyncio.sleep(0.02)

    took: dict[str, float] = {}

    async def upload(file: tuple[str, bytes, str | None]) -> httpx.Response:
        start = time.perf_counter()
        response = await upload_files(client, ctx, [file])
        took[file[0]] = time.perf_counter() - start
        return response

    with _PeakRSS() as rss:
        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        try:
            responses = await asyncio.gather(*(upload(file) for file in hostile))
        finally:
            done.set()
            await prober
    for r in responses:
        assert r.status_code == 202, r.text
        assert r.json()["documents"][0]["status"] == "queued"
    # The bounds the issue sets for the API while hostile files arrive: /healthz within a
    # second, resident memory up by less than 150 MB, and each upload answered fast (sniffing
    # is linear: milliseconds here; the bound is wide for a loaded machine).
    assert latencies and max(latencies) < 1.0, max(latencies)
    assert rss.peak - baseline < 150 * 1024 * 1024, (rss.peak - baseline) / 2**20
    assert max(took.values()) < 5.0, took


# The worker: a real one, with the ONNX model loaded ---------------------------------------------


async def test_hostile_documents_fail_with_a_reason_and_the_worker_goes_on(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    attacker = await setup_tenant(app, client, "Attacker")
    victim = await setup_tenant(app, client, "Victim")
    r = await upload_files(
        client,
        attacker,
        [
            ("bomb.docx", docx_bomb(), None),
            ("blank.pdf", blank_pdf(2500), None),
            ("redos.md", ("# a" + " " * _MB + "b\n\n" + prose(50)).encode(), None),
        ],
    )
    assert r.status_code == 202, r.text
    bomb, pdf, redos = r.json()["documents"]
    # Named after their files until read.
    assert [bomb["title"], pdf["title"], redos["title"]] == ["bomb.docx", "blank.pdf", "redos.md"]
    # The victim's document is queued behind the attacker's, on the same worker.
    r = await client.post(
        victim.docs, json={"text": "# Victim notes\n\n" + prose(80)}, headers=victim.headers
    )
    assert r.status_code == 202, r.text
    victim_doc = r.json()["documents"][0]
    assert victim_doc["title"] == "# Victim notes"

    failed = await wait_document(client, attacker, bomb["id"])
    assert failed["status"] == "failed", failed
    assert "ZIP bomb" in failed["error"] and "compressed more than" in failed["error"]
    failed = await wait_document(client, attacker, pdf["id"])
    assert failed["status"] == "failed", failed
    assert "has 2500 pages" in failed["error"] and "Split it" in failed["error"]
    ready = await wait_document(client, attacker, redos["id"])
    assert ready["status"] == "ready", ready
    assert ready["title"] == "a b"
    # A bad document is not retried: one run each.
    assert failed["attempts"] == 1

    final = await wait_document(client, victim, victim_doc["id"])
    assert final["status"] == "ready", final
    assert final["title"] == "Victim notes" and final["chunk_count"] >= 1


def _understated(data: bytes) -> bytes:
    """The same ZIP with the central directory saying its largest part inflates to 1 KB."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        size = int.from_bytes(out[at + 24 : at + 28], "little")
        if size > 1024 * 1024:
            out[at + 24 : at + 28] = (1024).to_bytes(4, "little")
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def _limits(seconds: float = 60, memory_mb: int = 1024) -> sandbox.SandboxLimits:
    return sandbox.SandboxLimits(
        seconds=seconds, memory_bytes=memory_mb * 1024 * 1024, extract=extract.Limits()
    )


@pytest.fixture(scope="module")
def onnx_loaded(settings: Any) -> Any:
    """This process with the worker's ONNX embedder loaded and used, as a worker child is."""
    from atrium.ingestion.tools import worker_tools

    tools = worker_tools(settings)
    tools.embedder.embed(["warm the model up"])
    return tools


# HTML of a million tags: a few MB that take seconds and hundreds of MB for BeautifulSoup.
HEAVY_HTML = b"<html><body>" + b"<p>a</p>" * 1_000_000 + b"</body></html>"


def test_sandbox_memory_limit_holds_with_the_onnx_model_loaded(onnx_loaded: Any) -> None:
    # The ONNX model is loaded here (as in a worker) but the child starts from the reader server,
    # so it does not count. What a child needs to read ordinary documents fits 128 MB beyond
    # what it starts with...
    docx = sandbox.extract_isolated(make_docx(paragraphs=200), detect.DOCX, _limits(memory_mb=128))
    assert docx.title == "Travel policy"
    # ...and a document that needs more fails with the reason, the worker untouched.
    with pytest.raises(BadDocument) as info:
        # A generous time limit (on a loaded machine the parse could otherwise hit it first),
        # kept under pytest's own timeout: a child that hangs fails this test, not the run.
        sandbox.extract_isolated(
            HEAVY_HTML, detect.HTML, _limits(seconds=200, memory_mb=128), "File 'x'"
        )
    # Out of memory shows as a MemoryError in Python code or as an abort (SIGABRT) in a C
    # parser, depending on where the allocation fails: the reason names the memory either way.
    assert "more than 128 MB of memory" in info.value.message
    assert info.value.message.startswith("File 'x'")
    onnx_loaded.embedder.embed(["the worker still embeds"])


def test_sandbox_time_limit_kills_a_slow_parse(onnx_loaded: Any) -> None:
    start = time.monotonic()
    with pytest.raises(BadDocument) as info:
        sandbox.extract_isolated(HEAVY_HTML, detect.HTML, _limits(seconds=0.5), "File 'x'")
    assert "took longer than" in info.value.message and "split it" in info.value.message
    # Killed at the deadline, not left to finish (generous: the parse alone takes seconds).
    assert time.monotonic() - start < 30


def test_sandbox_reports_a_zip_bomb_and_a_too_long_pdf() -> None:
    with pytest.raises(BadDocument) as info:
        sandbox.extract_isolated(docx_bomb(), detect.DOCX, _limits(), "File 'x'")
    assert "ZIP bomb" in info.value.message
    small = extract.Limits(max_inflated_bytes=1024 * 1024)
    with pytest.raises(BadDocument) as info:
        extract.check_zip_parts(docx_bomb(2 * 1024 * 1024), "File 'x'", small)
    assert "(at most 1,048,576)" in info.value.message
    # A directory that lies about a part's size (small declared, 8 MB real) is caught while
    # inflating, never trusted.
    with pytest.raises(BadDocument) as info:
        extract.check_zip_parts(_understated(docx_bomb(8 * 1024 * 1024)), "File 'x'", small)
    assert "damaged" in info.value.message or "ZIP bomb" in info.value.message
    with pytest.raises(BadDocument) as info:
        extract.extract(blank_pdf(30), detect.PDF, "File 'x'", extract.Limits(max_pdf_pages=20))
    assert "has 30 pages; at most 20" in info.value.message


# The sandbox's child: answers only when it finished, holds no other socket, never outlives a call,
# and starts from the reader server, never from the worker: nothing of the worker's reaches it ----

_FAULTS = "tests.support.sandbox_faults"


def _server_with(fault: str) -> sandbox.ReaderServer:
    """A reader server whose children run the real sandbox with one step replaced (the server is
    a fresh interpreter: a fault is installed there, not monkeypatched here)."""
    return sandbox.ReaderServer(preload=[*sandbox.PARSERS, f"{_FAULTS}:{fault}"])


def test_a_child_killed_mid_answer_fails_the_document_instead_of_truncating_it() -> None:
    text = ("word " * 200_000).encode()  # 1 MB: far more than one socket buffer
    # Each child sends half its answer and is killed, as the kernel's OOM killer would.
    with _server_with("kill_mid_answer") as server, pytest.raises(BadDocument) as info:
        server.extract(text, detect.TEXT, _limits(), "File 'x'")
    assert "stopped the document reader (SIGKILL)" in info.value.message, info.value.message


def _wait_for(path: Path, seconds: float = 60) -> int:
    """The pid a gated child wrote to ``path`` (it writes a file whole, then renames it)."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), "the child never started"
    return int(path.read_text())


def test_a_child_holds_no_other_documents_socket(tmp_path: Path) -> None:
    gate, pid_file = tmp_path / "gate", tmp_path / "pid"
    order = json.dumps({"gate": str(gate), "pid": str(pid_file)}).encode()
    result: list[Any] = []
    with _server_with("gated_extract") as server:
        # A document whose child is still parsing when the next one is read (a threaded pool).
        slow = threading.Thread(
            target=lambda: result.append(server.extract(order, detect.TEXT, _limits(120)))
        )
        try:
            slow.start()
            _wait_for(pid_file)
            # The next document's answer ends when its own child exits, not when the slow one
            # does: no child holds another document's socket (its deadline is far off, so a
            # read that waited for the slow child would show here as a slow call).
            start = time.monotonic()
            assert server.extract(b"words", detect.TEXT, _limits(60)).text == "words"
            assert time.monotonic() - start < 30
            assert slow.is_alive()
        finally:
            gate.touch()
            slow.join(60)
    assert result and result[0].text == "opened"


def test_an_interrupted_read_kills_and_reaps_the_child(tmp_path: Path) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    gate, pid_file = tmp_path / "gate", tmp_path / "pid"
    order = json.dumps({"gate": str(gate), "pid": str(pid_file)}).encode()

    def soft_time_limit(*_: Any) -> None:
        # Celery raises its soft time limit from a signal handler; raise it once the child
        # runs, i.e. while the worker waits for its answer.
        if pid_file.exists():
            # Armed again first: Python ignores an exception raised where it cannot propagate
            # (an at-fork handler, a finalizer), and the read would then wait its whole limit;
            # this second signal, long after, raises it again.
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            raise SoftTimeLimitExceeded()
        signal.setitimer(signal.ITIMER_REAL, 0.02)

    pid = 0
    with _server_with("gated_extract") as server:
        server.extract(b"started", detect.TEXT, _limits())  # the server's start is not timed
        previous = signal.signal(signal.SIGALRM, soft_time_limit)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            with pytest.raises(SoftTimeLimitExceeded):
                server.extract(order, detect.TEXT, _limits(seconds=120))
            pid = int(pid_file.read_text())
            # Killed and reaped before the call returned: the pid names no process (a running
            # child or a zombie still would).
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            pid = 0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            gate.touch()
            if pid:  # a child left running: end it here
                os.kill(pid, signal.SIGKILL)


_READ_AND_WAIT = """
import sys
from atrium.ingestion import detect, extract, sandbox
limits = sandbox.SandboxLimits(seconds=120, memory_bytes=1 << 30, extract=extract.Limits())
server = sandbox.ReaderServer(preload=["tests.support.sandbox_faults:gated_extract"])
server.extract(sys.argv[1].encode(), detect.TEXT, limits)
"""


def test_a_child_does_not_outlive_a_worker_that_died(tmp_path: Path) -> None:
    gate, pid_file = tmp_path / "gate", tmp_path / "pid"
    order = json.dumps({"gate": str(gate), "pid": str(pid_file)})
    worker = subprocess.Popen(
        [sys.executable, "-c", _READ_AND_WAIT, order], cwd=SRC.parent, env=os.environ.copy()
    )
    try:
        pid = _wait_for(pid_file)
        # The worker process is killed (the kernel's OOM killer, Celery's hard time limit)
        # while its document is read: the watcher sees its socket close and kills the child.
        worker.kill()
        worker.wait(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the child outlived its worker")
    finally:
        gate.touch()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def test_no_lock_held_by_a_worker_thread_reaches_the_child() -> None:
    # The hang this design removes: a child forked from the worker copies each lock as it is
    # at the fork, held by threads that do not exist in the child. Here another worker thread
    # holds a lock for the whole read, and each child takes the lock of the same name: a fork
    # of this process would wait for it until the deadline (and did, before the reader server).
    from tests.support import sandbox_faults

    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with sandbox_faults.HELD:
            taken.set()
            done.wait(120)

    holder = threading.Thread(target=hold)
    with _server_with("locked_extract") as server:
        holder.start()
        try:
            assert taken.wait(60)
            start = time.monotonic()
            assert server.extract(b"words", detect.TEXT, _limits(seconds=60)).text == "words"
            assert time.monotonic() - start < 30
        finally:
            done.set()
            holder.join(60)


def test_the_child_starts_without_the_workers_threads_settings_or_model(
    onnx_loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATRIUM_SECRET_KEY", "a secret of the worker")
    with _server_with("probe") as server:
        seen = json.loads(server.extract(b"-", detect.TEXT, _limits()).text)
        # The server runs no thread besides its main one (a fork of it holds no lock), ...
        assert server.pid is not None
        tasks = Path(f"/proc/{server.pid}/task")
        if tasks.exists():
            assert len(list(tasks.iterdir())) == 1
    # ...and its children see none of the worker's settings, nor its model.
    assert not [name for name in seen["environment"] if name.startswith("ATRIUM_")], seen
    assert "onnxruntime" not in seen["modules"]
    assert {"bs4", "pypdf", "docx"} <= set(seen["modules"])  # imported once, by the server


def test_the_reader_server_is_started_again_when_it_died() -> None:
    docx = make_docx(paragraphs=5)
    server = sandbox.reader_server()
    assert sandbox.extract_isolated(docx, detect.DOCX, _limits()).title == "Travel policy"
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    # The next document is read by a new server, not failed.
    assert sandbox.extract_isolated(docx, detect.DOCX, _limits()).title == "Travel policy"
    assert server.pid not in (None, first)
    # One that cannot be started is no fault of the document: the task retries it later.
    from atrium.ingestion import faults

    unavailable = sandbox.SandboxUnavailable("the document reader is not available (test)")
    assert faults.is_transient(unavailable)
    assert faults.public_reason(unavailable) == "the document reader was unavailable"


def test_concurrent_reads_from_threads_while_the_model_embeds(onnx_loaded: Any) -> None:
    documents = [make_docx(paragraphs=n) for n in range(5, 13)]
    stop = threading.Event()

    def embed() -> None:
        while not stop.is_set():
            onnx_loaded.embedder.embed(["the worker embeds while documents are read"] * 8)

    embedder = threading.Thread(target=embed)
    embedder.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            titles = list(
                pool.map(
                    lambda data: (
                        sandbox.extract_isolated(data, detect.DOCX, _limits(seconds=120)).title
                    ),
                    documents,
                )
            )
    finally:
        stop.set()
        embedder.join(60)
    assert titles == ["Travel policy"] * 8
