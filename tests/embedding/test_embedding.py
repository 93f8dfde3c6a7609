"""Embedders against real models and a real HTTP server (no mocks).

The local tests run the int8 ONNX model built from the weights package
(atrium.embedding.model_build) and compare it with vectors the full-precision
torch model produced (tests/data/minilm_reference.json, written by
scripts/make_embedding_reference.py). The LiteLLM tests run an OpenAI-compatible
``/v1/embeddings`` server on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atrium.embedding.base import Embedder, EmbeddingError
from atrium.embedding.factory import Purpose, get_embedder
from atrium.embedding.hosted import LiteLLMEmbedder
from atrium.embedding.local import LocalOnnxEmbedder

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"

VARIED_TEXTS = [
    "A considerably longer sentence about the migration of arctic terns, which fly from "
    "pole to pole every year and see more daylight than any other animal on the planet.",
    "Short.",
    "Kubernetes schedules pods onto nodes.",
    "",
    "The invoice total was 1,299.99 EUR, due within thirty days of receipt.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; "
    "it happens in the chloroplasts of plant cells and feeds nearly all life on Earth.",
    "Yes",
]


@pytest.fixture(scope="module")
def local() -> LocalOnnxEmbedder:
    return LocalOnnxEmbedder(threads=2)


def test_local_matches_full_precision_reference(local: LocalOnnxEmbedder) -> None:
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    expected = np.asarray(reference["vectors"], dtype=np.float32)
    got = local.embed(reference["sentences"])
    assert got.shape == expected.shape == (len(reference["sentences"]), 384)
    cosines = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    assert cosines.min() >= 0.99, cosines


def test_local_shape_normalisation_and_order(local: LocalOnnxEmbedder) -> None:
    small_batches = LocalOnnxEmbedder(batch_size=2, threads=2)
    together = small_batches.embed(VARIED_TEXTS)
    assert together.dtype == np.float32
    assert together.shape == (len(VARIED_TEXTS), local.dimension)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)

    # Each text alone (no batch mates, no padding) must land on its own row.
    alone = np.concatenate([local.embed([text]) for text in VARIED_TEXTS])
    similarity = together @ alone.T
    assert list(similarity.argmax(axis=1)) == list(range(len(VARIED_TEXTS)))
    # The int8 model scales activations per batch tensor, so batch mates and
    # padding move a vector slightly; most for texts of 1-3 tokens ("" is
    # just [CLS] [SEP]), which is why this bound is looser than the reference.
    assert similarity.diagonal().min() >= 0.95


def test_local_empty_input(local: LocalOnnxEmbedder) -> None:
    assert local.embed([]).shape == (0, local.dimension)
    assert local.count_tokens([]) == []


def test_local_semantics(local: LocalOnnxEmbedder) -> None:
    query, close, far = local.embed(
        [
            "How do I change my password?",
            "Steps to reset the password of your account",
            "The recipe needs three eggs and a cup of flour.",
        ]
    )
    assert float(query @ close) > float(query @ far) + 0.3


def test_local_truncates_long_text_but_counts_its_true_length(local: LocalOnnxEmbedder) -> None:
    words = " ".join(f"word{i % 50} is here" for i in range(300))
    tail = " and a completely different ending about volcanoes erupting under the sea"
    counts = local.count_tokens([words, words + tail, "hello world"])
    # Counts include [CLS] and [SEP] and are never truncated.
    assert counts[0] > 2 * local.max_tokens
    assert counts[1] > counts[0]
    assert counts[2] == 4
    vectors = local.embed([words, words + tail])
    assert vectors.shape == (2, local.dimension)
    assert np.isfinite(vectors).all()
    # The tail lies past max_tokens, so the safety net cut it off: same vector.
    assert float(vectors[0] @ vectors[1]) > 0.999


def test_local_tokenizer_is_plain(local: LocalOnnxEmbedder) -> None:
    tokenizer = local.tokenizer
    assert tokenizer.truncation is None
    assert tokenizer.padding is None
    long_text = "token " * 1000
    assert len(tokenizer.encode(long_text).ids) == 1002


def test_local_satisfies_protocol(local: LocalOnnxEmbedder) -> None:
    assert isinstance(local, Embedder)
    assert local.model_name == "all-MiniLM-L6-v2"
    assert local.dimension == 384
    assert local.max_tokens == 256


def test_local_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        LocalOnnxEmbedder(max_tokens=1000)
    with pytest.raises(FileNotFoundError, match="model_build"):
        LocalOnnxEmbedder(model_dir=tmp_path)


# --------------------------------------------------------------------------
# LiteLLM against a real OpenAI-compatible server on 127.0.0.1
# --------------------------------------------------------------------------


def _fake_vector(text: str, dimension: int) -> list[float]:
    """A deterministic, deliberately unnormalised vector per text."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [float(digest[i % len(digest)]) - 100.0 for i in range(dimension)]


class EmbeddingServer:
    """Minimal OpenAI ``/v1/embeddings`` endpoint with scripted failures."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.failures: list[int] = []  # HTTP statuses to answer before succeeding
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body})
                    status = server.failures.pop(0) if server.failures else 200
                if self.path != "/v1/embeddings":
                    self._reply(404, {"error": {"message": "not found", "type": "invalid"}})
                elif status != 200:
                    error = {"message": f"scripted {status}", "type": "test", "code": status}
                    # The OpenAI SDK under LiteLLM would retry 429/5xx on its own
                    # (LiteLLM ignores max_retries=0); this header turns that
                    # off, so every retry seen here is LiteLLMEmbedder's.
                    self._reply(status, {"error": error}, {"x-should-retry": "false"})
                else:
                    self._reply(200, server.answer(body))

            def _reply(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(texts):
            vector = _fake_vector(text, self.dimension)
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                raw = np.asarray(vector, dtype="<f4").tobytes()
                embedding = base64.b64encode(raw).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        data.reverse()  # out of order on purpose: "index" must be honoured
        return {
            "object": "list",
            "data": data,
            "model": body.get("model", "test"),
            "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
        }

    def __enter__(self) -> EmbeddingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(dimension=16) as running:
        yield running


def _litellm(server: EmbeddingServer, **overrides: Any) -> LiteLLMEmbedder:
    settings: dict[str, Any] = {
        "model": "openai/test-embedding",
        "dimension": 16,
        "api_base": server.api_base,
        "api_key": "sk-test",
        "batch_size": 2,
        "max_retries": 3,
        "timeout": 10.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(overrides)
    return LiteLLMEmbedder(**settings)


def test_litellm_success_batches_and_normalises(server: EmbeddingServer) -> None:
    embedder = _litellm(server)
    texts = ["alpha", "beta", "gamma", "delta", "epsilon"]
    vectors = embedder.embed(texts)
    assert vectors.dtype == np.float32
    assert vectors.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for text, vector in zip(texts, vectors, strict=True):
        expected = np.asarray(_fake_vector(text, 16), dtype=np.float32)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-5)
    assert len(server.requests) == 3  # batches of 2, 2, 1
    assert [r["path"] for r in server.requests] == ["/v1/embeddings"] * 3
    assert isinstance(embedder, Embedder)
    assert embedder.embed([]).shape == (0, 16)


def test_litellm_dimension_mismatch_is_a_permanent_error(server: EmbeddingServer) -> None:
    embedder = _litellm(server, dimension=384)
    with pytest.raises(EmbeddingError, match=r"16-dimensional.*384") as caught:
        embedder.embed(["alpha"])
    assert caught.value.transient is False


def test_litellm_retries_rate_limit_with_backoff(
    server: EmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.failures = [429, 503]
    with caplog.at_level(logging.WARNING, logger="atrium.embedding.hosted"):
        vectors = _litellm(server).embed(["alpha"])
    assert vectors.shape == (1, 16)
    assert len(server.requests) == 3  # 429, 503, then success
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2, retries
    assert "RateLimitError" in retries[0]


def test_litellm_gives_up_after_max_retries(server: EmbeddingServer) -> None:
    # max_retries=0: exactly one request, proving no hidden client-side retries.
    server.failures = [429, 429]
    with pytest.raises(EmbeddingError) as caught:
        _litellm(server, max_retries=0).embed(["alpha"])
    assert caught.value.transient is True
    assert len(server.requests) == 1


def test_litellm_auth_failure_is_not_retried(server: EmbeddingServer) -> None:
    server.failures = [401]
    with pytest.raises(EmbeddingError) as caught:
        _litellm(server).embed(["alpha"])
    assert caught.value.transient is False
    assert len(server.requests) == 1


def test_litellm_connection_refused_is_transient() -> None:
    with EmbeddingServer(dimension=16) as stopped:
        api_base = stopped.api_base
    # max_retries=0: the OpenAI SDK still retries connection errors twice
    # itself (about 1-2 s), see LiteLLMEmbedder's docstring.
    embedder = LiteLLMEmbedder(
        "openai/test-embedding",
        16,
        api_base=api_base,
        api_key="sk-test",
        max_retries=0,
        timeout=5.0,
        backoff_base=0.01,
    )
    with pytest.raises(EmbeddingError) as caught:
        embedder.embed(["alpha"])
    assert caught.value.transient is True


def test_litellm_count_tokens_is_an_estimate() -> None:
    embedder = LiteLLMEmbedder("openai/test-embedding", 16)
    assert embedder.count_tokens(["", "abcd", "abcde", "x" * 400]) == [1, 1, 2, 100]


def test_local_embeds_token_ids_like_texts(local: LocalOnnxEmbedder) -> None:
    texts = [text for text in VARIED_TEXTS if text]
    ids = [local.tokenizer.encode(text, add_special_tokens=True).ids for text in texts]
    assert np.array_equal(local.embed_token_ids(ids), local.embed(texts))
    assert local.embed_token_ids([]).shape == (0, 384)
    with pytest.raises(ValueError, match="exceeds"):
        local.embed_token_ids([[101] + [1000] * local.max_tokens + [102]])


def test_factory_checks_the_dimension_for_ingestion_and_queries() -> None:
    from atrium.config import Settings

    wrong = Settings(embedding_provider="local", embedding_dimension=768)
    purposes: tuple[Purpose, ...] = ("ingestion", "query")
    for purpose in purposes:
        with pytest.raises(ValueError, match="ATRIUM_EMBEDDING_DIMENSION is 768"):
            get_embedder(wrong, purpose)


def test_factory_caches_one_embedder_per_purpose_and_settings() -> None:
    from atrium.config import Settings

    settings = Settings(embedding_provider="local", embedding_threads=1)
    query = get_embedder(settings, "query")
    assert get_embedder(settings, "query") is query
    assert get_embedder(settings, "ingestion") is not query
    changed = settings.model_copy(update={"embedding_max_tokens": 128})
    assert get_embedder(changed, "query") is not query


def test_factory_gives_queries_a_shorter_hosted_retry_policy() -> None:
    from atrium.config import Settings

    settings = Settings(
        embedding_provider="litellm",
        embedding_model="openai/test-embedding",
        embedding_dimension=16,
        embedding_max_tokens=8191,
        llm_timeout_seconds=120.0,
    )
    query = get_embedder(settings, "query")
    ingestion = get_embedder(settings, "ingestion")
    assert isinstance(query, LiteLLMEmbedder) and isinstance(ingestion, LiteLLMEmbedder)
    assert (query.max_retries, query.timeout) == (1, 30.0)
    assert (ingestion.max_retries, ingestion.timeout) == (5, 60.0)
    assert query.dimension == ingestion.dimension == 16
