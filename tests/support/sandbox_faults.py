"""Faults and probes for the extraction sandbox's reader server.

The server is a fresh interpreter: a test cannot monkeypatch it from its own process. It names
one of these functions in ``sandbox.ReaderServer(preload=[..., "tests.support.sandbox_faults:f"])``
and the server calls it once at its start, before it forks any child: each child then runs the
real sandbox code with that one step replaced.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from atrium.ingestion import extract, reader

#: Held by a thread of the test process in one test; the same name in the server is a new lock.
HELD = threading.Lock()


def kill_mid_answer() -> None:
    """Each child sends half its answer, then is killed (as the kernel's OOM killer would)."""

    def half_then_killed(fd: int, payload: bytes) -> None:
        os.write(fd, payload[: len(payload) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    reader._write_all = half_then_killed


def gated_extract() -> None:
    """A document ``{"gate": path, "pid": path}`` makes its child write its pid to ``pid`` and
    wait until ``gate`` exists; any other document is returned as its text."""

    def extract_when_opened(data: bytes, *_: Any) -> extract.Extracted:
        try:
            order = json.loads(data)
        except ValueError:
            return extract.Extracted(text=data.decode(), markdown=False)
        # Written whole, then renamed: a reader polling for the file never sees it empty.
        partial = Path(order["pid"] + ".part")
        partial.write_text(str(os.getpid()))
        os.replace(partial, order["pid"])
        while not Path(order["gate"]).exists():
            time.sleep(0.01)
        return extract.Extracted(text="opened", markdown=False)

    reader.extraction.extract = extract_when_opened


def locked_extract() -> None:
    """Each child takes :data:`HELD` before it answers with the document as its text."""

    def extract_under_lock(data: bytes, *_: Any) -> extract.Extracted:
        with HELD:
            return extract.Extracted(text=data.decode(), markdown=False)

    reader.extraction.extract = extract_under_lock


def probe() -> None:
    """Each child answers with what it holds: its environment's names, the modules loaded."""

    def report(*_: Any) -> extract.Extracted:
        seen = {"environment": sorted(os.environ), "modules": sorted(sys.modules)}
        return extract.Extracted(text=json.dumps(seen), markdown=False)

    reader.extraction.extract = report
