"""The hosted embedder: any embedding model LiteLLM can reach, with retries.

OpenAI, Azure, Cohere, an OpenAI-compatible server, ...: transient provider failures are
retried with backoff; failures surface as :class:`~atrium.embedding.base.EmbeddingError`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from atrium.embedding.base import EmbeddingError, FloatMatrix, normalize_rows

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["LiteLLMEmbedder"]

logger = logging.getLogger(__name__)


_TRANSIENT_ERROR_NAMES = (
    "RateLimitError",
    "Timeout",
    "APIConnectionError",
    "InternalServerError",
    "ServiceUnavailableError",
    "BadGatewayError",
)


def _is_transient(exc: BaseException, litellm: ModuleType) -> bool:
    """Tell whether a LiteLLM failure may go away on retry.

    The named exception types cover rate limits, timeouts, connection
    failures and 500/502/503; any other error carrying HTTP status 408, 429 or
    5xx (e.g. a 504 surfacing as a plain ``APIError``) counts as well.
    """
    for name in _TRANSIENT_ERROR_NAMES:
        error_type = getattr(litellm, name, None)
        if isinstance(error_type, type) and isinstance(exc, error_type):
            return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


def _import_litellm() -> ModuleType:
    """Import litellm on first use.

    The import takes several seconds, so processes that only use the local
    embedder never pay for it. The environment variable stops litellm from
    fetching its model cost map from the internet at import time.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # lazy: several seconds to import (see the docstring)

    return litellm


class LiteLLMEmbedder:
    """A hosted embedding model called through LiteLLM.

    Requests are sent in batches of ``batch_size`` texts. Rate limits,
    timeouts, connection failures and 5xx answers are retried with exponential
    backoff and jitter, up to ``max_retries`` times per batch; after that, or
    on any other failure, :class:`EmbeddingError` is raised with ``transient``
    telling the caller whether a later retry makes sense.

    LiteLLM's own retries are switched off (``num_retries=0``). For the
    ``openai/`` and ``azure/`` providers LiteLLM goes through the OpenAI SDK and
    treats ``max_retries=0`` as unset (LiteLLM issue #7003), so the SDK still
    makes up to 2 quick retries inside each of this class's attempts (it
    honours ``Retry-After``, and skips them when the server sends
    ``x-should-retry: false``); this policy wraps around them.

    Attributes:
        model_name: The LiteLLM model id (e.g. ``openai/text-embedding-3-small``).
        dimension: The expected vector length; any other length is an error.
        max_tokens: The provider's input limit in tokens.
    """

    model_name: str
    dimension: int
    max_tokens: int

    def __init__(
        self,
        model: str,
        dimension: int,
        api_base: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 8191,
        batch_size: int = 128,
        max_retries: int = 5,
        *,
        timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        """Configure the embedder; nothing is sent until :meth:`embed`.

        Args:
            model: LiteLLM model id, provider prefix included.
            dimension: Expected vector length.
            api_base: Base URL of the API (e.g. ``http://host:8000/v1``), or
                None for the provider's default.
            api_key: API key, or None to let LiteLLM read the provider's
                environment variable.
            max_tokens: The provider's input limit in tokens.
            batch_size: Texts per request.
            max_retries: Retries per batch for transient failures.
            timeout: Seconds to wait for one request.
            backoff_base: First retry delay in seconds; doubles on each retry.
            backoff_max: Upper bound of one retry delay in seconds.

        Raises:
            ValueError: If a numeric argument is out of range.
        """
        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must not be negative, got {max_retries}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.model_name = model
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.api_base = api_base or None
        self._api_key = api_key or None
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Estimate token counts as ``ceil(characters / 4)``.

        This is a rough English-text estimate, not the provider's tokenizer:
        the provider's tokenizer is generally not available offline (and
        LiteLLM's ``token_counter`` may try to download one). Use it for
        metrics, not for budgeting; the character-based chunker keeps inputs
        within ``max_tokens`` on its own.

        Args:
            texts: Texts to measure.

        Returns:
            One estimated count per text, in order.
        """
        return [max(1, math.ceil(len(text) / 4)) for text in texts]

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """Embed texts with the provider.

        Args:
            texts: Texts to embed, each within the provider's input limit.

        Returns:
            Float32 array of shape ``(len(texts), dimension)``, rows L2-normalised.

        Raises:
            EmbeddingError: If the provider fails (``transient`` tells whether
                to retry later) or returns vectors of the wrong dimension.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        batches = [
            self._embed_batch(list(texts[start : start + self.batch_size]))
            for start in range(0, len(texts), self.batch_size)
        ]
        return normalize_rows(np.concatenate(batches, axis=0))

    def _embed_batch(self, batch: list[str]) -> FloatMatrix:
        litellm = _import_litellm()
        attempt = 0
        while True:
            try:
                response = litellm.embedding(
                    model=self.model_name,
                    input=batch,
                    api_base=self.api_base,
                    api_key=self._api_key,
                    timeout=self.timeout,
                    # Retries are ours (see the class docstring); the OpenAI
                    # SDK path ignores max_retries=0, other providers honour it.
                    max_retries=0,
                    num_retries=0,
                )
            except Exception as exc:
                if not _is_transient(exc, litellm):
                    raise EmbeddingError(
                        f"embedding provider rejected the request ({self.model_name}): "
                        f"{type(exc).__name__}: {exc}",
                        transient=False,
                    ) from exc
                if attempt >= self.max_retries:
                    raise EmbeddingError(
                        f"embedding provider still failing after {attempt + 1} attempts "
                        f"({self.model_name}): {type(exc).__name__}: {exc}",
                        transient=True,
                    ) from exc
                delay = self._backoff_delay(attempt)
                logger.warning(
                    "embedding request failed (%s), retry %d/%d in %.2fs",
                    type(exc).__name__,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
                attempt += 1
            else:
                return self._vectors(response, len(batch))

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: 50-100 % of ``base * 2**attempt``.

        The jitter spreads out workers that were throttled at the same moment.
        """
        ceiling = min(self.backoff_max, math.ldexp(self.backoff_base, attempt))
        return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto

    def _vectors(self, response: Any, expected: int) -> FloatMatrix:
        """Extract the vectors of a LiteLLM EmbeddingResponse, in input order."""
        items = list(getattr(response, "data", None) or [])
        if len(items) != expected:
            raise EmbeddingError(
                f"embedding provider returned {len(items)} vectors for {expected} inputs "
                f"({self.model_name})",
                transient=False,
            )

        def field(item: Any, name: str) -> Any:
            return item[name] if isinstance(item, dict) else getattr(item, name)

        # Providers may answer out of order; "index" is authoritative.
        items.sort(key=lambda item: int(field(item, "index")))
        try:
            matrix = np.asarray([field(item, "embedding") for item in items], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise EmbeddingError(
                f"embedding provider returned malformed vectors ({self.model_name}): {exc}",
                transient=False,
            ) from exc
        if matrix.ndim != 2 or matrix.shape[1] != self.dimension:
            got = matrix.shape[1] if matrix.ndim == 2 else "ragged"
            raise EmbeddingError(
                f"embedding model {self.model_name} returned {got}-dimensional vectors, "
                f"but the configured dimension is {self.dimension}; "
                "fix the embedding dimension setting or the model",
                transient=False,
            )
        return matrix
