"""Text embedders: the bundled local ONNX model and hosted models through LiteLLM.

Every embedder returns float32 rows that are L2-normalised, so cosine similarity
is a plain dot product and the vector store can use inner-product search.

Two implementations share the :class:`Embedder` protocol:

* :class:`LocalOnnxEmbedder` runs the bundled int8 all-MiniLM-L6-v2 (384
  dimensions) on the CPU with onnxruntime. No network, no model download. See
  ``model/PROVENANCE.md`` for how the model file was built and how accurate it is.
* :class:`LiteLLMEmbedder` calls any embedding model LiteLLM can reach (OpenAI,
  Azure, Cohere, an OpenAI-compatible server, ...), with retries on transient
  provider failures. Failures surface as :class:`EmbeddingError`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "DEFAULT_MODEL_DIR",
    "LOCAL_MODEL_NAME",
    "Embedder",
    "EmbeddingError",
    "LiteLLMEmbedder",
    "LocalOnnxEmbedder",
    "normalize_rows",
]

logger = logging.getLogger(__name__)

#: Directory holding the bundled ``model.onnx`` and ``tokenizer.json``.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"
#: Name under which vectors of the bundled model are recorded.
LOCAL_MODEL_NAME = "all-MiniLM-L6-v2"

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


class LocalOnnxEmbedder:
    """The bundled all-MiniLM-L6-v2 (int8 ONNX) run with onnxruntime on the CPU.

    Texts are tokenized with the model's own ``tokenizer.json``, truncated to
    ``max_tokens`` as a safety net (the chunker already keeps chunks within the
    limit), mean-pooled over the attention mask and L2-normalised, which is
    what sentence-transformers does for this model.

    Instances are safe to share between threads: onnxruntime sessions and
    ``tokenizers`` encoders are both thread-safe for inference.

    Attributes:
        model_name: Always :data:`LOCAL_MODEL_NAME`.
        dimension: 384 for the bundled model (read from the ONNX graph).
        max_tokens: Input limit in tokens, [CLS] and [SEP] included.
        batch_size: Texts per onnxruntime call.
    """

    model_name: str
    dimension: int
    max_tokens: int

    # The position-embedding table of the model has 512 rows; past that the
    # graph fails. sentence-transformers uses 256 for this model (it was
    # fine-tuned on 128-token inputs), hence the default.
    _POSITION_LIMIT = 512

    def __init__(
        self,
        model_dir: Path | None = None,
        max_tokens: int = 256,
        batch_size: int = 32,
        threads: int | None = None,
    ) -> None:
        """Load the model and tokenizer.

        Args:
            model_dir: Directory with ``model.onnx`` and ``tokenizer.json``.
                Defaults to the bundled :data:`DEFAULT_MODEL_DIR`.
            max_tokens: Input limit in tokens, special tokens included; longer
                inputs are truncated. At most 512 (the model's position table).
            batch_size: Texts per onnxruntime call. 32 keeps padding waste low
                while amortising the per-call overhead.
            threads: onnxruntime intra-op threads. None or 0 lets onnxruntime
                use one per physical core.

        Raises:
            FileNotFoundError: If the model or tokenizer file is missing.
            ValueError: If ``max_tokens`` or ``batch_size`` is out of range.
        """
        directory = model_dir if model_dir is not None else DEFAULT_MODEL_DIR
        model_path = directory / "model.onnx"
        tokenizer_path = directory / "tokenizer.json"
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"embedding model file {path} is missing; rebuild it with "
                    "scripts/build_embedding_model.py"
                )
        if not 3 <= max_tokens <= self._POSITION_LIMIT:
            raise ValueError(f"max_tokens must be between 3 and 512, got {max_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # One graph, run node after node: inter-op threads would only compete
        # with the intra-op pool for the same cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {node.name for node in self._session.get_inputs()}
        dimension = self._session.get_outputs()[0].shape[-1]
        if not isinstance(dimension, int):
            raise ValueError(f"{model_path}: output has no fixed hidden size ({dimension!r})")

        # The shipped tokenizer.json truncates and pads at a fixed 128 tokens.
        # Two copies: one truncating at max_tokens for the model (padding is
        # done per batch below), one plain for counting and for the chunker.
        self._model_tokenizer = Tokenizer.from_file(str(tokenizer_path))
        padding = self._model_tokenizer.padding
        self._pad_id = int(padding["pad_id"]) if padding else 0
        self._model_tokenizer.no_padding()
        self._model_tokenizer.enable_truncation(max_length=max_tokens)
        self._plain_tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._plain_tokenizer.no_padding()
        self._plain_tokenizer.no_truncation()

        self.model_name = LOCAL_MODEL_NAME
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer without truncation or padding, for the chunker.

        It is shared with this embedder's token counting: do not enable
        truncation or padding on it (the chunker copies it before changing it).
        """
        return self._plain_tokenizer

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Count tokens exactly as the model sees them, [CLS] and [SEP] included.

        Counts are not truncated, so a count above ``max_tokens`` means the text
        would lose its tail in :meth:`embed`.

        Args:
            texts: Texts to measure.

        Returns:
            One token count per text, in order.
        """
        if not texts:
            return []
        encodings = self._plain_tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [len(encoding.ids) for encoding in encodings]

    def embed(self, texts: Sequence[str]) -> FloatMatrix:
        """Embed texts with the local model.

        Texts longer than ``max_tokens`` are truncated (a safety net; they are
        not rejected). Texts are grouped by token length before batching so each
        batch pads little, which is faster and, because the int8 model scales
        activations per batch tensor, also slightly more accurate; the result
        is returned in the input order.

        Args:
            texts: Texts to embed. Empty strings are allowed.

        Returns:
            Float32 array of shape ``(len(texts), dimension)``, rows L2-normalised.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # One tokenizer pass (parallel in Rust) for all texts; the ids are
        # then sorted and padded per batch, so nothing is tokenized twice.
        encodings = self._model_tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return self._run([encoding.ids for encoding in encodings])

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]]) -> FloatMatrix:
        """Embed texts that were already tokenized with this model's tokenizer.

        The chunker tokenizes every chunk to count it exactly (``Chunk.token_ids``);
        giving those ids here saves a second tokenization of the same text. The
        result is the same as :meth:`embed` on the texts.

        Args:
            token_ids: Per text, its ids with [CLS] and [SEP], as :attr:`tokenizer`
                gives them with ``add_special_tokens=True``.

        Returns:
            Float32 array of shape ``(len(token_ids), dimension)``, rows L2-normalised.

        Raises:
            ValueError: If a sequence is longer than ``max_tokens`` (this method
                never truncates: the caller promised texts within the limit).
        """
        if not token_ids:
            return np.zeros((0, self.dimension), dtype=np.float32)
        longest = max(len(ids) for ids in token_ids)
        if longest > self.max_tokens:
            raise ValueError(
                f"a token sequence of {longest} exceeds the model's limit of {self.max_tokens}"
            )
        return self._run(token_ids)

    def _run(self, token_ids: Sequence[Sequence[int]]) -> FloatMatrix:
        """Embed token id sequences: sorted by length, padded per batch, pooled, normalised."""
        result = np.zeros((len(token_ids), self.dimension), dtype=np.float32)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            width = max(len(token_ids[i]) for i in indices)
            input_ids = np.full((len(indices), width), self._pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(indices), width), dtype=np.int64)
            for row, index in enumerate(indices):
                length = len(token_ids[index])
                input_ids[row, :length] = token_ids[index]
                attention_mask[row, :length] = 1
            # One segment per input: token type 0 everywhere, as the tokenizer gives it.
            token_type_ids = np.zeros_like(input_ids)
            feeds = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "token_type_ids": token_type_ids,
            }
            outputs = self._session.run(
                None, {name: value for name, value in feeds.items() if name in self._input_names}
            )
            hidden = np.asarray(outputs[0], dtype=np.float32)
            # Mean pooling over real tokens only: padding must not dilute the mean.
            weights = attention_mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            result[indices] = pooled
        return normalize_rows(result)


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
    import litellm

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
