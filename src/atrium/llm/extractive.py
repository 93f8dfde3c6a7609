"""Extractive answers: the retrieved sentences most similar to the question, with citations.

Used when no LLM is configured (the embedded default). Nothing is generated: every sentence of
the answer is quoted from a source and cited with that source's number, so it is grounded by
construction. Sentences are compared with the same local embedding model as search.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atrium.config import Settings
from atrium.embedding.query import Vector, embed_texts

#: How many sentences an extractive answer quotes.
MAX_SENTENCES = 3
#: Candidate sentences embedded per answer (from the best sources first): bounds the CPU cost.
MAX_CANDIDATES = 64
MIN_CHARS = 20
MAX_CHARS = 600
#: Sentences much less similar than the best one are left out.
RELATIVE_CUTOFF = 0.15

NO_ANSWER = "No passage of the documents searched answers this question."

# A sentence ends at . ! ? (optionally followed by a closing quote or bracket) before
# whitespace and a capital, digit or opening quote; blank lines and list items end one too.
_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n|\n(?=\s*[-*•]\s)")


@dataclass(frozen=True)
class Sentence:
    """A candidate sentence and the source it comes from."""

    text: str
    source: int
    position: int


def split_sentences(text: str) -> list[str]:
    """Split a passage into sentences (a light rule-based splitter, good for prose)."""
    out: list[str] = []
    for piece in _SPLIT.split(text):
        s = " ".join(piece.split())
        if s:
            out.append(s)
    return out


def candidates(sources: Sequence[tuple[int, str]]) -> list[Sentence]:
    """Distinct sentences of the sources, best sources first, at most :data:`MAX_CANDIDATES`.

    Args:
        sources: ``(number, text)`` of each source, in rank order.
    """
    seen: set[str] = set()
    out: list[Sentence] = []
    for number, text in sources:
        for pos, sentence in enumerate(split_sentences(text)):
            if not MIN_CHARS <= len(sentence) <= MAX_CHARS or len(sentence.split()) < 4:
                continue
            key = sentence.casefold()
            if key in seen:  # overlapping chunks repeat sentences
                continue
            seen.add(key)
            out.append(Sentence(sentence, number, pos))
            if len(out) >= MAX_CANDIDATES:
                return out
    return out


def select(sentences: Sequence[Sentence], scores: Sequence[float]) -> list[Sentence]:
    """The best sentences: at most :data:`MAX_SENTENCES`, none far below the best."""
    if not sentences:
        return []
    order = sorted(range(len(sentences)), key=lambda i: scores[i], reverse=True)
    best = scores[order[0]]
    return [sentences[i] for i in order[:MAX_SENTENCES] if scores[i] >= best - RELATIVE_CUTOFF]


async def extract(
    settings: Settings, query_vector: Vector, sources: Sequence[tuple[int, str]]
) -> list[Sentence]:
    """The sentences of ``sources`` that best answer the query, best first."""
    sentences = candidates(sources)
    if not sentences:
        return []
    matrix = await embed_texts(settings, [s.text for s in sentences])
    scores = (matrix @ np.asarray(query_vector, dtype=np.float32)).tolist()
    return select(sentences, scores)


def render(sentences: Sequence[Sentence]) -> list[str]:
    """The answer as pieces (one per sentence, each with its citation)."""
    return [f"{s.text} [{s.source}]" for s in sentences] or [NO_ANSWER]
