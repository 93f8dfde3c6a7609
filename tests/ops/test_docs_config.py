"""The configuration reference and .env.example document every setting, and are up to date."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from atrium.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"
ENV_NAMES = {f"ATRIUM_{name.upper()}" for name in Settings.model_fields}


def test_every_setting_is_in_the_configuration_reference() -> None:
    documented = set(re.findall(r"^\| `(ATRIUM_[A-Z0-9_]+)` \|", DOC.read_text(), re.M))
    missing = sorted(ENV_NAMES - documented)
    assert not missing, (
        f"undocumented in docs/configuration.md: {missing}; run scripts/gen-config-docs"
    )
    stale = sorted(documented - ENV_NAMES)
    assert not stale, f"docs/configuration.md documents settings that do not exist: {stale}"


def test_every_setting_is_in_env_example() -> None:
    listed = set(re.findall(r"^#? ?(ATRIUM_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    missing = sorted(ENV_NAMES - listed)
    assert not missing, f"missing from .env.example: {missing}; run scripts/gen-config-docs"
    stale = sorted(listed - ENV_NAMES)
    assert not stale, f".env.example lists settings that do not exist: {stale}"


def test_every_setting_has_a_description() -> None:
    bare = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not bare, f"give these a Field(description=...) in src/atrium/config.py: {bare}"


def test_generated_files_are_up_to_date() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-config-docs"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
