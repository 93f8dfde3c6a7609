"""The configured embedder: built from settings, checked against the vector schema, one per process.

Ingestion and search must embed with the same model, or query and chunk vectors are not
comparable; both get their embedder here, and both have its dimension checked against
``ATRIUM_EMBEDDING_DIMENSION`` (the width of the vector columns).

The two sides differ only in how patient and how greedy the embedder may be:

* ``"ingestion"`` (the worker): a hosted provider gets LiteLLMEmbedder's default retries (5)
  and timeout (60 s), since a document may wait; the local model's ONNX session gets
  ``C // N`` intra-op threads with N worker processes on C cores (at least one) unless
  ``ATRIUM_EMBEDDING_THREADS`` says otherwise, so processes do not fight over cores.
  ``atrium worker`` exports its process count for this (see ``ingestion.tasks``).
* ``"query"`` (a search or answer request): a person is waiting, so a hosted provider gets one
  retry and at most 30 s; the local session takes ``ATRIUM_EMBEDDING_THREADS`` or
  onnxruntime's default (one thread per core).

Loading the ONNX model takes a moment and its session owns a thread pool, so each process keeps
one embedder per purpose, created lazily in the process itself: nothing crosses a fork.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import structlog

from atrium.config import Settings
from atrium.embedding.base import Embedder
from atrium.embedding.hosted import LiteLLMEmbedder
from atrium.embedding.local import LocalOnnxEmbedder

__all__ = [
    "PROCESSES_ENV",
    "Purpose",
    "build_embedder",
    "cpu_count",
    "get_embedder",
    "onnx_threads",
]

log = structlog.get_logger("atrium.embedding")

#: Set by the worker's main process before it forks its pool: how many processes share the CPU.
PROCESSES_ENV = "ATRIUM_WORKER_PROCESSES"

#: Who the embedder is for: the worker's pipeline, or a search/answer request.
Purpose = Literal["ingestion", "query"]

# The local model's position-embedding table has 512 rows (see LocalOnnxEmbedder).
_LOCAL_TOKEN_LIMIT = 512
# Seconds a query may wait for a hosted embedding at most, whatever the LLM timeout.
_QUERY_TIMEOUT_CAP = 30.0

_lock = threading.Lock()
_embedders: dict[tuple[object, ...], Embedder] = {}


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def onnx_threads(settings: Settings) -> int:
    """Intra-op threads for a worker process's ONNX session (its share of the cores)."""
    if settings.embedding_threads:
        return settings.embedding_threads
    try:
        processes = max(1, int(os.environ.get(PROCESSES_ENV, "1")))
    except ValueError:
        processes = 1
    return max(1, cpu_count() // processes)


def _local_threads(settings: Settings, purpose: Purpose) -> int | None:
    """The ONNX intra-op threads for ``purpose`` (None: onnxruntime's default)."""
    if purpose == "ingestion":
        return onnx_threads(settings)
    return settings.embedding_threads or None


def build_embedder(
    settings: Settings, purpose: Purpose = "ingestion", *, threads: int | None = None
) -> Embedder:
    """A new embedder for the configured provider (uncached: see :func:`get_embedder`).

    Args:
        settings: The embedding settings (provider, model, dimension, limits, threads).
        purpose: ``"ingestion"`` or ``"query"``: sets the retry policy and the thread count
            (see the module docstring).
        threads: ONNX intra-op threads, overriding the purpose's choice (the bulk import's
            child processes take one each).

    Returns:
        The embedder, its dimension checked.

    Raises:
        ValueError: When the model's dimension differs from ``embedding_dimension``.
    """
    embedder: Embedder
    if settings.embedding_provider == "local":
        embedder = LocalOnnxEmbedder(
            max_tokens=min(settings.embedding_max_tokens, _LOCAL_TOKEN_LIMIT),
            threads=threads if threads is not None else _local_threads(settings, purpose),
        )
    elif purpose == "query":
        embedder = LiteLLMEmbedder(
            settings.embedding_model,
            settings.embedding_dimension,
            api_base=settings.embedding_api_base or None,
            api_key=settings.embedding_api_key.get_secret_value() or None,
            max_tokens=settings.embedding_max_tokens,
            max_retries=1,
            timeout=min(settings.llm_timeout_seconds, _QUERY_TIMEOUT_CAP),
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


def _key(settings: Settings, purpose: Purpose) -> tuple[object, ...]:
    """Everything :func:`build_embedder` reads for ``purpose``, and the process."""
    return (
        os.getpid(),
        purpose,
        settings.embedding_provider,
        settings.embedding_model,
        settings.embedding_dimension,
        settings.embedding_max_tokens,
        settings.embedding_api_base,
        settings.embedding_api_key.get_secret_value(),
        settings.llm_timeout_seconds if purpose == "query" else None,
        _local_threads(settings, purpose) if settings.embedding_provider == "local" else None,
    )


def get_embedder(settings: Settings, purpose: Purpose) -> Embedder:
    """This process's embedder for ``settings`` and ``purpose`` (built on first use).

    Args:
        settings: The embedding settings; a change in any of them gives a new embedder.
        purpose: ``"ingestion"`` or ``"query"`` (see the module docstring).

    Returns:
        The shared embedder: thread-safe, so one instance serves every thread.

    Raises:
        ValueError: When the model's dimension differs from ``embedding_dimension``.
    """
    key = _key(settings, purpose)
    embedder = _embedders.get(key)
    if embedder is not None:
        return embedder
    with _lock:
        embedder = _embedders.get(key)
        if embedder is None:
            embedder = build_embedder(settings, purpose)
            pid = os.getpid()
            # A forked child starts with its parent's entries, whose ONNX thread pools did not
            # survive the fork: drop them rather than keep them alive.
            for stale in [k for k in _embedders if k[0] != pid]:
                del _embedders[stale]
            _embedders[key] = embedder
    return embedder
