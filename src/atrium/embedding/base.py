"""What every embedder is: the :class:`Embedder` protocol, its error, and row normalisation.

Every embedder returns float32 rows that are L2-normalised, so cosine similarity is a plain dot
product and the vector store can use inner-product search. The implementations are
:class:`atrium.embedding.local.LocalOnnxEmbedder` (the int8 ONNX model on the CPU) and
:class:`atrium.embedding.hosted.LiteLLMEmbedder` (any provider LiteLLM reaches);
:mod:`atrium.embedding.factory` picks one from the settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Embedder", "EmbeddingError", "FloatMatrix", "normalize_rows"]

FloatMatrix = npt.NDArray[np.float32]


class EmbeddingError(Exception):
    """An embedding provider failed.

    Attributes:
        transient: True when retrying later may succeed (rate limit, timeout,
            connection failure, 5xx); False when it will not (bad credentials,
            unknown model, wrong dimension, malformed request).
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        """Create the error.

        Args:
            message: What failed, for logs and the document's error field.
            transient: Whether a later retry may succeed.
        """
        super().__init__(message)
        self.transient = transient


@runtime_checkable
class Embedder(Protocol):
    """What ingestion and search need from an embedding model.

    Attributes:
        model_name: Identifier of the model, stored next to the vectors so a
            model change can be detected.
        dimension: Length of every vector.
        max_tokens: The model's input limit in tokens, special tokens included.
    """

    model_name: str
    dimension: int
    max_tokens: int

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """Embed texts.

        Args:
            texts: Texts to embed, each within ``max_tokens``.

        Returns:
            A float32 array of shape ``(len(texts), dimension)`` whose rows are
            L2-normalised and in the order of ``texts``.
        """
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Count the tokens of each text as the model would see them.

        Args:
            texts: Texts to measure.

        Returns:
            One count per text, in order.
        """
        ...


def normalize_rows(matrix: npt.ArrayLike) -> FloatMatrix:
    """Return ``matrix`` as float32 with every row scaled to unit L2 norm.

    All-zero rows stay zero instead of becoming NaN.

    Args:
        matrix: A 2-D array-like of numbers.

    Returns:
        A new float32 array of the same shape.
    """
    array = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    normalized: FloatMatrix = (array / np.maximum(norms, np.float32(1e-12))).astype(
        np.float32, copy=False
    )
    return normalized
