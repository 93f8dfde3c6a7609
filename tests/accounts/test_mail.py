"""Outgoing mail: no token in the logs, and no mail lost to an SMTP outage."""

from __future__ import annotations

import asyncio
import email as email_parser
import email.policy as email_policy
import logging
import os
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from atrium.config import Settings, load_settings
from atrium.kit import email
from tests.support import services
from tests.support.smtp import Mailbox


async def test_outbox_mail_is_logged_without_its_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Reset, verification, invitation and export links are credentials: never in a log."""
    # The module's logger caches its configuration on first use, and the app's drops info
    # events (ATRIUM_LOG_LEVEL=WARNING in the tests): a fresh logger, every level, for this test.
    monkeypatch.setattr(email, "log", structlog.get_logger("atrium.kit.email"))
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    request.addfinalizer(lambda: structlog.configure(**saved))
    settings = load_settings(
        environment="test", data_dir=tmp_path, smtp_host="", secret_key="x" * 40
    )
    token = f"secret-token-{uuid.uuid4().hex}"
    mail = email.render(
        "reset_password",
        ["ada@example.com"],
        {"name": "Ada", "link": f"http://testserver/reset-password?token={token}", "minutes": 60},
    )
    with capture_logs() as logs:
        await email.send(settings, mail)
    assert [e["event"] for e in logs] == ["mail_written"]
    assert token not in repr(logs)
    # The developer still finds the link: in the file the log line names.
    written = Path(logs[0]["path"])
    assert written.parent == settings.outbox_dir
    with written.open("rb") as f:
        message = email_parser.message_from_binary_file(f, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    body = message.get_body(("plain",))
    assert body is not None and token in body.get_content()


async def test_unreachable_smtp_server_defers_the_mail(tmp_path: Path) -> None:
    """fastapi-mail's ConnectionErrors (what an SMTP outage raises) becomes MailDeferred."""
    box = Mailbox()
    port = box.start()
    box.stop()  # nothing listens on the port any more
    settings = load_settings(
        environment="test",
        data_dir=tmp_path,
        smtp_host="127.0.0.1",
        smtp_port=port,
        secret_key="x" * 40,
    )
    mail = email.render(
        "account_exists", ["ada@example.com"], {"login_link": "l", "reset_link": "r"}
    )
    with pytest.raises(email.MailDeferred) as info:
        await email.send(settings, mail)
    from fastapi_mail.errors import ConnectionErrors

    assert isinstance(info.value.__cause__, ConnectionErrors)


def test_default_retry_schedule_outlasts_an_hour_long_outage() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    delays = email.retry_delays(settings)
    assert sum(delays) >= 3600
    # Each wait stays below the broker's visibility timeout (a longer ETA would be redelivered).
    assert max(delays) < settings.celery_visibility_timeout


async def test_verification_mail_survives_an_smtp_outage(
    test_env: dict[str, Any], tmp_path: Path
) -> None:
    """The SMTP server is down when the mail is sent and comes back later: the mail arrives.

    A worker of its own (its own queue, the session's broker) uses an SMTP server that is
    stopped, and a short retry schedule; the server is started again on the same port once
    the worker has logged a deferral.
    """
    box = Mailbox()
    port = box.start()
    box.stop()
    queue = f"mail-outage-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "TEST_WORKER_QUEUE": queue,
        "ATRIUM_SMTP_PORT": str(port),
        "ATRIUM_LOG_LEVEL": "INFO",
        "ATRIUM_MAIL_RETRY_INITIAL_SECONDS": "1",
        "ATRIUM_MAIL_RETRY_MAX_DELAY_SECONDS": "2",
        "ATRIUM_MAIL_RETRY_WINDOW_SECONDS": "600",
    }
    worker = services.WorkerProcess(env, log_path)
    worker.start()
    try:
        from atrium.worker import celery_app

        to = f"outage-{uuid.uuid4().hex[:8]}@example.com"
        celery_app.send_task(
            "atrium.email.send",
            kwargs={
                "template": "verify_email",
                "to": [to],
                "context": {
                    "name": "Ada",
                    "link": "http://testserver/verify-email?token=t",
                    "hours": 24,
                },
            },
            queue=queue,
        )
        # Wait until the worker has tried and deferred the mail twice: the outage is real.
        deadline = time.monotonic() + 120
        while log_path.read_text().count('"mail_deferred"') < 2:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(0.2)
        box.start(port)
        try:
            mail = await asyncio.to_thread(box.wait_for, to, "Verify your e-mail", 120.0)
        finally:
            box.stop()
        assert "verify-email?token=t" in mail.text
        assert '"mail_failed"' not in log_path.read_text()
    finally:
        worker.stop()
