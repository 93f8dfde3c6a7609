"""The API key format and its HMAC.

A key reads ``atr_`` + 43 base62 characters (256 random bits) + 6 base62 characters of CRC32
over everything before them. The checksum is not a secret: it lets us refuse mistyped or
truncated keys (and secret scanners recognise ours) without touching Redis or the database.
Only HMAC-SHA256(server secret, key) is stored; the key itself is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib

from atrium.config import Settings

PREFIX = "atr_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH = 43  # 62**43 > 2**256: every 32-byte value fits
CHECKSUM_LENGTH = 6  # 62**6 > 2**32
KEY_LENGTH = len(PREFIX) + RANDOM_LENGTH + CHECKSUM_LENGTH
#: Characters shown in lists to tell keys apart (``atr_`` + 8).
DISPLAY_PREFIX_LENGTH = len(PREFIX) + 8
_ALPHABET_SET = frozenset(ALPHABET)


def _base62(number: int, width: int) -> str:
    out = []
    while number:
        number, rem = divmod(number, 62)
        out.append(ALPHABET[rem])
    return "".join(reversed(out)).rjust(width, ALPHABET[0])


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_key() -> str:
    """A new random API key (shown to its creator once, never stored)."""
    body = PREFIX + _base62(int.from_bytes(secrets.token_bytes(32), "big"), RANDOM_LENGTH)
    return body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Whether ``key`` has our shape and a correct checksum (no lookup needed)."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    rest = key[len(PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    split = KEY_LENGTH - CHECKSUM_LENGTH
    return hmac.compare_digest(_checksum(key[:split]), key[split:])


def key_digest(secret: str, key: str) -> str:
    """HMAC-SHA256 of ``key`` under ``secret``, hex: what the database stores."""
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def display_parts(key: str) -> tuple[str, str]:
    """The prefix and last four characters shown in lists."""
    return key[:DISPLAY_PREFIX_LENGTH], key[-4:]


def current_secret(settings: Settings) -> str:
    """The secret that new keys' HMACs are made with (the first of the key ring)."""
    return settings.secret_key.get_secret_value()
