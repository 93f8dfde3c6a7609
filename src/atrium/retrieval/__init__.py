"""Search: per-tenant vector, lexical (BM25) and hybrid retrieval, reranking, metadata filters,
result cache."""
