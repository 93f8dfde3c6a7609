"""The SDK's generated models match what the current app's OpenAPI document produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "generate-client-models"
COMMITTED = ROOT / "clients" / "python" / "src" / "atrium_client" / "models.py"


def test_generated_models_are_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "models.py"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=240,
    )
    fresh = out.read_text()
    assert "class SearchResponse(BaseModel)" in fresh
    assert fresh == COMMITTED.read_text(), (
        "clients/python/src/atrium_client/models.py is out of date with the API's schemas: "
        "run scripts/generate-client-models and commit the result"
    )
