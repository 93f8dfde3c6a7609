"""Chunker on real prose with the local model's real tokenizer (no mocks)."""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from atrium.embedding.hosted import LiteLLMEmbedder
from atrium.embedding.local import LocalOnnxEmbedder
from atrium.embedding.model_build import source_dir
from atrium.ingestion.chunking import Chunk, Chunker

# The weights package's tokenizer.json, the file the built model directory copies.
TOKENIZER_JSON = source_dir() / "tokenizer.json"

GPL3 = Path("/usr/share/common-licenses/GPL-3")

SENTENCES = [
    "The committee met on Tuesday to review the quarterly budget.",
    "Rainfall in the northern valleys was twice the seasonal average.",
    "Engineers replaced the bearings after the vibration alarm fired at 03:12.",
    "She argued, convincingly, that the contract's indemnity clause was void.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our API returns HTTP 429 when a tenant exceeds 600 requests per minute.",
    "The museum's new wing houses ceramics from the Ming and Qing dynasties.",
    "Café owners in Zürich reported a 12% rise in tourist visits.",
    "A well-tuned index can answer most queries in under ten milliseconds.",
    "Migration routes of the arctic tern span almost seventy thousand kilometres.",
    "Unit tests caught the regression before the release candidate was tagged.",
    "The lighthouse keeper logged every passing ship in a leather-bound journal.",
]


def generated_prose(paragraphs: int = 120, seed: int = 0) -> str:
    """Deterministic long prose: paragraphs of 2-9 varied sentences."""
    rng = random.Random(seed)
    return "\n\n".join(
        " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 9))) for _ in range(paragraphs)
    )


def long_texts() -> list[str]:
    texts = [generated_prose()]
    if GPL3.exists():  # Debian ships it; real legal prose with odd layout
        texts.append(GPL3.read_text(encoding="utf-8"))
    return texts


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # Loaded as shipped: truncation and padding at 128 are still enabled, which
    # the chunker must neither be fooled by nor change.
    return Tokenizer.from_file(str(TOKENIZER_JSON))


_PLAIN = Tokenizer.from_file(str(TOKENIZER_JSON))
_PLAIN.no_truncation()
_PLAIN.no_padding()


def true_count(text: str) -> int:
    """Tokens the model sees for ``text``, [CLS] and [SEP] included, untruncated."""
    return len(_PLAIN.encode(text, add_special_tokens=True).ids)


def check_chunks(source: str, chunks: list[Chunk]) -> None:
    assert [chunk.ordinal for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.text and chunk.text == chunk.text.strip()
        assert source[chunk.char_start : chunk.char_end] == chunk.text
    starts = [chunk.char_start for chunk in chunks]
    assert starts == sorted(starts)


@pytest.mark.parametrize(("max_tokens", "chunk_tokens"), [(256, 256), (128, 100), (64, 1000)])
def test_no_chunk_exceeds_the_model_limit(
    tokenizer: Tokenizer, max_tokens: int, chunk_tokens: int
) -> None:
    chunker = Chunker(tokenizer, max_tokens=max_tokens, chunk_tokens=chunk_tokens, overlap_tokens=8)
    assert chunker.mode == "tokens"
    assert chunker.capacity == min(chunk_tokens, max_tokens - 2)  # [CLS] and [SEP]
    for text in long_texts():
        chunks = chunker.split(text)
        assert len(chunks) > 5
        check_chunks(text, chunks)
        for chunk in chunks:
            count = true_count(chunk.text)
            assert chunk.token_count == count
            assert count <= max_tokens, (count, chunk.text[:80])
        # The splitter fills chunks: most are well over half the capacity.
        full = [c for c in chunks if c.token_count - 2 >= chunker.capacity // 2]
        assert len(full) >= 0.8 * len(chunks)
    # The caller's tokenizer is untouched.
    assert tokenizer.truncation is not None and tokenizer.truncation["max_length"] == 128


def test_chunks_fit_the_local_embedder_without_truncation() -> None:
    embedder = LocalOnnxEmbedder(threads=2)
    chunker = Chunker.for_embedder(embedder)
    assert (chunker.mode, chunker.capacity, chunker.overlap) == ("tokens", 254, 32)
    chunks = chunker.split(long_texts()[-1])
    counts = embedder.count_tokens([chunk.text for chunk in chunks])
    assert counts == [chunk.token_count for chunk in chunks]
    assert max(counts) <= embedder.max_tokens


def test_overlap_between_consecutive_chunks(tokenizer: Tokenizer) -> None:
    # One long paragraph: the splitter does not carry overlap across paragraph
    # breaks (it never merges across a higher semantic boundary), so prose
    # without breaks shows the overlap on (almost) every boundary.
    text = generated_prose().replace("\n\n", " ")
    chunker = Chunker(tokenizer, max_tokens=256, chunk_tokens=120, overlap_tokens=40)
    chunks = chunker.split(text)
    assert len(chunks) > 10
    overlaps = [
        (previous, current)
        for previous, current in itertools.pairwise(chunks)
        if current.char_start < previous.char_end
    ]
    assert len(overlaps) >= 0.8 * (len(chunks) - 1)
    for previous, current in overlaps:
        shared = text[current.char_start : previous.char_end].strip()
        assert previous.text.endswith(shared) and current.text.startswith(shared)
        assert true_count(shared) - 2 <= 40

    no_overlap = Chunker(tokenizer, max_tokens=256, chunk_tokens=120, overlap_tokens=0).split(text)
    assert all(
        current.char_start >= previous.char_end
        for previous, current in itertools.pairwise(no_overlap)
    )


def test_markdown_sections_are_respected(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    sections = []
    for number in range(12):
        paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(3)) for _ in range(3)]
        sections.append(f"## Section {number}\n\n" + "\n\n".join(paragraphs))
    document = "# Handbook\n\n" + "\n\n".join(sections) + "\n"
    chunker = Chunker(tokenizer, max_tokens=256, chunk_tokens=200, overlap_tokens=0)
    # Every section fits one chunk, but no two sections fit together.
    section_sizes = [true_count(section) - 2 for section in sections]
    assert max(section_sizes) <= 200 < 2 * min(section_sizes)

    chunks = chunker.split(document, markdown=True)
    check_chunks(document, chunks)
    for chunk in chunks:
        headings = re.findall(r"^#{1,2} .*$", chunk.text, flags=re.MULTILINE)
        # A chunk never straddles two sections, and starts at its heading.
        assert len(headings) <= 2, chunk.text[:120]
        section_headings = [h for h in headings if h.startswith("## ")]
        assert len(section_headings) <= 1
        if section_headings:
            assert chunk.text.startswith(("## ", "# Handbook")), chunk.text[:120]
    found = sorted(int(m) for c in chunks for m in re.findall(r"^## Section (\d+)$", c.text, re.M))
    assert found == list(range(12))
    # Plain-text splitting of the same document does cut across sections.
    plain = chunker.split(document)
    assert any(not chunk.text.startswith("#") for chunk in plain)


def test_empty_and_whitespace_text(tokenizer: Tokenizer) -> None:
    chunker = Chunker(tokenizer, max_tokens=256)
    for text in ("", " ", "\n\n\t  \n"):
        assert chunker.split(text) == []
        assert chunker.split(text, markdown=True) == []
    short = chunker.split("  Just one line.  ")
    assert [(c.text, c.char_start, c.char_end, c.token_count) for c in short] == [
        ("Just one line.", 2, 16, 6)
    ]


def test_offsets_are_characters_not_bytes(tokenizer: Tokenizer) -> None:
    text = ("Ünïcödé façade — naïve café ✓ 東京. " * 80).strip()
    chunks = Chunker(tokenizer, max_tokens=64, overlap_tokens=0).split(text)
    assert len(chunks) > 3
    check_chunks(text, chunks)


def test_oversized_piece_is_cut_not_truncated(tokenizer: Tokenizer) -> None:
    # The splitter cannot produce this (it cuts down to graphemes), so call the
    # safety net directly: whatever it returns must fit and map to the source.
    chunker = Chunker(tokenizer, max_tokens=12, chunk_tokens=10, overlap_tokens=0)
    source = "xx " + " ".join(SENTENCES[:3])
    parts = chunker._fit(3, source[3:])
    assert len(parts) > 2
    for start, part in parts:
        assert source[start : start + len(part)] == part
        assert true_count(part) <= 12


def test_bad_sizes_are_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tokenizer, max_tokens=256, chunk_tokens=32, overlap_tokens=32)
    with pytest.raises(ValueError, match="special tokens"):
        Chunker(tokenizer, max_tokens=2)
    with pytest.raises(ValueError, match="overlap_chars"):
        Chunker(None, max_tokens=8191, chunk_chars=(100, 200), overlap_chars=100)


def test_character_mode_for_providers_without_a_local_tokenizer() -> None:
    chunker = Chunker(None, max_tokens=8191, chunk_tokens=256, overlap_tokens=32)
    assert (chunker.mode, chunker.capacity, chunker.overlap) == ("characters", (768, 1024), 128)
    for text in long_texts():
        chunks = chunker.split(text)
        check_chunks(text, chunks)
        assert max(len(chunk.text) for chunk in chunks) <= 1024
        assert all(chunk.token_count == math.ceil(len(chunk.text) / 4) for chunk in chunks)
        assert chunker.split(text, markdown=True)

    # A small provider limit caps chunks so that even 4 tokens per character fit.
    small = Chunker(None, max_tokens=512)
    assert (small.capacity, small.overlap) == ((95, 127), 16)
    assert all(len(c.text) <= 127 for c in small.split(generated_prose(10)))


def test_for_embedder_uses_characters_for_litellm() -> None:
    embedder = LiteLLMEmbedder("openai/text-embedding-3-small", 1536, max_tokens=8191)
    chunker = Chunker.for_embedder(embedder, chunk_tokens=200, overlap_tokens=20)
    assert (chunker.mode, chunker.capacity, chunker.overlap) == ("characters", (600, 800), 80)
    chunks = chunker.split(generated_prose(20))
    assert [c.token_count for c in chunks] == embedder.count_tokens([c.text for c in chunks])


MIXED_MARKDOWN = """# Café culture in Zürich

Owners reported a 12% rise in visits; naïve estimates said 5%.\u00a0Prices rose too.

- 東京 and 北京 were the most common origins (CJK characters are tokens of their own)
- Straße, façade, déjà vu: accents are stripped by the model's normalizer

```python
def total(items):
    return sum(item.price for item in items)  # tabs\tand odd   spacing
```

""" + generated_prose(40, seed=3)


@pytest.mark.parametrize("markdown", [False, True])
def test_word_sum_sizing_gives_the_tokenizers_chunks(tokenizer: Tokenizer, markdown: bool) -> None:
    # The splitter is sized by summing cached per-word counts (much cheaper than running the
    # tokenizer on every candidate piece); for BERT's tokenizer that sum is the real count, so
    # the chunks must be exactly those of the tokenizer-driven splitter.
    from semantic_text_splitter import MarkdownSplitter, TextSplitter

    chunker = Chunker(tokenizer, max_tokens=256, chunk_tokens=120, overlap_tokens=16)
    assert chunker._by_words
    reference = (MarkdownSplitter if markdown else TextSplitter).from_huggingface_tokenizer(
        _PLAIN, chunker.capacity, overlap=16, trim=True
    )
    for text in [MIXED_MARKDOWN, *long_texts()]:
        got = [(chunk.char_start, chunk.text) for chunk in chunker.split(text, markdown=markdown)]
        assert got == reference.chunk_indices(text)


def test_chunks_carry_the_models_token_ids(tokenizer: Tokenizer) -> None:
    chunker = Chunker(tokenizer, max_tokens=256)
    chunks = chunker.split(MIXED_MARKDOWN, markdown=True)
    for chunk in chunks:
        assert chunk.token_ids == _PLAIN.encode(chunk.text, add_special_tokens=True).ids
        assert len(chunk.token_ids) == chunk.token_count
    # Ids are a by-product, not part of a chunk's identity.
    first = chunks[0]
    assert first == Chunk(first.text, 0, first.token_count, first.char_start, first.char_end)


def test_tokenizers_with_spaces_inside_tokens_are_sized_by_the_tokenizer() -> None:
    # Byte-level BPE glues a space to the next word: counts are not sums over words, so the
    # chunker must leave sizing to the tokenizer itself.
    from tokenizers import models, pre_tokenizers

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "Ġ": 1, "b": 2}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    chunker = Chunker(bpe, max_tokens=64, chunk_tokens=16, overlap_tokens=0)
    assert not chunker._by_words
    chunks = chunker.split("ab ba " * 40)
    assert chunks and all(chunk.token_count <= 64 for chunk in chunks)


def test_character_mode_chunks_have_no_token_ids() -> None:
    chunker = Chunker(None, max_tokens=8191, chunk_tokens=100, overlap_tokens=10)
    assert all(chunk.token_ids is None for chunk in chunker.split(generated_prose(5)))
