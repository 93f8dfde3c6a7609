"""A real SMTP server (aiosmtpd) that keeps what it receives, for tests."""

from __future__ import annotations

import email
import email.policy
import re
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class ReceivedMail:
    """One message as the server received it."""

    to: list[str]
    subject: str
    text: str
    html: str
    message: EmailMessage

    def links(self) -> list[str]:
        """Every http(s) link in the plain-text part."""
        return re.findall(r"https?://[^\s\"'<>]+", self.text)


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        text = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        self.box.add(
            ReceivedMail(
                to=[r.lower() for r in envelope.rcpt_tos],
                subject=str(msg["Subject"]),
                text=text.get_content() if text else "",
                html=html.get_content() if html else "",
                message=msg,
            )
        )
        return "250 OK"


class Mailbox:
    """Messages received by the test SMTP server, with a way to wait for one."""

    def __init__(self) -> None:
        self._items: list[ReceivedMail] = []
        self._cond = threading.Condition()
        self.controller: Controller | None = None

    def add(self, mail: ReceivedMail) -> None:
        with self._cond:
            self._items.append(mail)
            self._cond.notify_all()

    def all(self, to: str | None = None) -> list[ReceivedMail]:
        with self._cond:
            return [m for m in self._items if to is None or to.lower() in m.to]

    def wait_for(
        self, to: str, subject_contains: str = "", timeout: float = 30.0, count: int = 1
    ) -> ReceivedMail:
        """Block until ``count`` matching messages arrived; return the newest."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    m for m in self._items if to.lower() in m.to and subject_contains in m.subject
                ]
                if len(found) >= count:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no mail to {to} with {subject_contains!r} within {timeout}s; got "
                        f"{[(m.to, m.subject) for m in self._items]}"
                    )
                self._cond.wait(left)

    def start(self, port: int | None = None) -> int:
        """Listen on ``port`` (again, after :meth:`stop`), or on a free port."""
        import socket

        if port is None:
            # aiosmtpd cannot start on port 0 (it connects to itself to check): pick a free one.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=port)
        self.controller.start()
        return port

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
