"""Outgoing mail: rendered from templates kept as files, sent by fastapi-mail or to an outbox.

Mail is always sent from a Celery task (``atrium.email.send``), never on the request path.
Without an SMTP server (the embedded default) each message is written as an ``.eml`` file to
``data_dir/outbox`` and its links are logged, so a developer can click through sign-up locally.
"""

from __future__ import annotations

import re
import time
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
_LINK = re.compile(r"https?://[^\s\"'<>]+")

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


async def send(settings: Settings, mail: RenderedMail) -> None:
    """Send a rendered message through SMTP, or into the outbox when no SMTP is configured."""
    if not settings.smtp_host:
        path = _write_outbox(settings, mail)
        log.info(
            "mail_written",
            to=mail.to,
            subject=mail.subject,
            path=str(path),
            links=_LINK.findall(mail.text),
        )
        return
    from fastapi_mail import ConnectionConfig, FastMail, MessageSchema, MessageType
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
    await FastMail(config).send_message(message)
    log.info("mail_sent", to=mail.to, subject=mail.subject)
