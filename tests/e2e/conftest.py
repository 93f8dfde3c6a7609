"""Browser tests: a real uvicorn server on a free loopback port and Debian's headless Chromium.

Playwright drives ``/usr/bin/chromium`` (no browser download: ``playwright install`` is never
run). A failing test leaves a full-page screenshot and the browser console in test-artifacts/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_configure(config: pytest.Config) -> None:
    """Register xdist's group marker when xdist is off (``-p no:xdist``, strict markers)."""
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one xdist worker")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item, so fixtures can tell a failure."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ConsoleServer:
    """The app served by uvicorn in a subprocess."""

    base_url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def console_server(test_env: dict[str, Any], llm_server: Any) -> Iterator[ConsoleServer]:
    """uvicorn serving ``create_app()`` with the test settings; mail links point at it, and
    answers are written by the loopback LLM server (so they stream)."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "ATRIUM_PUBLIC_URL": base_url,
        "ATRIUM_HOST": "127.0.0.1",
        "ATRIUM_PORT": str(port),
        "ATRIUM_LLM_MODEL": "openai/test-model",
        "ATRIUM_LLM_API_BASE": llm_server.base_url,
        "ATRIUM_LLM_API_KEY": "sk-test",
        "ATRIUM_LLM_TIMEOUT_SECONDS": "10",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    log_path = test_env["data_dir"] / f"console-uvicorn-{port}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "atrium.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ConsoleServer(base_url=base_url, log_path=log_path, proc=proc)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"uvicorn did not answer on {base_url}:\n{server.log_tail()}")
        time.sleep(0.3)
    yield server
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(
            f"Chromium is not installed at {CHROMIUM}: run ./scripts/test (it installs it) or "
            "`apt-get install -y chromium`"
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(
    browser: Browser,
    console_server: ConsoleServer,
    request: pytest.FixtureRequest,
    clean_state: None,
) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) on the console; a screenshot if the test fails."""
    context = await browser.new_context(
        base_url=console_server.base_url,
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(15_000)
    page = await context.new_page()
    logs: list[str] = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    try:
        yield page
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            name = re.sub(r"[^\w.-]+", "_", request.node.name)
            try:
                await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            except Exception as exc:  # the page may be gone; keep the logs anyway
                logs.append(f"screenshot failed: {exc}")
            (ARTIFACTS / f"{name}.console.txt").write_text(
                f"url: {page.url}\n"
                + "\n".join(logs)
                + "\n--- server ---\n"
                + console_server.log_tail()
            )
        await context.close()
