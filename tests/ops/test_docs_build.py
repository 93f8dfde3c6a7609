"""The documentation site builds with warnings as errors, and the API guide calls real routes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from atrium.app import create_app
from atrium.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "api-guide.md"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("api-guide", "configuration", "operations", "scaling", "security", "logging"):
        assert (tmp_path / page / "index.html").is_file(), page


def _guide_calls() -> list[tuple[str, str]]:
    """(method, path template) of every curl in the guide's bash blocks."""
    calls = []
    for block in re.findall(r"^```bash\n(.*?)^```", GUIDE.read_text(), re.M | re.S):
        command = block.replace("\\\n", " ")
        for line in command.splitlines():
            for curl in re.split(r"\|", line):
                if "curl " not in curl:
                    continue
                m = re.search(r"\$ATRIUM(/[^\s\"']*)", curl)
                if not m:
                    continue
                explicit = re.search(r"-X (\w+)", curl)
                method = explicit.group(1) if explicit else ("POST" if " -d " in curl else "GET")
                path = re.sub(r"\$\w+", "{x}", m.group(1))
                calls.append((method.upper(), path))
    return calls


def _matches(template: str, path: str) -> bool:
    pattern = re.sub(r"\{[^}]+\}", "[^/]+", template)
    return re.fullmatch(pattern, path.replace("{x}", "x")) is not None


def test_every_call_in_the_api_guide_is_a_real_route() -> None:
    settings = load_settings(
        vector_database_url="postgresql+psycopg://u@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
    )
    schema: dict[str, Any] = create_app(settings).openapi()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    calls = _guide_calls()
    assert len(calls) >= 15, calls
    missing = [
        (method, path)
        for method, path in calls
        if not any(m == method and _matches(p, path) for m, p in routes)
    ]
    assert not missing, f"docs/api-guide.md calls routes that do not exist: {missing}"


def test_the_guide_shows_an_output_for_every_command_that_prints() -> None:
    text = GUIDE.read_text()
    # An empty output block means the guide was never run: scripts/check-api-guide --update.
    assert not re.search(r"^```(json|text)\n```", text, re.M), "an output block is empty"
