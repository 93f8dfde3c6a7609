"""The live server fixture serves the API over a real socket."""

from __future__ import annotations

from typing import Any

import httpx


def test_live_server_answers(live_server: Any) -> None:
    r = httpx.get(live_server.url + "/readyz", timeout=10)
    assert r.status_code == 200, r.text
