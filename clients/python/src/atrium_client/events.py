"""The typed events of a streamed answer (``answer_stream``).

The server sends Server-Sent Events in this order: one ``retrieval`` (the sources the answer
may cite), any number of ``delta`` (pieces of the answer's text), then ``done`` (the whole
answer with its citations and token usage) or ``error`` (the provider failed mid-answer).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from atrium_client.models import AnswerMode, AnswerTimings, Citation, Source, TokenUsage


class RetrievalEvent(BaseModel):
    """The retrieved chunks, numbered as the answer cites them: ``[n]`` is ``sources[n-1]``."""

    type: Literal["retrieval"] = "retrieval"
    sources: list[Source]
    cache_hit: bool = False
    timings: dict[str, float] = Field(default_factory=dict)


class DeltaEvent(BaseModel):
    """A piece of the answer's text (tokens, as the model writes them)."""

    type: Literal["delta"] = "delta"
    text: str


class DoneEvent(BaseModel):
    """The end of a successful answer: the full text, its citations and token usage."""

    type: Literal["done"] = "done"
    answer: str
    mode: AnswerMode
    model: str | None = None
    prompt_version: str | None = None
    citations: list[Citation]
    usage: TokenUsage
    timings: AnswerTimings


class ErrorEvent(BaseModel):
    """The answer broke off: the server's error name, detail and the HTTP status it maps to."""

    type: Literal["error"] = "error"
    error: str
    detail: Any = None
    status: int | None = None


#: One event of ``answer_stream``.
AnswerEvent = RetrievalEvent | DeltaEvent | DoneEvent | ErrorEvent

_EVENTS: dict[str, type[RetrievalEvent | DeltaEvent | DoneEvent | ErrorEvent]] = {
    "retrieval": RetrievalEvent,
    "delta": DeltaEvent,
    "done": DoneEvent,
    "error": ErrorEvent,
}


def parse_event(name: str, data: str) -> AnswerEvent | None:
    """The typed event for one SSE message; None for event names this client does not know."""
    cls = _EVENTS.get(name)
    if cls is None:
        return None
    payload = json.loads(data) if data else {}
    return cls.model_validate({**payload, "type": name})


class SSEDecoder:
    """Turns the lines of a ``text/event-stream`` into ``(event, data)`` pairs.

    Comment lines (``: ping``) are skipped; a message ends at a blank line.
    """

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """Take one line (without its end-of-line); a complete message when one ends here."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            message = (self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return message
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def flush(self) -> tuple[str, str] | None:
        """The last message, when the stream ended without a blank line after it."""
        return self.feed("")
