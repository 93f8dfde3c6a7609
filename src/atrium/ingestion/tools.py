"""The worker's embedder and chunker, built once per process from settings.

The embedder comes from :func:`atrium.embedding.factory.get_embedder` (purpose
``"ingestion"``: its thread share and retry policy are explained there); the chunker is sized
in that embedder's tokens, so the two are kept together.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from atrium.config import Settings
from atrium.embedding.base import Embedder
from atrium.embedding.factory import get_embedder
from atrium.ingestion.chunking import Chunker


@dataclass(frozen=True)
class Tools:
    """What the pipeline needs to turn text into vectors."""

    embedder: Embedder
    chunker: Chunker

    @property
    def reuse_token_ids(self) -> bool:
        """Whether chunks' ``token_ids`` can go straight to the embedder: it takes ids, and the
        chunker counted with the embedder's own tokenizer."""
        tokenizer = getattr(self.embedder, "tokenizer", None)
        return (
            tokenizer is not None
            and self.chunker.source_tokenizer is tokenizer
            and callable(getattr(self.embedder, "embed_token_ids", None))
        )


_lock = threading.Lock()
_state: dict[str, object] = {}


def worker_tools(settings: Settings) -> Tools:
    """This process's embedder and chunker (built on first use).

    Args:
        settings: The embedding and chunking settings; a change in any of them gives new tools.

    Returns:
        The shared tools (both parts are thread-safe).

    Raises:
        ValueError: When the model's dimension differs from ``embedding_dimension``.
    """
    key = (
        os.getpid(),
        settings.embedding_provider,
        settings.embedding_model,
        settings.embedding_max_tokens,
        settings.chunk_tokens,
        settings.chunk_overlap_tokens,
    )
    tools = _state.get("tools")
    if tools is not None and _state.get("key") == key:
        assert isinstance(tools, Tools)
        return tools
    with _lock:
        embedder = get_embedder(settings, "ingestion")
        chunker = Chunker.for_embedder(
            embedder, settings.chunk_tokens, settings.chunk_overlap_tokens
        )
        tools = Tools(embedder, chunker)
        _state["tools"] = tools
        _state["key"] = key
    return tools
