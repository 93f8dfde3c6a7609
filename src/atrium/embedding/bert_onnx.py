"""Hugging Face's ``BertModel`` as an ONNX graph written with ``onnx.helper``, from safetensors.

Used by :mod:`atrium.embedding.model_build` to turn the all-MiniLM-L6-v2 checkpoint into ONNX
without torch. The graph computes exactly what ``BertModel`` (eager attention, no pooler)
does: word + token-type + position embeddings and LayerNorm, then per layer multi-head
self-attention with an additive padding mask, a dense output with residual and LayerNorm, and
a feed-forward block with exact (erf) GELU, residual and LayerNorm.
tests/embedding/test_model_build.py compares it with the full-precision torch embeddings
(cosine > 0.99999).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

__all__ = ["OPSET", "build_graph", "read_safetensors"]

OPSET = 17

_ARRAY = npt.NDArray[Any]
_SAFETENSORS_DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(path: Path) -> dict[str, _ARRAY]:
    """Read a ``.safetensors`` file: an 8-byte little-endian header length, a JSON header,
    then the raw little-endian tensors.

    Raises:
        ValueError: If a tensor has a data type this reader does not know.
    """
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    body = memoryview(data)[8 + header_length :]
    tensors: dict[str, _ARRAY] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = array.reshape(entry["shape"]).astype(dtype)
    return tensors


def build_graph(weights: dict[str, _ARRAY], config: dict[str, Any]) -> onnx.ModelProto:
    """The fp32 BERT encoder of Hugging Face's ``BertModel`` (no pooler) as an ONNX model.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[batch, sequence]``);
    output ``last_hidden_state`` (float32 ``[batch, sequence, hidden]``).

    Args:
        weights: The checkpoint's tensors by name (``embeddings.*``, ``encoder.layer.N.*``).
        config: The checkpoint's ``config.json``.
    """
    # lazy: only a build of the model needs onnx (slow to import), never a process that embeds
    from onnx import TensorProto, helper, numpy_helper

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config["layer_norm_eps"])
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") != "absolute":
        raise ValueError(f"unsupported BERT variant: {config}")

    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def const(name: str, value: npt.ArrayLike, dtype: type = np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, name: str, inputs: Sequence[str], **attrs: Any) -> str:
        nodes.append(helper.make_node(op, list(inputs), [f"{name}_output_0"], name, **attrs))
        return f"{name}_output_0"

    def linear(x: str, prefix: str, scope: str) -> str:
        # torch's Linear is x @ W.T + b: the initializer holds W.T, as torch's exporter writes it.
        weight = const(f"{prefix}.weight.T", weights[f"{prefix}.weight"].T.copy())
        bias = const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("Add", f"{scope}/Add", [bias, node("MatMul", f"{scope}/MatMul", [x, weight])])

    def layer_norm(x: str, prefix: str, scope: str) -> str:
        gamma = const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        beta = const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return node("LayerNormalization", scope, [x, gamma, beta], axis=-1, epsilon=eps)

    # Embeddings: word + token type, then + position (HF's order of additions), LayerNorm.
    word = node(
        "Gather",
        "/embeddings/word_embeddings/Gather",
        [
            const(
                "embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]
            ),
            "input_ids",
        ],
    )
    token_type = node(
        "Gather",
        "/embeddings/token_type_embeddings/Gather",
        [
            const(
                "embeddings.token_type_embeddings.weight",
                weights["embeddings.token_type_embeddings.weight"],
            ),
            "token_type_ids",
        ],
    )
    # Positions 0..sequence-1. Shape's start/end (not a Gather on the shape) keeps the
    # quantiser's Gather rule to the three embedding tables.
    length = node("Shape", "/embeddings/Shape", ["input_ids"], start=1, end=2)
    length = node("Squeeze", "/embeddings/Squeeze", [length])
    positions = node(
        "Range",
        "/embeddings/Range",
        [const("zero_i64", 0, np.int64), length, const("one_i64", 1, np.int64)],
    )
    position = node(
        "Gather",
        "/embeddings/position_embeddings/Gather",
        [
            const(
                "embeddings.position_embeddings.weight",
                weights["embeddings.position_embeddings.weight"],
            ),
            positions,
        ],
    )
    summed = node("Add", "/embeddings/Add", [word, token_type])
    summed = node("Add", "/embeddings/Add_1", [summed, position])
    state = layer_norm(summed, "embeddings.LayerNorm", "/embeddings/LayerNorm/LayerNormalization")

    # Additive attention mask, [batch, 1, 1, sequence]: 0 where attended, the most negative
    # float32 where padded (HF's eager attention), so padding gets zero weight after softmax.
    keep = node("Cast", "/mask/Cast", ["attention_mask"], to=TensorProto.BOOL)
    keep = node("Unsqueeze", "/mask/Unsqueeze", [keep, const("mask_axes", [1, 2], np.int64)])
    mask = node(
        "Where",
        "/mask/Where",
        [keep, const("mask_zero", 0.0), const("mask_min", np.finfo(np.float32).min)],
    )
    split_heads = const("split_heads_shape", [0, 0, heads, head_dim], np.int64)
    merge_heads = const("merge_heads_shape", [0, 0, hidden], np.int64)
    scale = const("attention_scale", head_dim**-0.5)
    sqrt2 = const("gelu_sqrt2", np.sqrt(2.0))
    one = const("gelu_one", 1.0)
    half = const("gelu_half", 0.5)

    for n in range(int(config["num_hidden_layers"])):
        p, s = f"encoder.layer.{n}", f"/encoder/layer.{n}"
        per_head = {}
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            projected = linear(state, f"{p}.attention.self.{part}", f"{s}/attention/self/{part}")
            projected = node(
                "Reshape", f"{s}/attention/self/{part}/Reshape", [projected, split_heads]
            )
            per_head[part] = node(
                "Transpose", f"{s}/attention/self/{part}/Transpose", [projected], perm=perm
            )
        scores = node("MatMul", f"{s}/attention/self/MatMul", [per_head["query"], per_head["key"]])
        scores = node("Mul", f"{s}/attention/self/Mul", [scores, scale])
        scores = node("Add", f"{s}/attention/self/Add", [scores, mask])
        probs = node("Softmax", f"{s}/attention/self/Softmax", [scores], axis=-1)
        context = node("MatMul", f"{s}/attention/self/MatMul_1", [probs, per_head["value"]])
        context = node("Transpose", f"{s}/attention/self/Transpose", [context], perm=[0, 2, 1, 3])
        context = node("Reshape", f"{s}/attention/self/Reshape", [context, merge_heads])
        attended = linear(context, f"{p}.attention.output.dense", f"{s}/attention/output/dense")
        attended = node("Add", f"{s}/attention/output/Add", [attended, state])
        attended = layer_norm(
            attended,
            f"{p}.attention.output.LayerNorm",
            f"{s}/attention/output/LayerNorm/LayerNormalization",
        )
        # Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, in the order torch's exporter writes it.
        inner = linear(attended, f"{p}.intermediate.dense", f"{s}/intermediate/dense")
        act = f"{s}/intermediate/intermediate_act_fn"
        erf = node("Erf", f"{act}/Erf", [node("Div", f"{act}/Div", [inner, sqrt2])])
        gelu = node("Mul", f"{act}/Mul", [inner, node("Add", f"{act}/Add", [erf, one])])
        gelu = node("Mul", f"{act}/Mul_1", [gelu, half])
        out = linear(gelu, f"{p}.output.dense", f"{s}/output/dense")
        out = node("Add", f"{s}/output/Add", [out, attended])
        state = layer_norm(out, f"{p}.output.LayerNorm", f"{s}/output/LayerNorm/LayerNormalization")

    nodes.append(helper.make_node("Identity", [state], ["last_hidden_state"], "/output"))
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, dims)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="atrium"
    )
    # A fixed IR version: the file must not change with the onnx package's default.
    model.ir_version = 8
    return model
