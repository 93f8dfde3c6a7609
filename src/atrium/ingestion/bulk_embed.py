"""The import's model in several processes (``atrium import --processes N``).

The worker gets its parallelism from its pool (several single-threaded processes, each on its
own documents); an import is one process. With ``--processes N`` each model call is split into
N slices embedded at once by N child processes with one ONNX thread each (the worker's layout):
on the development machine one thread per process embedded faster than several threads in one
(docs/performance.md, Bulk import).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from atrium.config import get_settings
from atrium.embedding.factory import build_embedder
from atrium.ingestion.tools import Tools

_child: dict[str, Any] = {}


def _start() -> None:
    """In each child: its own embedder, one ONNX thread (settings from the environment)."""
    _child["embedder"] = build_embedder(get_settings(), threads=1)


def _embed_ids(ids: list[list[int]]) -> Any:
    return _child["embedder"].embed_token_ids(ids)


def _embed_texts(texts: list[str]) -> Any:
    return _child["embedder"].embed(texts)


class PooledEmbedder:
    """The configured embedder, fanned out over child processes.

    Attributes:
        model_name, dimension, max_tokens, tokenizer: the parent's embedder's (the chunker
            keeps counting with the parent's tokenizer, so token ids are still reused).
    """

    def __init__(self, inner: Any, processes: int) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens
        self.tokenizer = getattr(inner, "tokenizer", None)
        self.processes = processes
        # spawn, not fork: the parent's ONNX session and its threads must not be copied.
        self.pool = ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start
        )

    def _fan(self, fn: Any, items: Sequence[Any]) -> Any:
        size = -(-len(items) // self.processes)
        parts = [list(items[i : i + size]) for i in range(0, len(items), size)]
        if not parts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack(list(self.pool.map(fn, parts)))

    def embed(self, texts: Sequence[str]) -> Any:
        """Embed texts, a slice per process."""
        return self._fan(_embed_texts, texts)

    def embed_token_ids(self, ids: Sequence[list[int]]) -> Any:
        """Embed token ids, a slice per process."""
        return self._fan(_embed_ids, ids)

    def close(self) -> None:
        """Stop the child processes."""
        self.pool.shutdown(cancel_futures=True)


def pooled(tools: Tools, processes: int) -> Tools:
    """``tools`` with its embedder spread over ``processes`` processes (1: unchanged; only a
    local model that takes token ids is spread, a provider's API is called as it is)."""
    if processes <= 1 or not callable(getattr(tools.embedder, "embed_token_ids", None)):
        return tools
    return Tools(PooledEmbedder(tools.embedder, processes), tools.chunker)  # type: ignore[arg-type]
