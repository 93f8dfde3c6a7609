"""A rerank HTTP server on loopback that stands in for paid rerank providers.

It answers Cohere's ``/v1/rerank`` and ``/v2/rerank``, Jina's and Voyage's ``/v1/rerank``: one
request shape, ``{"model", "query", "documents", "top_n"}`` (Voyage: ``top_k``), and one
response, ``{"id", "results": [{"index", "relevance_score"}], "meta"}``, with the same list
under ``"data"`` too (Voyage's key). Deterministic: a document scores the share of the query's
distinct words it contains; ties keep the documents' order. ``behaviour`` switches on failure
modes as in :mod:`tests.support.llm_server` (``status``, ``delay``, ``hold``), and ``results``
replaces the answer's results.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_WORD = re.compile(r"\w+")


def score(query: str, document: str) -> float:
    """The share of the query's distinct words that appear in ``document``."""
    wanted = set(_WORD.findall(query.lower()))
    if not wanted:
        return 0.0
    return len(wanted & set(_WORD.findall(document.lower()))) / len(wanted)


class RerankServer:
    """Start with :meth:`start`; ``base_url`` is what litellm's ``api_base`` takes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour: dict[str, Any] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                # A slow reply may find its caller gone (it timed out): expected, not an error.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                owner.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                b = owner.behaviour
                hold = b.get("hold")
                if hold is not None:
                    hold.wait(120)
                if b.get("delay"):
                    time.sleep(float(b["delay"]))
                if b.get("status"):
                    self._json(int(b["status"]), {"message": b.get("message", "simulated failure")})
                    return
                if not self.path.endswith(("/v1/rerank", "/v2/rerank")):
                    self._json(404, {"message": "not found"})
                    return
                self._rerank(body)

            def _rerank(self, body: dict[str, Any]) -> None:
                query = str(body.get("query", ""))
                docs = [
                    d if isinstance(d, str) else str(d.get("text", "")) for d in body["documents"]
                ]
                ranked = sorted(
                    ((i, score(query, d)) for i, d in enumerate(docs)), key=lambda r: -r[1]
                )
                top_n = body.get("top_n", body.get("top_k"))  # Voyage says top_k
                if top_n is not None:
                    ranked = ranked[: int(top_n)]
                results = [{"index": i, "relevance_score": s} for i, s in ranked]
                # A provider answering nonsense: the test's own results.
                results = owner.behaviour.get("results", results)
                self._json(
                    200,
                    {
                        "id": f"rerank-{len(owner.requests)}",
                        "results": results,
                        # Voyage's shape: the same list under "data".
                        "data": results,
                        "meta": {
                            "api_version": {"version": "1"},
                            "billed_units": {"search_units": 1},
                        },
                        # Jina reports usage here; Cohere ignores the key.
                        "usage": {"total_tokens": sum(len(d.split()) for d in docs)},
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
