"""Split document text into chunks that fit the embedding model.

Built on ``semantic-text-splitter``: text is cut at the highest semantic level
that fits (paragraphs, then lines, sentences, words, graphemes; for Markdown
also headings, lists, code blocks, ...), and neighbouring pieces are merged up
to the chunk capacity, with a bounded overlap between consecutive chunks.

Two ways of measuring a chunk:

* **Tokens** (the local embedder, or any model with a Hugging Face
  ``tokenizers.Tokenizer``): the capacity is
  ``min(chunk_tokens, max_tokens - special_tokens)``, where ``special_tokens``
  is what the tokenizer adds around every input ([CLS] and [SEP] for BERT:
  2). The splitter counts chunk tokens without special tokens, so every chunk
  plus its special tokens fits ``max_tokens``: the embedder never has to
  truncate one. ``Chunk.token_count`` is the exact count with special tokens.
* **Characters** (hosted models through LiteLLM, whose tokenizer is not
  available offline): the capacity is a ``(min, max)`` character range with
  ``max = 4 * chunk_tokens`` (about ``chunk_tokens`` tokens of English at ~4
  characters per token) and ``min = 3/4 * max``. By default ``max`` is also
  capped at ``(max_tokens - 2) // 4`` so that even a tokenizer emitting 4
  tokens per character (the worst case of byte-level BPE on 4-byte UTF-8) stays
  within ``max_tokens``. The overlap keeps the token-mode ratio
  (``overlap_tokens / chunk_tokens * max`` characters). ``Chunk.token_count``
  is then ``token_counter``'s answer, or the estimate ``ceil(characters / 4)``.

In both modes, after splitting, any chunk that still measures over the limit
(only possible for pathological input, such as one grapheme that is many
tokens) is cut further, so no chunk is ever silently truncated by the model.

Cost (token mode): the splitter measures some 40 candidate pieces per document,
and running the whole tokenizer on each made chunking ~8x the cost of
tokenizing the document once. For tokenizers that never let a token cross
whitespace (BERT's pre-tokenizer, the bundled model's), a piece's count is the
sum of its whitespace-separated words' counts, so the splitter is given that
sum, from a per-process cache of word counts filled with one batch call per
document: the same chunks at ~1/8 of the cost. The final chunks are still
tokenized for real (exact ``token_count``, and their ids go to the embedder,
which then does not tokenize them again).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from semantic_text_splitter import MarkdownSplitter, TextSplitter
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from atrium.embedding.base import Embedder

__all__ = ["Chunk", "Chunker", "TokenCounter"]

logger = logging.getLogger(__name__)

#: Counts tokens of several texts at once, e.g. ``Embedder.count_tokens``.
TokenCounter = Callable[[Sequence[str]], list[int]]

# Upper bound of tokens per character assumed in character mode (byte-level
# BPE: one token covers at least one UTF-8 byte; a character is at most 4).
_MAX_TOKENS_PER_CHAR = 4
# Special tokens assumed in character mode, where the tokenizer is unknown.
_ASSUMED_SPECIAL_TOKENS = 2
# Pre-tokenizers that split on whitespace (no token spans a space), and normalizers that map
# text character by character: with both, a text's token count is the sum of its words'.
_WORD_PRE_TOKENIZERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
_CHARWISE_NORMALIZERS = frozenset(
    {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
)
# Words whose token counts a process remembers (~100 bytes each); the cache starts over past it.
_WORD_CACHE_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a document.

    Attributes:
        text: The chunk's text, trimmed of surrounding whitespace.
        ordinal: 0-based position of the chunk in the document.
        token_count: Tokens including the model's special tokens (exact in
            token mode; in character mode as given by the token counter, by
            default an estimate of ``ceil(len(text) / 4)``).
        char_start: Offset of the first character in the source text
            (Python ``str`` index, not bytes).
        char_end: Offset just past the last character, so that
            ``source[char_start:char_end] == text``.
        token_ids: Token mode only: the chunk's token ids with special tokens,
            as the chunker's tokenizer gives them, so that an embedder with the
            same tokenizer need not tokenize the chunk again; None otherwise.
    """

    text: str
    ordinal: int
    token_count: int
    char_start: int
    char_end: int
    #: Token mode: the ids the model sees, special tokens included (not part of equality).
    token_ids: list[int] | None = field(default=None, compare=False, repr=False)


def _estimate_tokens(texts: Sequence[str]) -> list[int]:
    """Estimate tokens as ``ceil(characters / 4)`` (English-text rule of thumb)."""
    return [max(1, math.ceil(len(text) / 4)) for text in texts]


class Chunker:
    """Split text into chunks that fit an embedding model's input limit.

    Attributes:
        mode: ``"tokens"`` or ``"characters"``, see the module docstring.
        max_tokens: The model limit, special tokens included.
        capacity: Splitter capacity: tokens without special tokens (token
            mode) or a ``(min, max)`` character range (character mode).
        overlap: Maximum overlap between consecutive chunks, in the same unit.
    """

    mode: Literal["tokens", "characters"]
    max_tokens: int
    capacity: int | tuple[int, int]
    overlap: int

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        max_tokens: int,
        chunk_tokens: int = 256,
        overlap_tokens: int = 32,
        *,
        chunk_chars: tuple[int, int] | None = None,
        overlap_chars: int | None = None,
        token_counter: TokenCounter | None = None,
    ) -> None:
        """Configure the splitters.

        Args:
            tokenizer: The embedding model's Hugging Face tokenizer (token
                mode), or None for character mode. It is copied, never
                modified; truncation and padding are disabled on the copy.
            max_tokens: The model's input limit, special tokens included.
            chunk_tokens: Target chunk size in tokens. In token mode it is
                lowered to ``max_tokens - special_tokens`` when larger.
            overlap_tokens: Maximum overlap between consecutive chunks in
                tokens (token mode). Must be smaller than the capacity.
            chunk_chars: Character mode only: explicit ``(min, max)`` chunk
                size in characters, replacing the default derived from
                ``chunk_tokens``. It is not capped: with a ``max`` above
                ``(max_tokens - 2) // 4`` the guarantee is the caller's.
            overlap_chars: Character mode only: overlap in characters; by
                default ``overlap_tokens / chunk_tokens`` of ``max``, lowered
                to stay below ``min``.
            token_counter: Character mode only: fills ``Chunk.token_count``
                (e.g. the embedder's ``count_tokens``); default estimate
                ``ceil(characters / 4)``. Token mode always counts exactly.

        Raises:
            ValueError: If the sizes cannot work together (e.g. overlap not
                smaller than the capacity, or a limit too small for any text).
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if overlap_tokens < 0:
            raise ValueError(f"overlap_tokens must not be negative, got {overlap_tokens}")
        self.max_tokens = max_tokens
        #: The tokenizer this chunker was built from (its ``Chunk.token_ids`` are that one's).
        self.source_tokenizer = tokenizer
        self._tokenizer: Tokenizer | None = None
        self._by_words = False
        self._counter: TokenCounter
        if tokenizer is not None:
            self._init_tokens(tokenizer, chunk_tokens, overlap_tokens)
        else:
            self._init_characters(
                chunk_tokens, overlap_tokens, chunk_chars, overlap_chars, token_counter
            )

    def _init_tokens(self, tokenizer: Tokenizer, chunk_tokens: int, overlap_tokens: int) -> None:
        # A private copy: the splitter must count untruncated, unpadded tokens
        # (a truncating tokenizer would make every chunk "fit"), and the
        # caller's tokenizer must not change under its other users.
        own = Tokenizer.from_str(tokenizer.to_str())
        own.no_truncation()
        own.no_padding()
        special = len(own.encode("", add_special_tokens=True).ids) - len(
            own.encode("", add_special_tokens=False).ids
        )
        capacity = min(chunk_tokens, self.max_tokens - special)
        if capacity < 1:
            raise ValueError(
                f"max_tokens={self.max_tokens} leaves no room next to {special} special tokens"
            )
        if overlap_tokens >= capacity:
            raise ValueError(
                f"overlap_tokens ({overlap_tokens}) must be smaller than the chunk "
                f"capacity ({capacity} tokens)"
            )
        self.mode = "tokens"
        self.capacity = capacity
        self.overlap = overlap_tokens
        self._special_tokens = special
        self._tokenizer = own

        def count(texts: Sequence[str]) -> list[int]:
            encodings = own.encode_batch(list(texts), add_special_tokens=True)
            return [len(encoding.ids) for encoding in encodings]

        self._counter = count
        self._word_tokens: dict[str, int] = {}
        self._by_words = _counts_by_words(own)
        if self._by_words:
            self._text_splitter = TextSplitter.from_callback(
                self._count_words, capacity, overlap=overlap_tokens, trim=True
            )
            self._markdown_splitter = MarkdownSplitter.from_callback(
                self._count_words, capacity, overlap=overlap_tokens, trim=True
            )
        else:
            self._text_splitter = TextSplitter.from_huggingface_tokenizer(
                own, capacity, overlap=overlap_tokens, trim=True
            )
            self._markdown_splitter = MarkdownSplitter.from_huggingface_tokenizer(
                own, capacity, overlap=overlap_tokens, trim=True
            )

    def _learn_words(self, text: str) -> None:
        """Count the tokens of the text's new words, in one batch call."""
        assert self._tokenizer is not None
        cache = self._word_tokens
        new = [word for word in set(text.split()) if word not in cache]
        if not new:
            return
        if len(cache) + len(new) > _WORD_CACHE_LIMIT:
            cache.clear()
        encodings = self._tokenizer.encode_batch(new, add_special_tokens=False)
        for word, encoding in zip(new, encodings, strict=True):
            cache[word] = len(encoding.ids)

    def _count_words(self, piece: str) -> int:
        """Tokens of a piece without special tokens: the sum over its words (the splitter's
        sizer; a word the splitter cut in two is counted on the spot)."""
        assert self._tokenizer is not None
        cache = self._word_tokens
        total = 0
        for word in piece.split():
            count = cache.get(word)
            if count is None:
                count = len(self._tokenizer.encode(word, add_special_tokens=False).ids)
                cache[word] = count
            total += count
        return total

    def _init_characters(
        self,
        chunk_tokens: int,
        overlap_tokens: int,
        chunk_chars: tuple[int, int] | None,
        overlap_chars: int | None,
        token_counter: TokenCounter | None,
    ) -> None:
        safe_max = (self.max_tokens - _ASSUMED_SPECIAL_TOKENS) // _MAX_TOKENS_PER_CHAR
        if chunk_chars is None:
            if safe_max < 1:
                raise ValueError(f"max_tokens={self.max_tokens} is too small for character mode")
            high = min(_MAX_TOKENS_PER_CHAR * chunk_tokens, safe_max)
            low = max(1, high * 3 // 4)
        else:
            low, high = chunk_chars
            if not 1 <= low <= high:
                raise ValueError(f"chunk_chars must satisfy 1 <= min <= max, got {chunk_chars}")
            if high > safe_max:
                logger.warning(
                    "chunk_chars max %d exceeds %d, the size guaranteed to fit %d tokens; "
                    "chunks of unusual text may exceed the model limit",
                    high,
                    safe_max,
                    self.max_tokens,
                )
        # Same overlap-to-size ratio as in token mode; the splitter requires the
        # overlap to be below the range's minimum.
        if overlap_chars is None:
            overlap = min(round(overlap_tokens / chunk_tokens * high), low - 1)
        else:
            overlap = overlap_chars
            if not 0 <= overlap < low:
                raise ValueError(
                    f"overlap_chars ({overlap}) must be between 0 and the minimum "
                    f"chunk size ({low}) exclusive"
                )
        self.mode = "characters"
        self.capacity = (low, high)
        self.overlap = overlap
        self._special_tokens = _ASSUMED_SPECIAL_TOKENS
        self._counter = token_counter if token_counter is not None else _estimate_tokens
        self._text_splitter = TextSplitter((low, high), overlap=overlap, trim=True)
        self._markdown_splitter = MarkdownSplitter((low, high), overlap=overlap, trim=True)

    @classmethod
    def for_embedder(
        cls, embedder: Embedder, chunk_tokens: int = 256, overlap_tokens: int = 32
    ) -> Chunker:
        """Build the chunker that matches an embedder.

        Token mode when the embedder exposes a ``tokenizers.Tokenizer`` as
        ``tokenizer`` (``LocalOnnxEmbedder``); otherwise character mode with the
        embedder's ``count_tokens`` filling ``Chunk.token_count``.

        Args:
            embedder: The embedder whose limit the chunks must fit.
            chunk_tokens: Target chunk size in tokens.
            overlap_tokens: Overlap between consecutive chunks in tokens.

        Returns:
            A configured chunker.
        """
        tokenizer = getattr(embedder, "tokenizer", None)
        if isinstance(tokenizer, Tokenizer):
            return cls(tokenizer, embedder.max_tokens, chunk_tokens, overlap_tokens)
        return cls(
            None,
            embedder.max_tokens,
            chunk_tokens,
            overlap_tokens,
            token_counter=embedder.count_tokens,
        )

    def split(self, text: str, markdown: bool = False) -> list[Chunk]:
        """Split a document into chunks.

        Args:
            text: The document text.
            markdown: Use Markdown structure (headings, lists, code blocks,
                tables) as split boundaries instead of plain-text ones.

        Returns:
            The chunks in document order, numbered from 0; ``[]`` when the text
            is empty or whitespace only.
        """
        if not text or text.isspace():
            return []
        splitter = self._markdown_splitter if markdown else self._text_splitter
        if self._tokenizer is not None and self._by_words:
            self._learn_words(text)
        raw: list[tuple[int, str]] = splitter.chunk_indices(text)
        raw_ids = self._ids([piece for _, piece in raw])
        raw_counts = (
            [len(ids) for ids in raw_ids]
            if raw_ids is not None
            else self._counter([piece for _, piece in raw])
        )
        pieces: list[tuple[int, str]] = []
        counts: list[int] = []
        token_ids: list[list[int] | None] = []
        for index, ((start, piece), count) in enumerate(zip(raw, raw_counts, strict=True)):
            if self._fits(piece, count):
                pieces.append((start, piece))
                counts.append(count)
                token_ids.append(raw_ids[index] if raw_ids is not None else None)
            else:
                parts = self._fit(start, piece)
                texts = [part for _, part in parts]
                pieces.extend(parts)
                part_ids = self._ids(texts)
                if part_ids is not None:
                    counts.extend(len(ids) for ids in part_ids)
                    token_ids.extend(part_ids)
                else:
                    counts.extend(self._counter(texts))
                    token_ids.extend([None] * len(parts))
        return [
            Chunk(
                text=piece,
                ordinal=ordinal,
                token_count=count,
                char_start=start,
                char_end=start + len(piece),
                token_ids=ids,
            )
            for ordinal, ((start, piece), count, ids) in enumerate(
                zip(pieces, counts, token_ids, strict=True)
            )
        ]

    def _ids(self, texts: list[str]) -> list[list[int]] | None:
        """Token mode: each text's ids with special tokens (one batch call); else None."""
        if self._tokenizer is None:
            return None
        return [
            encoding.ids
            for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=True)
        ]

    def _fits(self, piece: str, count: int | None = None) -> bool:
        """Whether a piece fits: by tokens in token mode, by characters otherwise."""
        if self._tokenizer is not None:
            if count is None:
                count = len(self._tokenizer.encode(piece, add_special_tokens=True).ids)
            return count <= self.max_tokens
        high = self.capacity[1] if isinstance(self.capacity, tuple) else self.capacity
        return len(piece) <= high

    def _fit(self, start: int, piece: str) -> list[tuple[int, str]]:
        """Return ``piece`` unchanged if it fits, else cut it until all parts fit.

        The splitter cannot cut below a grapheme, so a piece can exceed the
        capacity only for odd input; halving (at a space near the middle when
        there is one) always terminates and keeps every part within the limit.
        """
        if len(piece) <= 1 or self._fits(piece):
            return [(start, piece)]
        middle = len(piece) // 2
        space = piece.rfind(" ", middle // 2, middle + middle // 2)
        cut = space if space > 0 else middle
        left, right = piece[:cut], piece[cut:]
        parts: list[tuple[int, str]] = []
        for offset, part in ((start, left), (start + cut, right)):
            stripped = part.strip()
            if stripped:
                parts.extend(self._fit(offset + part.index(stripped), stripped))
        return parts


def _counts_by_words(tokenizer: Tokenizer) -> bool:
    """Whether a text's token count is the sum of its whitespace-separated words' counts.

    True when the pre-tokenizer splits on whitespace and the normalizer maps characters one by
    one (BERT's, the bundled model's). Byte-level BPE, SentencePiece and the like attach spaces
    to the next word, so their counts are not additive; they get the tokenizer-driven splitter.
    """
    config = json.loads(tokenizer.to_str())

    def kinds(component: object) -> list[str]:
        if not isinstance(component, dict):
            return []
        if component.get("type") == "Sequence":
            parts = component.get("normalizers") or component.get("pretokenizers") or []
            return [kind for part in parts for kind in kinds(part)]
        return [str(component.get("type"))]

    pre = kinds(config.get("pre_tokenizer"))
    normalizers = kinds(config.get("normalizer"))
    return (
        bool(pre)
        and all(kind in _WORD_PRE_TOKENIZERS for kind in pre)
        and all(kind in _CHARWISE_NORMALIZERS for kind in normalizers)
    )
