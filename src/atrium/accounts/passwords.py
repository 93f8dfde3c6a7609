"""The password rules: long enough, not the e-mail address, not a commonly used password.

Hashing is fastapi-users' ``PasswordHelper`` (argon2 first, bcrypt still verified). The two
answers several account routes share live here too: a broken rule reported by fastapi-users as
our 422 (:func:`invalid_password`), and a wrong current password as a 403
(:func:`check_current_password`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi_users import exceptions as fu_exc
from fastapi_users.password import PasswordHelper

from atrium.kit.errors import Forbidden, Unprocessable
from atrium.models import User

MIN_LENGTH = 10
MAX_LENGTH = 256
_COMMON_FILE = Path(__file__).resolve().parent / "data" / "common-passwords.txt"

#: One hasher for the process (argon2id with pwdlib's defaults).
password_helper = PasswordHelper()


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """Frequently used passwords (lower-cased); see ``data/PROVENANCE.md``."""
    lines = _COMMON_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip())


def password_problem(password: str, email: str | None) -> tuple[str, str] | None:
    """The first rule ``password`` breaks, as ``(rule, message)``, or None when it is fine."""
    if len(password) < MIN_LENGTH:
        return "min_length", f"The password must be at least {MIN_LENGTH} characters long."
    if len(password) > MAX_LENGTH:
        return "max_length", f"The password must be at most {MAX_LENGTH} characters long."
    lowered = password.strip().lower()
    if email:
        address = email.strip().lower()
        if lowered in {address, address.split("@", 1)[0]}:
            return "not_email", "The password must not be your e-mail address."
    if lowered in common_passwords():
        return "not_common", "This password is too common; choose one that is harder to guess."
    return None


def check_password(password: str, email: str | None, field: str = "password") -> None:
    """Enforce the password rules.

    Raises:
        Unprocessable: 422 naming the failed ``rule`` and the ``field`` it concerns.
    """
    problem = password_problem(password, email)
    if problem is not None:
        rule, message = problem
        raise Unprocessable(message, detail={"message": message, "rule": rule, "field": field})


def invalid_password(exc: fu_exc.InvalidPasswordException, field: str) -> Unprocessable:
    """The 422 for a password fastapi-users refused, naming the rule and ``field``."""
    rule = str(exc.reason)
    message = {
        "min_length": "The password is too short.",
        "max_length": "The password is too long.",
        "not_email": "The password must not be your e-mail address.",
        "not_common": "This password is too common; choose one that is harder to guess.",
    }.get(rule, "The password is not acceptable.")
    return Unprocessable(message, detail={"message": message, "rule": rule, "field": field})


def check_current_password(user: User, password: str) -> None:
    """Refuse (403) unless ``password`` is ``user``'s current one."""
    ok, _ = password_helper.verify_and_update(password, user.hashed_password)
    if not ok:
        raise Forbidden("The password is incorrect")
