"""Versioned prompt files (``<name>_v<N>.txt``) and their rendering.

A prompt file has a ``=== system ===`` and a ``=== user ===`` section; ``{{name}}`` placeholders
are replaced by plain text substitution, so sources containing braces cannot break rendering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent

#: The answer prompt in use; its name is reported with every answer.
ANSWER_PROMPT = "answer_v1"

_SECTION = re.compile(r"^=== (system|user) ===$", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    """A loaded prompt: its versioned name and its two templates."""

    name: str
    system: str
    user: str

    def render(self, **values: str) -> list[dict[str, str]]:
        """Chat messages with every ``{{key}}`` replaced by ``values[key]``."""
        system, user = self.system, self.user
        for key, value in values.items():
            system = system.replace("{{" + key + "}}", value)
            user = user.replace("{{" + key + "}}", value)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@lru_cache
def load(name: str = ANSWER_PROMPT) -> Prompt:
    """Load ``<name>.txt`` from this directory.

    Raises:
        FileNotFoundError: no such prompt.
        ValueError: the file lacks a system or a user section.
    """
    text = (PROMPTS_DIR / f"{name}.txt").read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if "system" not in sections or "user" not in sections:
        raise ValueError(f"prompt {name} needs '=== system ===' and '=== user ===' sections")
    return Prompt(name=name, system=sections["system"], user=sections["user"])
