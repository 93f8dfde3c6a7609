"""Embeddings for ingestion and search: the :class:`~atrium.embedding.base.Embedder` protocol,
the local ONNX model (and its build), the LiteLLM embedder, one cached factory, query vectors.

Submodules are imported directly (``atrium.embedding.local``, ...): importing the package does
not load onnxruntime or litellm, and ``python -m atrium.embedding.model_build`` runs cleanly.
"""
