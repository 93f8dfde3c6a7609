"""Search: per-tenant vector and hybrid retrieval, metadata filters, result cache."""
