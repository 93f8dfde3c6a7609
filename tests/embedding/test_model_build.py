"""The embedding model build: its graph against torch, its determinism, its cache (no mocks).

Builds run for real (a few seconds each) into temporary directories; the venv's cache is
only read.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from atrium.embedding import bert_onnx, model_build
from atrium.embedding.local import LocalOnnxEmbedder
from atrium.embedding.model_build import ModelBuildError

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "minilm_reference.json"


def test_fp32_graph_is_the_torch_model() -> None:
    """Before quantisation the hand-written graph computes what torch's BertModel does."""
    source = model_build.source_dir()
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    graph = bert_onnx.build_graph(bert_onnx.read_safetensors(source / "model.safetensors"), config)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=reference["max_seq_length"])
    got = model_build._embed(session, [tokenizer.encode(t).ids for t in reference["sentences"]])
    expected = np.asarray(reference["vectors"], dtype=np.float64)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert (got * expected).sum(axis=1).min() > 0.99999


def test_cached_model_has_the_interface_the_embedder_expects() -> None:
    directory = model_build.ensure_model()
    record = json.loads((directory / "build.json").read_text(encoding="utf-8"))
    session = ort.InferenceSession(
        str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        name: ("tensor(int64)", ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    [output] = session.get_outputs()
    assert (output.name, output.type, output.shape) == (
        "last_hidden_state",
        "tensor(float)",
        ["batch", "sequence", 384],
    )
    versions = (record["onnx"], record["onnxruntime"])
    expected = model_build.EXPECTED_SHA256.get(versions)
    if expected:
        assert record["sha256"]["model.onnx"] == expected
    assert record["min_cosine_vs_fp32"] >= model_build.MIN_COSINE


def _build(target: str) -> str:
    return str(model_build.build_model(Path(target)))


def test_concurrent_builds_publish_one_complete_model(tmp_path: Path) -> None:
    """Two processes starting at once: one builds, the other waits and reuses it."""
    target = tmp_path / "models" / "m"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build, [str(target), str(target)])
    assert results == [str(target), str(target)]
    assert model_build._valid(target)
    # Nothing half-written is left beside it: only the model and its lock file.
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]
    # Byte-for-byte what the venv's cache holds: the build is deterministic.
    cached = model_build.ensure_model()
    assert (target / "model.onnx").read_bytes() == (cached / "model.onnx").read_bytes()
    embedder = LocalOnnxEmbedder(model_dir=target, threads=1)
    assert embedder.embed(["hello"]).shape == (1, 384)

    # A damaged file is noticed and rebuilt.
    with (target / "model.onnx").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\0" * 16)
    assert not model_build._valid(target)
    model_build.build_model(target)
    assert model_build._valid(target)


def test_no_writable_cache_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(model_build, "cache_roots", lambda: [blocker / "models"])
    with pytest.raises(ModelBuildError, match=r"python -m atrium\.embedding\.model_build"):
        model_build.ensure_model()
