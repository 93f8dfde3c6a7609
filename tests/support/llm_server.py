"""An OpenAI-compatible HTTP server on loopback that stands in for paid LLM providers.

Deterministic: chat answers quote the first source they were given and cite it as [1];
embeddings are derived from a hash of the text. ``behaviour`` switches on failure modes; its
``hold`` (a ``threading.Event``) keeps every reply waiting until the test sets it, so a test can
hold a caller at that point for as long as it needs (a provider that does not answer); ``gate``
(another ``threading.Event``) lets a streamed reply send its first word and then waits for it,
so a test can see what reached the client while the model is still mid-answer. ``stream_ends``
records when each streamed reply was finished (``time.monotonic()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The settings of a worker that embeds through this server (with ``ATRIUM_EMBEDDING_API_BASE``
#: set to its ``base_url``). The crash tests use it because the server can hold its answer: the
#: test kills the worker while the provider holds it, so the kill lands in the embed stage every
#: time, however fast or slow the machine.
EMBEDDING_ENV = {
    "ATRIUM_EMBEDDING_PROVIDER": "litellm",
    "ATRIUM_EMBEDDING_MODEL": "openai/test-embedding",
    "ATRIUM_EMBEDDING_API_KEY": "sk-test",
    "ATRIUM_EMBEDDING_MAX_TOKENS": "512",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


class LLMServer:
    """Start with :meth:`start`; ``base_url`` is what litellm's ``api_base`` takes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.behaviour: dict[str, Any] = {}
        self.stream_ends: list[float] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                # A held reply may find its caller gone (it timed out, or was killed): that is
                # what such a test wants, not an error to print.
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
                owner.requests.append({"path": self.path, "body": body})
                b = owner.behaviour
                hold = b.get("hold")
                if hold is not None:
                    hold.wait(120)
                if b.get("delay"):
                    time.sleep(float(b["delay"]))
                if b.get("status"):
                    self._json(
                        int(b["status"]),
                        {"error": {"message": "simulated failure", "type": "server_error"}},
                    )
                    return
                if self.path.endswith("/embeddings"):
                    self._embeddings(body)
                elif self.path.endswith("/chat/completions"):
                    self._chat(body)
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def _embeddings(self, body: dict[str, Any]) -> None:
                inputs = body.get("input", [])
                if isinstance(inputs, str):
                    inputs = [inputs]
                dim = int(owner.behaviour.get("dimension", 384))
                data = [
                    {"object": "embedding", "index": i, "embedding": hash_vector(t, dim)}
                    for i, t in enumerate(inputs)
                ]
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": data,
                        "model": body.get("model"),
                        "usage": {
                            "prompt_tokens": sum(len(t.split()) for t in inputs),
                            "total_tokens": sum(len(t.split()) for t in inputs),
                        },
                    },
                )

            def _chat(self, body: dict[str, Any]) -> None:
                answer = (
                    owner.behaviour.get("answer") or "According to the sources, this is so [1]."
                )
                words = answer.split(" ")
                usage = {
                    "prompt_tokens": 50,
                    "completion_tokens": len(words),
                    "total_tokens": 50 + len(words),
                }
                if not body.get("stream"):
                    self._json(
                        200,
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": answer},
                                }
                            ],
                            "usage": usage,
                        },
                    )
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                gate = owner.behaviour.get("gate")
                for i, w in enumerate(words):
                    if i == 1 and gate is not None:
                        # Bounded: a test that failed before opening the gate must not leave
                        # this thread (and its caller) waiting for ever.
                        gate.wait(60)
                    chunk = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": w if i == 0 else " " + w},
                                "finish_reason": None,
                            }
                        ],
                    }
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                final = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": usage,
                }
                self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                self.wfile.flush()
                owner.stream_ends.append(time.monotonic())
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def hash_vector(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    out = out[:dim]
    norm = math.sqrt(sum(v * v for v in out)) or 1.0
    return [v / norm for v in out]
