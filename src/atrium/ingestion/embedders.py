"""The worker's embedder and chunker: built once per process, from settings.

Loading the ONNX model takes a moment and its session owns a thread pool, so each worker process
keeps one (created lazily in the process itself: nothing crosses a fork).

Threads: with N worker processes on C cores, each ONNX session gets ``C // N`` intra-op threads
(at least one) unless ``ATRIUM_EMBEDDING_THREADS`` says otherwise, so processes do not fight
over cores. ``atrium worker`` exports its process count for this (see ``ingestion.tasks``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import structlog

from atrium.config import Settings
from atrium.ingestion.chunking import Chunker
from atrium.ingestion.embedding import Embedder, LiteLLMEmbedder, LocalOnnxEmbedder

log = structlog.get_logger("atrium.ingestion")

#: Set by the worker's main process before it forks its pool: how many processes share the CPU.
PROCESSES_ENV = "ATRIUM_WORKER_PROCESSES"


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


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def onnx_threads(settings: Settings) -> int:
    """Intra-op threads for this process's ONNX session."""
    if settings.embedding_threads:
        return settings.embedding_threads
    try:
        processes = max(1, int(os.environ.get(PROCESSES_ENV, "1")))
    except ValueError:
        processes = 1
    return max(1, cpu_count() // processes)


def build_embedder(settings: Settings, threads: int | None = None) -> Embedder:
    """A new embedder for the configured provider.

    Raises:
        ValueError: when the model's dimension differs from ``embedding_dimension``.
    """
    embedder: Embedder
    if settings.embedding_provider == "local":
        embedder = LocalOnnxEmbedder(
            max_tokens=min(settings.embedding_max_tokens, 512),
            threads=threads if threads is not None else onnx_threads(settings),
        )
    else:
        embedder = LiteLLMEmbedder(
            settings.embedding_model,
            settings.embedding_dimension,
            api_base=settings.embedding_api_base or None,
            api_key=settings.embedding_api_key.get_secret_value() or None,
            max_tokens=settings.embedding_max_tokens,
        )
        # Without the provider's tokenizer, chunks are cut by characters so that even 4 tokens
        # per character fit: a limit left at the local model's 256 makes ~60-character chunks.
        if settings.embedding_max_tokens < 4 * settings.chunk_tokens + 2:
            log.warning(
                "embedding_max_tokens_small",
                hint="set ATRIUM_EMBEDDING_MAX_TOKENS to the hosted model's input limit "
                "(e.g. 8191 for OpenAI's text-embedding-3 models); chunks are cut to fit it",
                max_tokens=settings.embedding_max_tokens,
                chunk_tokens=settings.chunk_tokens,
            )
    if embedder.dimension != settings.embedding_dimension:
        raise ValueError(
            f"the embedding model gives {embedder.dimension}-dimensional vectors but "
            f"ATRIUM_EMBEDDING_DIMENSION is {settings.embedding_dimension}"
        )
    return embedder


def worker_tools(settings: Settings) -> Tools:
    """This process's embedder and chunker (built on first use)."""
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
        embedder = build_embedder(settings)
        chunker = Chunker.for_embedder(
            embedder, settings.chunk_tokens, settings.chunk_overlap_tokens
        )
        tools = Tools(embedder, chunker)
        _state["tools"] = tools
        _state["key"] = key
    return tools
