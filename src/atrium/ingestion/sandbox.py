"""Extract a document in a child process with a memory and a time limit.

Parsing untrusted PDF, DOCX and HTML is where a crafted file hurts: a ZIP or stream bomb that
inflates to gigabytes, a page tree that takes minutes, a parser bug that crashes. So the worker
never parses a document itself: it forks a child that runs :func:`extract.extract` under

* ``RLIMIT_AS`` = the address space the worker already had + ``memory_bytes`` (the child
  inherits the worker's mappings, the ONNX model included, copy-on-write, so a limit relative
  to what is mapped at the fork is what bounds *new* allocations; measured in
  tests/ingestion/test_untrusted_files.py), and ``RLIMIT_CPU`` as a second bound on time;
* a wall-clock deadline, after which the worker kills it (``SIGKILL``).

Whatever happens in the child (``MemoryError``, a crash, the deadline) fails this one document
with a reason a person can act on; the worker process, its pool and other tenants' documents go
on. A fork costs milliseconds and needs no import (a fresh interpreter would cost a second of
imports per document), and works the same under every Celery pool (prefork, solo, threads).

The child sends back a small JSON header and the text as UTF-8; nothing it sends is unpickled.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from atrium.ingestion import extract as extraction
from atrium.ingestion.exceptions import BadDocument

_READ = 1024 * 1024
_MEMORY_PAYLOAD = b'{"memory": true}\n'


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds of one document's extraction.

    Attributes:
        seconds: wall-clock time before the child is killed.
        memory_bytes: memory the child may allocate beyond what it inherited.
        extract: the parsing limits (PDF pages, DOCX inflated bytes).
    """

    seconds: float
    memory_bytes: int
    extract: extraction.Limits


def _mapped_bytes() -> int:
    """This process's current address space (``VmSize``), 0 when unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _limit_child(limits: SandboxLimits) -> None:
    # The worker's signal handlers (Celery's shutdown, time limits) must not run in the child.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    mapped = _mapped_bytes()
    if mapped:
        cap = mapped + limits.memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # A forked child starts with no CPU time used: this bounds a parse that spins even if the
    # parent could not kill it in time.
    cpu = int(limits.seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _child_payload(data: bytes, content_type: str, label: str, limits: SandboxLimits) -> bytes:
    try:
        result = extraction.extract(data, content_type, label, limits.extract)
        header = {"markdown": result.markdown, "title": result.title, "pages": result.pages}
        return json.dumps(header).encode("ascii") + b"\n" + result.text.encode("utf-8", "replace")
    except MemoryError:
        return _MEMORY_PAYLOAD
    except BadDocument as exc:
        return json.dumps({"bad": exc.message, "status": exc.status_code}).encode("ascii") + b"\n"
    except Exception as exc:  # a parser's own bug on a crafted file: this document fails
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}).encode("ascii") + b"\n"


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(fd, view[:_READ])
        view = view[written:]


def _close_inherited_fds(keep: int) -> None:
    """Close every descriptor the fork copied except stdio and the child's own pipe.

    Under a threaded pool another document's pipe may be open in the worker at the fork: a
    child holding its write end would keep that document's reader from ever seeing the end of
    its output (and a long parse here would stall it to its deadline).
    """
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())


def _max_fd() -> int:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit if limit != resource.RLIM_INFINITY else 1 << 20


def _fresh_stdio() -> None:
    """Give the child standard streams of its own.

    The fork copies the worker's ``sys.stdout``/``sys.stderr`` with their buffer locks, and a
    lock held by another worker thread at the fork is held forever here. Python's fatal-error
    path (out of memory while raising ``MemoryError``, the very case the memory limit provokes)
    flushes both streams before it aborts: with an inherited lock the child would hang to its
    deadline instead of dying at once.
    """
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            stream: Any = os.fdopen(fd, "w", closefd=False)
        except OSError:  # a worker started without the descriptor: nothing to print to
            stream = None
        setattr(sys, name, stream)


def _run_child(fd: int, data: bytes, content_type: str, label: str, limits: SandboxLimits) -> None:
    code = 1
    try:
        _fresh_stdio()
        _close_inherited_fds(fd)
        # Objects inherited from the worker are never collected here: their finalizers (open
        # connections, pools) belong to the parent.
        gc.freeze()
        _limit_child(limits)
        payload = _child_payload(data, content_type, label, limits)
        try:
            _write_all(fd, payload)
        except MemoryError:
            _write_all(fd, _MEMORY_PAYLOAD)
        code = 0
    finally:
        os._exit(code)


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything the child writes, or None when the deadline passes first."""
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        piece = os.read(fd, _READ)
        if not piece:
            return b"".join(parts)
        parts.append(piece)


def _kill_unreaped(pid: int) -> None:
    """Kill and reap a child this process may not have reaped yet (an exception interrupted).

    ``waitpid`` first: once reaped, the id may belong to another process, which must not be
    killed (waitpid on it fails, as it is not this process's child).
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def _reap(pid: int, deadline: float) -> int | None:
    """The child's wait status; kills it when it outlives the deadline."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def _decode(raw: bytes, label: str, limits: SandboxLimits) -> extraction.Extracted:
    head, _, body = raw.partition(b"\n")
    header: dict[str, Any] = json.loads(head)
    if header.get("memory"):
        raise BadDocument(_memory_message(label, limits))
    if "bad" in header:
        raise BadDocument(str(header["bad"]), int(header.get("status", 422)))
    if "error" in header:
        raise BadDocument(
            f"{label} could not be read ({header['error']}); it may be damaged: save or export "
            "it again and upload the new file"
        )
    return extraction.Extracted(
        text=body.decode("utf-8", "replace"),
        markdown=bool(header.get("markdown")),
        title=header.get("title"),
        pages=header.get("pages"),
    )


def _memory_message(label: str, limits: SandboxLimits) -> str:
    return (
        f"{label} needs more than {limits.memory_bytes // (1024 * 1024)} MB of memory to read "
        "(a file this size should not: it may be a decompression bomb or damaged). Split it or "
        "save it again, and upload the new file"
    )


def extract_isolated(
    data: bytes, content_type: str, limits: SandboxLimits, label: str = "The document"
) -> extraction.Extracted:
    """:func:`extract.extract` in a child process bounded in memory and time.

    Args:
        data: the stored bytes.
        content_type: the type found at upload.
        limits: memory, time and parsing bounds.
        label: how messages name the document.

    Raises:
        BadDocument: the document cannot be read, or needs more memory or time than allowed
            (the message says which and what to do).
    """
    if sys.platform == "win32":  # pragma: no cover - the worker runs on Linux and macOS
        return extraction.extract(data, content_type, label, limits.extract)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which leaves through os._exit
        _run_child(write_fd, data, content_type, label, limits)
    reaped = False
    try:
        os.close(write_fd)
        deadline = time.monotonic() + limits.seconds
        raw = _read_all(read_fd, deadline)
        status = _reap(pid, deadline if raw is not None else time.monotonic())
        reaped = True
    finally:
        os.close(read_fd)
        # Celery's soft time limit (or any exception) may interrupt the read: the child must not
        # outlive this call, still parsing, nor stay a zombie.
        if not reaped:
            _kill_unreaped(pid)
    if raw is None or status is None:
        raise BadDocument(
            f"{label} took longer than {limits.seconds:.0f} s to read, the most allowed per "
            "document; split it into smaller files (or, for a PDF, fewer pages) and upload those"
        )
    # Only a child that finished sent all of its answer: one killed mid-write (the kernel's
    # OOM killer, RLIMIT_CPU) may have sent a header and part of the text.
    if raw and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return _decode(raw, label, limits)
    return _stopped(status, label, limits)


def _stopped(status: int, label: str, limits: SandboxLimits) -> extraction.Extracted:
    """Raise the reason a child stopped without finishing its answer."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGXCPU:
            raise BadDocument(
                f"{label} took more than {limits.seconds:.0f} s of CPU time to read; split it "
                "into smaller files and upload those"
            )
        raise BadDocument(
            f"{label} stopped the document reader ({signal.Signals(signum).name}); it may be "
            "damaged or need more than "
            f"{limits.memory_bytes // (1024 * 1024)} MB of memory. Save it again or split it, "
            "and upload the new file"
        )
    raise BadDocument(
        f"{label} stopped the document reader (exit status {os.waitstatus_to_exitcode(status)}); "
        "it may be damaged: save it again and upload the new file"
    )
