"""Grounded answers: litellm chat completions, versioned prompts, extractive fallback."""
