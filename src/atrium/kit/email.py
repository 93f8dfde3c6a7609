"""Outgoing mail: rendered from templates kept as files, sent by fastapi-mail or to an outbox.

Mail is always sent from a Celery task (``atrium.email.send``), never on the request path.
Without an SMTP server (the embedded default) each message is written as an ``.eml`` file to
``data_dir/outbox``; the log names the file, never its links: they carry sign-in tokens (reset,
verification, invitation, export), and logs are read by more people than the mailbox is.

An SMTP server that cannot be reached, or that answers with a temporary (4xx) refusal, raises
:class:`MailDeferred`: the task retries on the schedule of :func:`retry_delays`. A permanent
(5xx) refusal is not retried.
"""

from __future__ import annotations

import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from atrium.config import Settings

log = structlog.get_logger("atrium.email")

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "email"
#: A URL scheme (``http://``, ``javascript:``...) inside a display name.
_SCHEME = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]*://|(?:javascript|data|mailto|tel|sms):)")
#: A dot between a name and a top-level-domain-like word (``evil.example``): mail clients
#: turn such text into links.
_DOMAIN_DOT = re.compile(r"(?<=[0-9A-Za-z-])\.(?=[A-Za-z][0-9A-Za-z-]+)")
#: Longest display name put into a subject or a body line.
DISPLAY_NAME_MAX = 60


class MailDeferred(Exception):
    """The SMTP server could not take the message now (unreachable, or a 4xx answer): retry."""


_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class RenderedMail:
    """A message ready to send."""

    to: list[str]
    subject: str
    html: str
    text: str


def render(template: str, to: list[str], context: dict[str, Any]) -> RenderedMail:
    """Render ``<template>.subject.txt``, ``<template>.html`` and ``<template>.txt``."""
    subject = _env.get_template(f"{template}.subject.txt").render(**context).strip()
    html = _env.get_template(f"{template}.html").render(**context)
    text = _env.get_template(f"{template}.txt").render(**context)
    return RenderedMail(to=to, subject=subject, html=html, text=text)


def _write_outbox(settings: Settings, mail: RenderedMail) -> Path:
    msg = EmailMessage()
    msg["From"] = settings.mail_from
    msg["To"] = ", ".join(mail.to)
    msg["Subject"] = mail.subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="atrium.local")
    msg.set_content(mail.text)
    msg.add_alternative(mail.html, subtype="html")
    outbox = settings.outbox_dir
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.eml"
    path.write_bytes(bytes(msg))
    return path


def display_name(value: str, limit: int = DISPLAY_NAME_MAX) -> str:
    """A user-chosen name made safe to quote in a mail someone else receives.

    Tenant and user names are chosen by whoever signs up; an invitation quotes them to an
    address of the inviter's choosing. Kept verbatim they make Atrium's mail a relay for spam
    or phishing ("Claim your prize at evil.example"). Control and format characters (newlines,
    bidi overrides) are dropped, whitespace collapsed, URL schemes removed, dots that would
    make a domain clickable replaced by a one-dot leader look-alike, and the result is cut to
    ``limit`` characters.
    """
    chars = []
    for ch in unicodedata.normalize("NFKC", value):
        category = unicodedata.category(ch)
        if ch.isspace() or category in ("Zl", "Zp"):
            chars.append(" ")
        elif category[0] != "C":  # Cc controls, Cf format (bidi overrides), unassigned
            chars.append(ch)
    kept = "".join(chars)
    kept = _SCHEME.sub("", kept)
    kept = _DOMAIN_DOT.sub("\u2024", kept)
    kept = " ".join(kept.split())
    if len(kept) > limit:
        kept = kept[: limit - 1].rstrip() + "\u2026"
    return kept


def retry_delays(settings: Settings) -> list[int]:
    """The waits, in seconds, between the attempts of a mail the SMTP server did not take.

    Doubling from ``mail_retry_initial_seconds`` up to ``mail_retry_max_delay_seconds``, for as
    many retries as it takes to cover ``mail_retry_window_seconds``: an outage shorter than the
    window loses no mail.
    """
    delays: list[int] = []
    delay = settings.mail_retry_initial_seconds
    while sum(delays) < settings.mail_retry_window_seconds:
        delays.append(min(delay, settings.mail_retry_max_delay_seconds))
        delay *= 2
    return delays


async def send(settings: Settings, mail: RenderedMail) -> None:
    """Send a rendered message through SMTP, or into the outbox when no SMTP is configured.

    Raises:
        MailDeferred: the SMTP server is unreachable or refused the message for now.
    """
    if not settings.smtp_host:
        path = _write_outbox(settings, mail)
        # The file name only: the message's links carry tokens that must not reach the logs.
        log.info("mail_written", to=mail.to, subject=mail.subject, path=str(path))
        return
    # lazy: only sending through SMTP needs them (fastapi_mail is slow to import), and the API
    # imports this module too (tenants.invitations), which never sends
    import aiosmtplib
    from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
    from fastapi_mail.errors import ConnectionErrors
    from fastapi_mail.schemas import MultipartSubtypeEnum

    name, address = parseaddr(settings.mail_from)
    config = ConnectionConfig(
        MAIL_USERNAME=settings.smtp_username,
        MAIL_PASSWORD=settings.smtp_password,
        MAIL_PORT=settings.smtp_port,
        MAIL_SERVER=settings.smtp_host,
        MAIL_STARTTLS=settings.smtp_starttls,
        MAIL_SSL_TLS=settings.smtp_ssl,
        MAIL_FROM=address,
        MAIL_FROM_NAME=name or None,
        USE_CREDENTIALS=bool(settings.smtp_username),
        VALIDATE_CERTS=settings.is_production,
        TIMEOUT=30,
    )
    message = MessageSchema(
        subject=mail.subject,
        recipients=mail.to,
        body=mail.html,
        subtype=MessageType.html,
        alternative_body=mail.text,
        multipart_subtype=MultipartSubtypeEnum.alternative,
    )
    try:
        await FastMail(config).send_message(message)
    except ConnectionErrors as exc:
        # fastapi-mail wraps every failure to connect or log in into this one class.
        raise MailDeferred(f"SMTP server unreachable: {exc.expression}") from exc
    except OSError as exc:  # aiosmtplib's disconnects and time-outs are OSErrors
        raise MailDeferred(f"SMTP connection failed: {exc}") from exc
    except aiosmtplib.SMTPResponseException as exc:
        if 400 <= exc.code < 500:
            raise MailDeferred(f"SMTP server deferred the message: {exc.code}") from exc
        raise
    except aiosmtplib.SMTPRecipientsRefused as exc:
        if all(400 <= r.code < 500 for r in exc.recipients):
            raise MailDeferred("SMTP server deferred every recipient") from exc
        raise
    log.info("mail_sent", to=mail.to, subject=mail.subject)
