"""Configuration of the ``atr`` command (flags and environment), its exit codes and errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from atrium_client import (
    APIConnectionError,
    APITimeoutError,
    Atrium,
    AtriumError,
    AuthenticationError,
    Conflict,
    NotFound,
    PermissionDenied,
    models,
)

#: Everything worked.
EXIT_OK = 0
#: The server refused a request, a document failed, or something asked for does not exist.
EXIT_FAILED = 1
#: Bad usage: a wrong flag or argument, or missing configuration (the URL, key or tenant).
EXIT_USAGE = 2
#: The server could not be reached, or did not answer in time.
EXIT_UNREACHABLE = 3
#: The API key was refused (401) or may not do this (403).
EXIT_AUTH = 4

ENV_URL = "ATRIUM_URL"
ENV_API_KEY = "ATRIUM_API_KEY"
ENV_TENANT = "ATRIUM_TENANT"


class CliError(Exception):
    """An error the command reports as one line on stderr before exiting with ``code``.

    Args:
        message: what went wrong and, where it helps, what to do about it.
        code: the exit code.
    """

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(text.split())


def describe_error(exc: AtriumError, url: str | None) -> CliError:
    """The one-line message and exit code for an error of the SDK.

    Args:
        exc: the error the SDK raised.
        url: the server's URL, named in the message when it cannot be reached.

    Returns:
        The error to report.
    """
    if isinstance(exc, APITimeoutError):
        return CliError(
            f"The server at {url} did not answer in time: {exc.message}", EXIT_UNREACHABLE
        )
    if isinstance(exc, APIConnectionError):
        return CliError(
            f"Cannot reach the Atrium server at {url} ({exc.message}); check {ENV_URL} or --url",
            EXIT_UNREACHABLE,
        )
    if isinstance(exc, AuthenticationError):
        return CliError(f"{exc} - check {ENV_API_KEY} or --api-key", EXIT_AUTH)
    if isinstance(exc, PermissionDenied):
        return CliError(f"{exc} - the key's scopes do not allow this", EXIT_AUTH)
    return CliError(str(exc), EXIT_FAILED)


@contextmanager
def reported(url: str | None) -> Iterator[None]:
    """Turn the SDK's errors raised inside the block into :class:`CliError`.

    Args:
        url: the server's URL, for the message when it cannot be reached.

    Yields:
        Nothing; the block runs inside.

    Raises:
        CliError: the block raised an :class:`~atrium_client.AtriumError`.
    """
    try:
        yield
    except AtriumError as exc:
        raise describe_error(exc, url) from exc


@dataclass
class Config:
    """Where the server is and how to sign in, from the global flags or the environment.

    Attributes:
        url: the server's base URL (``ATRIUM_URL``).
        api_key: the API key (``ATRIUM_API_KEY``).
        tenant: the tenant id (``ATRIUM_TENANT``).
        timeout: seconds to wait for each request.
    """

    url: str | None
    api_key: str | None
    tenant: str | None
    timeout: float = 60.0

    def check(self) -> tuple[str, str, str]:
        """The URL, key and tenant, all present.

        Returns:
            ``(url, api_key, tenant)``.

        Raises:
            CliError: one of them is missing (exit code :data:`EXIT_USAGE`).
        """
        missing = [
            f"{flag} (or {env})"
            for value, flag, env in (
                (self.url, "--url", ENV_URL),
                (self.api_key, "--api-key", ENV_API_KEY),
                (self.tenant, "--tenant", ENV_TENANT),
            )
            if not value
        ]
        if missing:
            raise CliError("Missing configuration: set " + ", ".join(missing), EXIT_USAGE)
        assert self.url and self.api_key and self.tenant
        return self.url, self.api_key, self.tenant

    def client(self) -> Atrium:
        """A client of the configured server, key and tenant.

        Returns:
            The client; close it when done.
        """
        url, api_key, tenant = self.check()
        return Atrium(url, api_key=api_key, tenant_id=tenant, timeout=self.timeout)


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def find_collection(client: Atrium, ref: str) -> models.Collection | None:
    """The collection ``ref`` names: its id, or its name (compared without regard to case).

    Args:
        client: the client.
        ref: a collection id or name.

    Returns:
        The collection, or None when there is none by that id or name.
    """
    as_id = _as_uuid(ref)
    if as_id is not None:
        try:
            return client.collections.get(as_id)
        except NotFound:
            pass
    wanted = ref.casefold()
    for collection in client.collections.list():
        if collection.name.casefold() == wanted and collection.status != "deleting":
            return collection
    return None


def resolve_collection(client: Atrium, ref: str) -> models.Collection:
    """The collection ``ref`` names (an id or a name).

    Args:
        client: the client.
        ref: a collection id or name.

    Returns:
        The collection.

    Raises:
        CliError: there is no such collection.
    """
    collection = find_collection(client, ref)
    if collection is None:
        raise CliError(f"No collection named or with id {ref!r} (see `atr collections`)")
    return collection


def ensure_collection(client: Atrium, ref: str) -> tuple[models.Collection, bool]:
    """The collection ``ref`` names, created (with ``ref`` as its name) if there is none.

    Args:
        client: the client.
        ref: a collection id or name.

    Returns:
        The collection, and whether it was created now.

    Raises:
        CliError: ``ref`` is an id no collection has (it is not taken for a new name).
    """
    collection = find_collection(client, ref)
    if collection is not None:
        return collection, False
    if _as_uuid(ref) is not None:
        raise CliError(f"No collection with id {ref} (see `atr collections`)")
    try:
        return client.collections.create(ref), True
    except Conflict:
        # Someone created it since we looked.
        return resolve_collection(client, ref), False
