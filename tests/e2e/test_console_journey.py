"""The console in Debian's headless Chromium, against a real uvicorn server and Celery worker.

The journey of the issue: sign up → open the link from the mail → log in → create a key →
create a collection → upload a file and see it become ready → ask a question and see a
streamed answer with citations → log out. Then: the API's validation messages shown next to
their fields, keyboard use and phone width.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.e2e.conftest import ConsoleServer
from tests.support.factories import DEFAULT_PASSWORD, create_tenant, create_user

# One worker serves every browser test: one uvicorn server and one Chromium.
pytestmark = pytest.mark.xdist_group("console-e2e")

REFRESH = "__Secure-atrium_refresh"

# Counts the upload's XMLHttpRequest progress events as the console's own handler sees them.
# (Injected by the DevTools protocol, which the page's CSP does not govern.)
COUNT_UPLOAD_PROGRESS = """
(() => {
  const add = XMLHttpRequestUpload.prototype.addEventListener;
  window.__uploadProgress = [];
  XMLHttpRequestUpload.prototype.addEventListener = function (type, fn, opts) {
    if (type !== "progress") return add.call(this, type, fn, opts);
    return add.call(this, type, (e) => {
      window.__uploadProgress.push([e.loaded, e.total]);
      return fn.call(this, e);
    }, opts);
  };
})();
"""

DOCUMENT = """# Photosynthesis

Photosynthesis is the process by which green plants turn sunlight, water and carbon dioxide
into glucose and oxygen. It takes place in the chloroplasts of leaf cells.
"""


async def test_sign_up_to_streamed_answer_and_log_out(
    page: Page,
    console_server: ConsoleServer,
    mailbox: Any,
    celery_worker: Any,
    llm_server: Any,
    tmp_path: Path,
) -> None:
    llm_server.behaviour.clear()
    llm_server.requests.clear()
    base = console_server.base_url
    email = f"erin-{uuid.uuid4().hex[:8]}@example.com"
    password = "a console journey password 42"
    main = page.locator("main")
    await page.add_init_script(COUNT_UPLOAD_PROGRESS)

    # Sign up.
    await page.goto("/")
    await expect(page.get_by_role("heading", name="Log in", exact=True)).to_be_visible()
    await page.get_by_role("link", name="Create an account").click()
    await expect(page.get_by_role("heading", name="Create your account")).to_be_visible()
    await page.get_by_label("Your name").fill("Erin Example")
    await page.get_by_label("E-mail address").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_label("Workspace name").fill("Erin's lab")
    await page.get_by_role("button", name="Create account").click()
    await expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()

    # The link in the mail opens the console's verification page, which verifies the address.
    mail = await asyncio.to_thread(mailbox.wait_for, email, "Verify", 60.0)
    link = next(u for u in mail.links() if "/verify-email?" in u)
    assert link.startswith(f"{base}/verify-email?token=")
    await page.goto(link)
    await expect(main.get_by_text(f"Your address {email} is verified.")).to_be_visible()
    assert page.url == f"{base}/verify-email"  # the token left the address bar
    await main.get_by_role("link", name="Log in").click()

    # Log in: the refresh token goes into an HttpOnly cookie, the access token stays in memory.
    await expect(page.get_by_role("heading", name="Log in", exact=True)).to_be_visible()
    await expect(page.get_by_label("E-mail address")).to_have_value(email)
    await page.get_by_label("Password").fill(password)
    await main.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Collections", exact=True)).to_be_visible()
    await expect(page.locator("#tenant-switcher")).to_have_value(re.compile(".+"))
    tenant_id = re.search(r"/tenants/([0-9a-f-]+)/collections", page.url).group(1)  # type: ignore[union-attr]
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies[REFRESH]["httpOnly"] and cookies[REFRESH]["secure"]
    assert cookies[REFRESH]["sameSite"] == "Strict"
    assert cookies[REFRESH]["path"] == "/console/session"
    assert "atrium_refresh" not in await page.evaluate("document.cookie")
    assert await page.evaluate("localStorage.length + sessionStorage.length") == 0
    # A reload keeps the session: the cookie buys a new access token.
    await page.reload()
    await expect(page.get_by_role("heading", name="Collections", exact=True)).to_be_visible()

    # Create an API key: the secret is shown once, with a copy button.
    await page.get_by_role("link", name="API keys").click()
    await expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    await page.get_by_label("Name").fill("e2e key")
    await page.get_by_role("button", name="Create key").click()
    secret_box = page.get_by_label("Secret key")
    await expect(secret_box).to_have_value(re.compile(r"^atr_"))
    secret = await secret_box.input_value()
    await page.get_by_role("button", name="Copy", exact=True).click()
    await expect(main.get_by_text("Copied to the clipboard.")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    # Ready-to-paste snippets with this tenant, the key and the page's origin filled in.
    sdk = await page.locator("#snippet-sdk").text_content() or ""
    assert "from atrium_client import Atrium" in sdk
    assert f'base_url="{base}",' in sdk and f'api_key="{secret}",' in sdk
    assert f'tenant_id="{tenant_id}",' in sdk
    # The snippets work as pasted: the SDK's client and the CLI (through the exports) reach
    # this server with the new key.
    snippet: dict[str, Any] = {}
    exec(sdk, snippet)
    with snippet["client"] as sdk_client:
        assert list(sdk_client.collections.list()) == []
    cli = await page.locator("#snippet-cli").text_content() or ""
    exports, search = cli.rsplit("\n", 1)
    assert search.startswith('atr search "')
    atr = Path(sys.executable).parent / "atr"
    listed = subprocess.run(
        ["bash", "-c", f"{exports}\n{atr} collections --json"],
        env={k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (listed.returncode, listed.stdout) == (0, "[]\n"), listed.stderr
    mcp = json.loads(await page.locator("#snippet-mcp").text_content() or "")
    assert mcp == {
        "mcpServers": {
            "atrium": {"url": f"{base}/mcp", "headers": {"Authorization": f"Bearer {secret}"}}
        }
    }
    await page.get_by_role("button", name="Copy the command line snippet").click()
    await expect(main.get_by_text("The command line snippet is in the clipboard.")).to_be_visible()
    assert await page.evaluate("navigator.clipboard.readText()") == cli
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.get(
            f"/v1/tenants/{tenant_id}/collections", headers={"Authorization": f"Bearer {secret}"}
        )
        assert r.status_code == 200, r.text
    await page.get_by_role("button", name="I have stored it").click()
    await expect(secret_box).to_have_count(0)
    await expect(page.get_by_role("cell", name="e2e key")).to_be_visible()

    # Create a collection.
    await page.get_by_role("link", name="Collections").click()
    await page.get_by_label("Name").fill("Handbook")
    await page.get_by_role("button", name="Create collection").click()
    await expect(page.get_by_role("heading", name="Handbook")).to_be_visible()

    # Upload a file (XHR progress events) and watch it become ready.
    doc = tmp_path / "photosynthesis.md"
    doc.write_text(DOCUMENT)
    await page.get_by_label("Files").set_input_files(doc)
    await page.get_by_role("button", name="Upload", exact=True).click()
    await expect(main.get_by_text("1 document uploaded")).to_be_visible()
    progress = await page.evaluate("window.__uploadProgress")
    assert progress and progress[-1][0] == progress[-1][1] > len(DOCUMENT)
    row = page.locator("tr[data-document-id]")
    await expect(row).to_have_attribute("data-status", "ready", timeout=90_000)
    await expect(row).to_contain_text("Photosynthesis")

    # Ask: the answer streams in (several delta events) and cites its source.
    await page.get_by_role("link", name="Ask this collection in the playground").click()
    await expect(page.get_by_role("heading", name="Playground")).to_be_visible()
    await page.get_by_label("Question").fill("How do plants turn sunlight into sugar?")
    await page.get_by_role("button", name="Ask").click()
    answer = page.locator("#answer")
    await expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    assert int(await answer.get_attribute("data-deltas") or 0) > 1
    await expect(answer).to_have_text("According to the sources, this is so [1].")
    await expect(answer.get_by_role("link", name="source 1")).to_have_attribute("href", "#source-1")
    await expect(page.locator("#citations")).to_contain_text("[1] Photosynthesis")
    await expect(page.locator("#source-1")).to_contain_text("chloroplasts")
    chats = [r for r in llm_server.requests if r["path"].endswith("/chat/completions")]
    assert chats and chats[-1]["body"].get("stream") is True

    # Log out: the session ends on the server and the cookie is gone.
    await page.get_by_role("button", name="Log out").click()
    await expect(main.get_by_text("You are logged out.")).to_be_visible()
    assert REFRESH not in {c["name"] for c in await page.context.cookies()}
    await page.goto("/account")
    await expect(page.get_by_role("heading", name="Log in", exact=True)).to_be_visible()
    assert page.url.endswith("/login?next=%2Faccount")


async def test_api_messages_show_next_to_their_fields(page: Page) -> None:
    await page.goto("/signup")
    email = page.get_by_label("E-mail address")
    password = page.get_by_label("Password")
    await email.fill("not-an-address")
    await password.fill("short")
    await page.get_by_role("button", name="Create account").click()
    # Pydantic's message for the address (422 detail[].loc = ["body", "email"]) under the field,
    # tied to it with aria-describedby, and the field marked invalid and focused.
    await expect(email).to_have_attribute("aria-invalid", "true")
    await expect(email).to_be_focused()
    error_id = (await email.get_attribute("aria-describedby") or "").split()[-1]
    await expect(page.locator(f"#{error_id}")).to_contain_text("valid email address")
    # Once the address is fine, the password rule from the service (detail.field) shows up.
    await email.fill("fields@example.com")
    await page.get_by_role("button", name="Create account").click()
    await expect(password).to_have_attribute("aria-invalid", "true")
    await expect(email).not_to_have_attribute("aria-invalid", "true")
    error_id = (await password.get_attribute("aria-describedby") or "").split()[-1]
    await expect(page.locator(f"#{error_id}")).to_have_text(
        "The password must be at least 10 characters long."
    )
    # Login: the 401 message in the form's alert.
    await page.goto("/login")
    await page.get_by_label("E-mail address").fill("nobody@example.com")
    await page.get_by_label("Password").fill("wrong password 123")
    await page.locator("main").get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("Incorrect e-mail address or password")
    # An unverified address gets the same 401 (and a new link by mail): the page says so.
    hint = "If the address is registered and not verified yet, we sent a new verification link"
    # (#main: the screen-reader announcer repeats the text in a status region of its own)
    await expect(page.locator("#main").get_by_role("status").filter(has_text=hint)).to_be_visible()


async def test_keyboard_and_phone_width(page: Page) -> None:
    await page.set_viewport_size({"width": 360, "height": 740})
    await page.goto("/login")
    await expect(page.get_by_role("heading", name="Log in", exact=True)).to_be_visible()
    # Nothing sticks out sideways at phone width.
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # The first Tab lands on the skip link, which moves focus to the content.
    await page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    await expect(skip).to_be_focused()
    await page.keyboard.press("Enter")
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("E-mail address")).to_be_focused()
    # Focus is visible (a real outline, not the browser default turned off).
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    # The form submits with Enter, and its error is announced (role=alert).
    await page.keyboard.type("nobody@example.com")
    await page.keyboard.press("Tab")
    await page.keyboard.type("wrong password 123")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_have_text("Incorrect e-mail address or password")


async def log_in(page: Page, email: str, password: str) -> None:
    """Log in through the console's form."""
    await page.goto("/login")
    await page.get_by_label("E-mail address").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.locator("main").get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Collections", exact=True)).to_be_visible()


async def test_members_invitations_usage_account_and_reset(
    page: Page,
    app: Any,
    browser: Any,
    console_server: ConsoleServer,
    mailbox: Any,
    celery_worker: Any,
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    main = page.locator("main")
    owner = await create_user(app, name="Olga Owner")
    tenant = await create_tenant(app, owner, name="Olga's team")
    await log_in(page, owner.email, DEFAULT_PASSWORD)
    assert f"/tenants/{tenant.id}/collections" in page.url

    # Invite a viewer.
    await page.get_by_role("link", name="Members").click()
    await expect(page.get_by_role("heading", name="Members", exact=True)).to_be_visible()
    await expect(main.get_by_role("cell", name=f"{owner.email}")).to_be_visible()
    invitee = f"ivan-{uuid.uuid4().hex[:6]}@example.com"
    await page.get_by_label("E-mail address").fill(invitee)
    await page.get_by_label("Role").select_option("viewer")
    await page.get_by_role("button", name="Send invitation").click()
    await expect(main.get_by_text(f"An invitation was mailed to {invitee}")).to_be_visible()
    await expect(main.get_by_role("row", name=re.compile(invitee))).to_contain_text("pending")

    # The invitation link, in another browser: create the account, then log in as a viewer.
    mail = await asyncio.to_thread(mailbox.wait_for, invitee, "invited you", 60.0)
    link = next(u for u in mail.links() if "/invitations/accept?" in u)
    assert link.startswith(f"{console_server.base_url}/invitations/accept?token=")
    other = await browser.new_context(base_url=console_server.base_url)
    try:
        guest = await other.new_page()
        guest.on("pageerror", lambda e: errors.append(str(e)))
        await guest.goto(link)
        await expect(guest.get_by_role("heading", name="You are invited")).to_be_visible()
        await guest.get_by_label("Your name").fill("Ivan Invitee")
        await guest.get_by_label("Password").fill("invited person password 7")
        await guest.get_by_role("button", name="Create account and join").click()
        await expect(guest.get_by_role("heading", name="Your account is ready")).to_be_visible()
        await guest.locator("main").get_by_role("link", name="Log in").click()
        await guest.get_by_label("E-mail address").fill(invitee)
        await guest.get_by_label("Password").fill("invited person password 7")
        await guest.locator("main").get_by_role("button", name="Log in").click()
        await expect(guest.get_by_role("heading", name="Collections", exact=True)).to_be_visible()
        assert f"/tenants/{tenant.id}/collections" in guest.url
        # A viewer gets no creation form.
        await expect(guest.get_by_role("button", name="Create collection")).to_have_count(0)
    finally:
        await other.close()

    # The owner changes the new member's role.
    await page.reload()
    role = page.get_by_label(f"Role of {invitee}")
    await expect(role).to_have_value("viewer")
    await role.select_option("member")
    await expect(main.get_by_text(f"{invitee} is now member.")).to_be_visible()

    # Usage bars against the plan's limits.
    await page.get_by_role("link", name="Usage").click()
    members_row = page.locator(".usage-row[data-metric=members]")
    await expect(members_row).to_contain_text("2 of")
    assert await members_row.locator("meter").get_attribute("value") == "2"

    # Account settings: the name, and this session among the signed-in devices.
    await page.get_by_role("link", name="Account").click()
    await expect(page.get_by_role("heading", name="Account settings")).to_be_visible()
    await page.get_by_label("Name", exact=True).fill("Olga O.")
    await page.get_by_role("button", name="Save name").click()
    await expect(main.get_by_text("Saved: your name is “Olga O.”.")).to_be_visible()
    await expect(main.get_by_role("row", name=re.compile(r"\(this one\)"))).to_have_count(1)
    # A wrong current password is refused next to the field.
    await page.get_by_label("Current password").first.fill("not my password")
    await page.get_by_label("New e-mail address").fill("olga-new@example.com")
    await page.get_by_role("button", name="Send the confirmation link").click()
    await expect(page.get_by_label("Current password").first).to_have_attribute(
        "aria-invalid", "true"
    )

    # A second workspace from the switcher.
    await page.get_by_label("Workspace", exact=True).select_option(label="All workspaces / new…")
    await expect(page.get_by_role("heading", name="Your workspaces")).to_be_visible()
    await page.get_by_label("Name").fill("Second team")
    await page.get_by_role("button", name="Create workspace").click()
    await expect(page.get_by_role("heading", name="Collections", exact=True)).to_be_visible()
    await expect(page.locator("#tenant-switcher option")).to_have_count(3)
    await expect(page.locator("#tenant-switcher")).not_to_have_value(str(tenant.id))

    # Forgot password → the reset link from the mail → log in with the new password.
    await page.get_by_role("button", name="Log out").click()
    await main.get_by_role("link", name="Forgot your password?").click()
    await page.get_by_label("E-mail address").fill(owner.email)
    await page.get_by_role("button", name="Send the link").click()
    await expect(main.get_by_text("If an account matches")).to_be_visible()
    mail = await asyncio.to_thread(mailbox.wait_for, owner.email, "Reset", 60.0)
    link = next(u for u in mail.links() if "/reset-password?" in u)
    await page.goto(link)
    await page.get_by_label("New password").fill("a brand new password 99")
    await page.get_by_role("button", name="Set the new password").click()
    await expect(page.get_by_role("heading", name="Password changed")).to_be_visible()
    await log_in(page, owner.email, "a brand new password 99")
    assert errors == []


async def test_export_and_delete_account(
    page: Page, app: Any, console_server: ConsoleServer, celery_worker: Any
) -> None:
    user = await create_user(app, name="Dora Deleter")
    await create_tenant(app, user, name="Dora's space")
    await log_in(page, user.email, DEFAULT_PASSWORD)
    await page.get_by_role("link", name="Account").click()
    main = page.locator("main")

    # The export is built by the worker; the page polls until the signed link is there.
    await page.get_by_role("button", name="Export my data").click()
    download = main.get_by_role("link", name="download the ZIP")
    await expect(download).to_be_visible(timeout=60_000)
    href = await download.get_attribute("href")
    assert href and href.startswith(f"{console_server.base_url}/v1/exports/")
    async with httpx.AsyncClient() as http:
        r = await http.get(href)
        assert r.status_code == 200 and r.content[:2] == b"PK"

    # Deleting needs the password and a confirmation; the session ends with the account.
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    danger = page.locator("form.danger-zone")
    await danger.get_by_label("Password").fill(DEFAULT_PASSWORD)
    await danger.get_by_role("button", name="Delete my account").click()
    await expect(main.get_by_text("Your account was deleted.")).to_be_visible()
    assert REFRESH not in {c["name"] for c in await page.context.cookies()}
    await page.get_by_label("E-mail address").fill(user.email)
    await page.get_by_label("Password").fill(DEFAULT_PASSWORD)
    await main.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("Incorrect e-mail address or password")


async def test_tabs_refreshing_at_once_keep_the_session(page: Page, app: Any) -> None:
    """Tabs share the refresh cookie; the console serialises their refreshes (Web Locks), so the
    server never sees one refresh token twice (which it would take for theft)."""
    user = await create_user(app)
    await create_tenant(app, user)
    await log_in(page, user.email, DEFAULT_PASSWORD)
    tabs = [page] + [await page.context.new_page() for _ in range(3)]
    for _ in range(2):
        await asyncio.gather(*(tab.goto(page.url) for tab in tabs))
        for tab in tabs:
            await expect(tab.get_by_role("heading", name="Collections", exact=True)).to_be_visible()
    for tab in tabs:
        await tab.get_by_role("link", name="Usage").click()
        await expect(tab.locator(".usage-row[data-metric=members]")).to_contain_text("1 of")
