"""Extract a document in a child process with a memory and a time limit.

Parsing untrusted PDF, DOCX and HTML is where a crafted file hurts: a ZIP or stream bomb that
inflates to gigabytes, a page tree that takes minutes, a parser bug that crashes. So the worker
never parses a document itself: a child process runs :func:`extract.extract` under

* ``RLIMIT_AS`` = the address space the child has when it starts + ``memory_bytes`` (it starts
  as a copy of the reader server below, Python and the parsers, and then reads the document, so
  a limit relative to what is mapped then is what bounds *new* allocations; measured in
  tests/ingestion/test_untrusted_files.py), and ``RLIMIT_CPU`` as a second bound on time;
* a wall-clock deadline, after which it is killed (``SIGKILL``).

Whatever happens in the child (``MemoryError``, a crash, the deadline) fails this one document
with a reason a person can act on; the worker process, its pool and other tenants' documents go
on.

The children are not forked from the worker. The worker has threads (ONNX Runtime's pool, a
threaded Celery pool, clients' background threads), and a fork copies every lock as it is at
that instant, held or not, without the threads that would release them: a child that needs one
(to write to stderr, to import, in a C library on its out-of-memory path) waits for ever. Two
such hangs were found and patched one lock at a time; a third, seen under load, was not. Instead
each worker process starts a *reader server* on first use: a fresh interpreter (``python -I``,
an environment without the worker's settings) that imports this module and the parsers and
never starts a thread. For each document it forks a *watcher*, which forks the child, reports
the child's pid and wait status, and kills it when the worker gives up. A fork of a process
that has no other thread holds no lock. The server costs one interpreter start per worker
process (about a second, once); a document costs two forks of this small process (milliseconds)
and no import. The child holds no copy of the worker's memory either (other tenants' texts,
credentials, the model). It works the same under every Celery pool (prefork, solo, threads).

This module is the worker's side; :mod:`atrium.ingestion.reader` is what runs in the server,
the watcher and the child. Nothing the server, the watcher or the child sends is unpickled. Per
document:

* worker to server, on the server's socket: one byte carrying two descriptors, the far ends of
  this document's status and data sockets (the server closes its copies once it forked);
* worker to child, on the data socket: the header's length, a JSON header (type, label, limits)
  and the document's bytes, then end of file;
* child to worker, on the data socket: a JSON line and the text as UTF-8, then end of file;
* watcher to worker, on the status socket: the child's pid, then its wait status. When the
  worker shuts its side down (deadline, interrupted read) or exits, the watcher kills the child;
  it reaps the child itself, so no reused pid is ever signalled, and reports even then.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess  # nosec B404
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from atrium.ingestion import extract as extraction
from atrium.ingestion.exceptions import BadDocument
from atrium.ingestion.reader import INT64, READ_SIZE, SandboxLimits

__all__ = [
    "PARSERS",
    "ReaderServer",
    "SandboxLimits",
    "SandboxUnavailable",
    "extract_isolated",
    "reader_server",
]

#: How long the server may take to start and fork the watcher (an interpreter start and the
#: parsers' imports on a loaded machine), before the document's own time starts.
_START_SECONDS = 60.0
#: How long the worker waits for the watcher to confirm it killed and reaped the child.
_KILL_SECONDS = 10.0

#: Modules the reader server imports once, so that no child imports one (``extract`` imports
#: each parser on first use).
PARSERS = ("bs4", "pypdf", "docx")
#: What the reader server keeps of the worker's environment: none of its settings or secrets.
_ENVIRONMENT = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR"})


class SandboxUnavailable(OSError):
    """The reader server could not be started or reached.

    An ``OSError``, so the task retries it later (``ingestion.faults``): the document is not at
    fault.
    """


# In the worker ---------------------------------------------------------------------------------

_SERVER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from atrium.ingestion.reader import serve; serve(int(sys.argv[2]), json.loads(sys.argv[3]))"
)


class ReaderServer:
    """The process that forks the children reading documents (see the module's docstring).

    Started on first use and again if it died; thread-safe. It leaves when this object's socket
    is closed (:meth:`close`, or the worker's exit).

    Args:
        preload: modules the server imports before forking any child (``module:function``
            calls the function too).
    """

    def __init__(self, preload: Sequence[str] = PARSERS) -> None:
        self.preload = tuple(preload)
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id, None before it started."""
        return self._process.pid if self._process is not None else None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        environment = {
            key: value
            for key, value in os.environ.items()
            if key in _ENVIRONMENT or key.startswith("LC_")
        }
        arguments = [json.dumps(sys.path), str(theirs.fileno()), json.dumps(self.preload)]
        try:
            with theirs:
                self._process = subprocess.Popen(  # noqa: S603  # nosec B603
                    [sys.executable, "-I", "-c", _SERVER_CODE, *arguments],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env=environment,
                )
        except OSError as exc:
            ours.close()
            raise SandboxUnavailable(f"the document reader could not start: {exc}") from exc
        self._control = ours
        return ours

    def _stop_server(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def _send(
        self, fds: list[int], failed: subprocess.Popen[bytes] | None
    ) -> subprocess.Popen[bytes]:
        """Hand one request's far ends to the server; returns the server that got them.

        ``failed``: the server that lost this request's previous try, replaced unless another
        thread did so already.
        """
        with self._lock:
            if self._process is not None and (
                self._process is failed or self._process.poll() is not None
            ):
                self._stop_server()
            control = self._control or self._start()
            process = self._process
            assert process is not None
            try:
                socket.send_fds(control, [b"R"], fds)
            except OSError:  # it died since: the next try starts another
                self._stop_server()
                raise
            return process

    def close(self) -> None:
        """Stop the server (it lets running children finish)."""
        with self._lock:
            self._stop_server()

    def __enter__(self) -> ReaderServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def forget(self) -> None:
        """Drop this object's copy of the server's socket, without stopping the server (in a
        forked process, whose parent still uses it)."""
        if self._control is not None:
            self._control.close()
        self._control = None
        self._process = None
        self._lock = threading.Lock()

    def _connect(self) -> tuple[_Watcher, socket.socket]:
        """A watcher and its child for one document: its status and the child's data socket."""
        failed: subprocess.Popen[bytes] | None = None
        failure = ""
        for _ in range(2):
            status, status_far = socket.socketpair()
            data, data_far = socket.socketpair()
            try:
                with status_far, data_far:
                    failed = self._send([status_far.fileno(), data_far.fileno()], failed)
                watcher = _Watcher(status)
                if watcher.next(time.monotonic() + _START_SECONDS):
                    return watcher, data
                failure = f"no answer in {_START_SECONDS:.0f} s"
            except (OSError, EOFError) as exc:  # the server died before forking the watcher
                failure = str(exc) or type(exc).__name__
                if failed is not None and failed.poll() is not None:
                    failure += f"; it exited with status {failed.returncode}"
            except BaseException:  # interrupted (Celery's soft time limit): a watcher that
                status.close()  # reads the end of its socket kills its child
                data.close()
                raise
            status.close()
            data.close()
        raise SandboxUnavailable(f"the document reader is not available ({failure})")

    def extract(
        self, data: bytes, content_type: str, limits: SandboxLimits, label: str = "The document"
    ) -> extraction.Extracted:
        """:func:`extract.extract` in a child of this server, bounded in memory and time.

        See :func:`extract_isolated`, which reads with the worker process's own server.
        """
        header = json.dumps(
            {
                "content_type": content_type,
                "label": label,
                "seconds": limits.seconds,
                "memory_bytes": limits.memory_bytes,
                "extract": asdict(limits.extract),
            }
        ).encode("ascii")
        watcher, channel = self._connect()
        with watcher.sock:
            deadline = time.monotonic() + limits.seconds
            raw: bytes | None = None
            status: int | None = None
            try:
                with channel:
                    raw = _exchange(channel, [INT64.pack(len(header)), header, data], deadline)
                if raw is not None:
                    status = watcher.wait(deadline)
            finally:
                # At the deadline, or when something interrupts the read (Celery's soft time
                # limit): the watcher kills the child and reaps it before this call returns.
                if status is None:
                    watcher.stop()
        if raw is None or status is None:
            raise BadDocument(
                f"{label} took longer than {limits.seconds:.0f} s to read, the most allowed per "
                "document; split it into smaller files (or, for a PDF, fewer pages) and upload "
                "those"
            )
        # Only a child that finished sent all of its answer: one killed mid-write (the kernel's
        # OOM killer, RLIMIT_CPU) may have sent a header and part of the text.
        if raw and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return _decode(raw, label, limits)
        return _stopped(status, label, limits)


class _Watcher:
    """The worker's end of a watcher's status socket: the child's pid, then its wait status."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid: int | None = None
        self.status: int | None = None

    def next(self, deadline: float) -> bool:
        """Read the next number; False if the deadline passed first.

        Raises:
            EOFError: the watcher closed the socket first (it could not be started).
        """
        received = b""
        while len(received) < INT64.size:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                piece = self.sock.recv(INT64.size - len(received))
            except TimeoutError:
                return False
            if not piece:
                raise EOFError("the watcher stopped")
            received += piece
        (number,) = INT64.unpack(received)
        if self.pid is None:
            self.pid = number
        else:
            self.status = number
        return True

    def wait(self, deadline: float) -> int | None:
        """The child's wait status; None if the deadline passed first."""
        while self.status is None:
            if not self.next(deadline):
                return None
        return self.status

    def stop(self) -> None:
        """Have the watcher kill the child (if still running) and wait until it reaped it."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.wait(time.monotonic() + _KILL_SECONDS)
        except (OSError, EOFError):  # the watcher is gone, and so is its child
            pass


def _exchange(sock: socket.socket, request: list[bytes], deadline: float) -> bytes | None:
    """Send the request, then read the answer to its end; None if the deadline passed first."""
    try:
        for part in request:
            view = memoryview(part)
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(left)
                view = view[sock.send(view[:READ_SIZE]) :]
        sock.shutdown(socket.SHUT_WR)
    except TimeoutError:
        return None
    except (BrokenPipeError, ConnectionResetError):  # the child stopped: its status says how
        return b""
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            piece = sock.recv(READ_SIZE)
        except TimeoutError:
            return None
        except ConnectionResetError:  # killed with part of the request unread
            return b"".join(parts)
        if not piece:
            return b"".join(parts)
        parts.append(piece)


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


_default: ReaderServer | None = None
_default_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A forked worker (Celery's prefork pool) starts a server of its own on first use; the
    # lock copied from its parent may be held by a thread that is not here.
    global _default, _default_lock
    if _default is not None:
        _default.forget()
    _default = None
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def reader_server() -> ReaderServer:
    """This process's reader server (started on the first document)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ReaderServer()
            # Closed at exit, so the server leaves at once (it would anyway, on end of file).
            atexit.register(_default.close)
        return _default


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
        SandboxUnavailable: the reader server could not be started (retried later).
    """
    if sys.platform == "win32":  # pragma: no cover - the worker runs on Linux and macOS
        return extraction.extract(data, content_type, label, limits.extract)
    return reader_server().extract(data, content_type, limits, label)
