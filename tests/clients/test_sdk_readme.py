"""The SDK README's quick start runs verbatim against the live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.llm_server import LLMServer
from tests.support.sdk import clean_state, new_account

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"


def quick_start() -> str:
    """The first ```python block after the "Quick start" heading."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    match = re.search(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert match, "no python block in the quick start"
    return match.group(1)


def _substitute(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"{old!r} should appear once in the quick start"
    return code.replace(old, new)


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.xdist_group("sdk")
async def test_readme_quick_start_runs(
    app: Any,
    live_server: Any,
    test_env: dict[str, Any],
    llm_server: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # What the live server's LLM (the session's loopback server) answers.
    monkeypatch.setitem(llm_server.behaviour, "answer", "Refunds take up to 14 days [1].")
    try:
        await _run_quick_start(app, live_server.url, tmp_path)
    finally:
        clean_state(test_env)


async def _run_quick_start(app: Any, url: str, tmp_path: Path) -> None:
    account = await new_account(app, url)
    code = quick_start()
    code = _substitute(code, "http://127.0.0.1:8000", url)
    code = _substitute(code, 'api_key="atr_..."', f'api_key="{account.key}"')
    code = _substitute(code, 'tenant_id="..."', f'tenant_id="{account.tenant_id}"')
    handbook = tmp_path / "handbook"
    handbook.mkdir()
    (handbook / "refunds.md").write_text(
        "# Refund policy\n\nRefunds take up to 14 days: the money goes back to the card that "
        "paid, once the returned item reaches our warehouse.\n"
    )
    (handbook / "returns.txt").write_text(
        "Returns are free within 30 days of delivery. Print the label from your account and "
        "drop the parcel at any post office.\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # Search hits ("<score> <text>"), then the answer's events, the last one done.
    assert re.match(r"^-?\d+\.\d+ ", lines[0]) and "Refund" in r.stdout
    assert lines[-1].startswith("type='done'")
    assert "answer='Refunds take up to 14 days [1].'" in lines[-1]
    assert any(line.startswith("type='retrieval'") for line in lines)
    assert any(line.startswith("type='delta'") for line in lines)
