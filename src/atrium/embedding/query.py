"""Query embeddings: the configured embedder, one per process, with a small LRU of recent queries.

The model is the one ingestion used (same settings, same factory: :mod:`atrium.embedding.factory`),
so query and chunk vectors are comparable. Used by search and by answers.
The LRU is keyed by tenant: a hit is visible to the caller (``embedding_ms`` in the search
timings is near zero), so a cache shared by every tenant would tell tenant B that someone else
recently searched the exact text B just sent.
Embedding is CPU-bound (local ONNX) or a network call (LiteLLM): both run in a worker thread so
the event loop keeps serving other requests.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from atrium.config import Settings
from atrium.embedding.base import Embedder
from atrium.embedding.factory import get_embedder

Vector = npt.NDArray[np.float32]


def query_embedder(settings: Settings) -> Embedder:
    """The process-wide embedder for queries (loaded on first use, its dimension checked)."""
    return get_embedder(settings, "query")


class QueryVectorCache:
    """A bounded LRU of (tenant, model, query text) → vector: repeated queries skip the model.

    Entries of one tenant are never served to another (see the module docstring).
    """

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._data: OrderedDict[tuple[uuid.UUID, str, str], Vector] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: uuid.UUID, model: str, text: str) -> Vector | None:
        """The tenant's cached vector, if any (and mark it recently used)."""
        key = (tenant_id, model, text)
        with self._lock:
            vec = self._data.get(key)
            if vec is not None:
                self._data.move_to_end(key)
            return vec

    def put(self, tenant_id: uuid.UUID, model: str, text: str, vec: Vector) -> None:
        """Remember a tenant's vector, evicting the least recently used beyond ``size``."""
        key = (tenant_id, model, text)
        with self._lock:
            self._data[key] = vec
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


_query_cache = QueryVectorCache()


def cached_query_vector(settings: Settings, text: str, *, tenant_id: uuid.UUID) -> Vector | None:
    """The tenant's vector of ``text`` from the LRU, without awaiting anything; None on a miss."""
    return _query_cache.get(tenant_id, query_embedder(settings).model_name, text)


async def embed_query(
    settings: Settings, text: str, *, tenant_id: uuid.UUID
) -> tuple[Vector, bool]:
    """Embed one query of ``tenant_id``.

    Returns:
        ``(vector, from_cache)``: a unit-length float32 vector, and whether it came from the
        tenant's LRU entries.

    Raises:
        atrium.embedding.base.EmbeddingError: when a hosted embedder fails.
    """
    embedder = query_embedder(settings)
    cached = _query_cache.get(tenant_id, embedder.model_name, text)
    if cached is not None:
        return cached, True
    matrix = await asyncio.to_thread(embedder.embed, [text])
    vec: Vector = np.ascontiguousarray(matrix[0], dtype=np.float32)
    _query_cache.put(tenant_id, embedder.model_name, text, vec)
    return vec, False


async def embed_texts(settings: Settings, texts: list[str]) -> npt.NDArray[np.float32]:
    """Embed several texts (extractive answers embed candidate sentences)."""
    embedder = query_embedder(settings)
    return await asyncio.to_thread(embedder.embed, texts)
