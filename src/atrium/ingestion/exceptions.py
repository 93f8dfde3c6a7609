"""Errors of the ingestion domain."""

from __future__ import annotations


class BadDocument(Exception):
    """The document itself cannot be ingested; retrying will not help.

    At upload it becomes a 4xx answer (``status_code``); in the worker it fails the document
    with the message as the reason.

    Args:
        message: what is wrong and what to do about it, for a person.
        status_code: 415 (unsupported or mislabelled type), 413 (too large) or 422 (anything
            else: empty, undecodable, encrypted, no text).
    """

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class Superseded(Exception):
    """This processing run no longer owns the document (a newer run, a deletion)."""


class RunAlone(Exception):
    """A document taken into a batch is too large to share it: it goes back to the queue and
    runs alone (its text and vectors would sit in memory beside every other document's)."""
