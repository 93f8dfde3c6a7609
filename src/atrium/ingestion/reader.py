"""The reader server's side of the extraction sandbox: the server, its watchers and children.

This runs in the reader server (a fresh, single-threaded interpreter the worker starts, see
:mod:`atrium.ingestion.sandbox`, which holds the worker's side and the protocol) and in the
processes it forks: a watcher per document, and the child that reads the document under its
limits. Nothing here runs in the worker, and nothing here is measured by coverage (other
processes).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import resource
import select
import signal
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from atrium.ingestion import extract as extraction
from atrium.ingestion.exceptions import BadDocument

#: How much is read or written per system call.
READ_SIZE = 1024 * 1024
#: The child's whole answer when it ran out of memory.
MEMORY_PAYLOAD = b'{"memory": true}\n'
#: A pid, a wait status or a header's length, as the sockets carry them.
INT64 = struct.Struct("!q")
#: ``prctl(2)``'s option that marks a process as not dumpable (no core file).
_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds of one document's extraction.

    Attributes:
        seconds: wall-clock time before the child is killed.
        memory_bytes: memory the child may allocate beyond what it started with.
        extract: the parsing limits (PDF pages, DOCX inflated bytes).
    """

    seconds: float
    memory_bytes: int
    extract: extraction.Limits


def serve(control_fd: int, preload: Sequence[str]) -> NoReturn:  # pragma: no cover
    """The reader server: a watcher forked per request, until the worker closes its socket.

    ``preload`` names modules to import first, or ``module:function`` to call one too (the
    tests' faults).
    """
    for name in preload:
        module, _, function = name.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    # The kernel reaps its watchers. A Ctrl-C at the worker's terminal reaches this process too:
    # it leaves when the worker closes the socket, never before.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1, 2)
        if not message:  # every copy of the worker's end is closed: the worker is gone
            os._exit(0)
        if len(fds) == 2:
            try:
                pid = os.fork()
            except OSError:  # the worker sees the status socket close before any report
                pid = -1
            if pid == 0:
                control.close()
                _watch(fds[0], fds[1])
        for fd in fds:
            os.close(fd)


def _watch(status_fd: int, data_fd: int) -> NoReturn:  # pragma: no cover
    """Fork the child; send its pid, then its wait status; kill it if the worker gives up."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process reaps its child itself
        _close_inherited_fds(status_fd, data_fd)
        alive_r, alive_w = os.pipe()  # end of file on alive_r: the child exited
        pid = os.fork()
        if pid == 0:
            os.close(status_fd)
            os.close(alive_r)
            _run_child(data_fd, alive_w)
        os.close(alive_w)
        os.close(data_fd)
        status = socket.socket(fileno=status_fd)
        with contextlib.suppress(OSError):  # the worker is gone: the wait below kills the child
            status.sendall(INT64.pack(pid))
        ready, _, _ = select.select([alive_r, status_fd], [], [])
        if alive_r not in ready:
            # The worker shut its side down or exited. Not reaped yet, the child still owns
            # this pid even if it exited just now.
            os.kill(pid, signal.SIGKILL)
        _, wait_status = os.waitpid(pid, 0)
        status.sendall(INT64.pack(wait_status))
        code = 0
    finally:
        os._exit(code)


def _run_child(fd: int, alive_fd: int) -> NoReturn:  # pragma: no cover
    code = 1
    try:
        _close_inherited_fds(fd, alive_fd)
        header, data = _read_request(fd)
        limits = SandboxLimits(
            seconds=float(header["seconds"]),
            memory_bytes=int(header["memory_bytes"]),
            extract=extraction.Limits(**header["extract"]),
        )
        # Objects from the server are never collected here: nothing of theirs is needed.
        gc.freeze()
        _limit_child(limits)
        payload = _child_payload(data, str(header["content_type"]), str(header["label"]), limits)
        try:
            _write_all(fd, payload)
        except MemoryError:
            _write_all(fd, MEMORY_PAYLOAD)
        code = 0
    finally:
        os._exit(code)


def _read_request(fd: int) -> tuple[dict[str, Any], bytes]:  # pragma: no cover
    raw = _read_to_end(fd)
    (size,) = INT64.unpack_from(raw)
    header: dict[str, Any] = json.loads(raw[INT64.size : INT64.size + size])
    return header, raw[INT64.size + size :]


def _read_to_end(fd: int) -> bytes:  # pragma: no cover
    parts: list[bytes] = []
    while piece := os.read(fd, READ_SIZE):
        parts.append(piece)
    return b"".join(parts)


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


def _limit_child(limits: SandboxLimits) -> None:  # pragma: no cover
    # No core dump: on a host whose core_pattern pipes dumps to a collector (systemd-coredump,
    # apport) RLIMIT_CORE does not apply, and a crashed child could sit in its dump past its
    # deadline; a process that is not dumpable is never dumped.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    mapped = _mapped_bytes()
    if mapped:
        cap = mapped + limits.memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # A forked child starts with no CPU time used: this bounds a parse that spins even if it
    # could not be killed in time.
    cpu = int(limits.seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _child_payload(data: bytes, content_type: str, label: str, limits: SandboxLimits) -> bytes:
    try:
        result = extraction.extract(data, content_type, label, limits.extract)
        header = {"markdown": result.markdown, "title": result.title, "pages": result.pages}
        return json.dumps(header).encode("ascii") + b"\n" + result.text.encode("utf-8", "replace")
    except MemoryError:
        return MEMORY_PAYLOAD
    except BadDocument as exc:
        return json.dumps({"bad": exc.message, "status": exc.status_code}).encode("ascii") + b"\n"
    except Exception as exc:  # a parser's own bug on a crafted file: this document fails
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}).encode("ascii") + b"\n"


def _write_all(fd: int, payload: bytes) -> None:  # pragma: no cover
    view = memoryview(payload)
    while view:
        written = os.write(fd, view[:READ_SIZE])
        view = view[written:]


def _close_inherited_fds(*keep: int) -> None:  # pragma: no cover
    """Close every descriptor but stdio and ``keep``: no other document's socket stays open
    here (its reader would not see the end of its answer while this process lives)."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())


def _max_fd() -> int:  # pragma: no cover
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limit if limit != resource.RLIM_INFINITY else 1 << 20
