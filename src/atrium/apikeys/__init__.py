"""API keys: creation, rotation, revocation and authentication of ``atr_...`` keys."""
