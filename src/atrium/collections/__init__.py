"""Collections: named sets of documents searched together."""
