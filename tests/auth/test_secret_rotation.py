"""Rotating ATRIUM_SECRET_KEY with a key ring: old tokens keep working, new ones use the new key."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from atrium.auth.tokens import configure_jwt, create_access_token, decode_access_token
from atrium.config import load_settings
from atrium.kit.errors import Unauthorized

ROOT = Path(__file__).resolve().parents[2]
OLD = "old-secret-key-0123456789-0123456789-abcdef"
NEW = "new-secret-key-0123456789-0123456789-abcdef"


@pytest.fixture
def restore_jwt(settings: Any) -> Iterator[None]:
    """configure_jwt is process-wide: put the session's settings back afterwards."""
    yield
    configure_jwt(settings)


async def test_token_signed_with_a_previous_key_is_accepted(restore_jwt: None) -> None:
    user = uuid.uuid4()
    configure_jwt(load_settings(secret_key=OLD))
    old_token = await create_access_token(user, "s1")

    configure_jwt(load_settings(secret_key=NEW, previous_secret_keys=OLD))
    assert (await decode_access_token(old_token)).user_id == user
    new_token = await create_access_token(user, "s2")
    assert (await decode_access_token(new_token)).session_id == "s2"

    # Once the old key leaves the ring, its tokens stop working; new ones still do.
    configure_jwt(load_settings(secret_key=NEW))
    with pytest.raises(Unauthorized):
        await decode_access_token(old_token)
    assert (await decode_access_token(new_token)).user_id == user


async def test_a_token_from_an_unknown_key_is_refused(restore_jwt: None) -> None:
    configure_jwt(load_settings(secret_key="someone-else-" + "x" * 40))
    forged = await create_access_token(uuid.uuid4(), "s")
    configure_jwt(load_settings(secret_key=NEW, previous_secret_keys=OLD))
    with pytest.raises(Unauthorized, match="Invalid access token"):
        await decode_access_token(forged)


def _rotate(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "rotate-secret-key"),
            "--env-file",
            str(env_file),
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_rotate_script_moves_the_current_key_into_the_ring(tmp_path: Path) -> None:
    env_file = tmp_path / "atrium.env"
    env_file.write_text(f"# production\nATRIUM_ENVIRONMENT=production\nATRIUM_SECRET_KEY={OLD}\n")

    r = _rotate(env_file)
    assert r.returncode == 0, r.stderr
    first = dotenv_values(env_file)
    assert first["ATRIUM_SECRET_KEY"] not in (OLD, None)
    assert len(first["ATRIUM_SECRET_KEY"] or "") >= 48
    assert first["ATRIUM_PREVIOUS_SECRET_KEYS"] == OLD
    assert first["ATRIUM_ENVIRONMENT"] == "production"
    assert env_file.read_text().startswith("# production\n")
    assert (env_file.stat().st_mode & 0o777) == 0o600
    # The new file is valid production configuration.
    settings = load_settings(
        environment="production",
        smtp_host="smtp.example.com",
        secret_key=first["ATRIUM_SECRET_KEY"],
        previous_secret_keys=first["ATRIUM_PREVIOUS_SECRET_KEYS"],
    )
    assert settings.secret_keys[1] == OLD

    # A second rotation keeps both older keys, newest first; --prune drops them.
    r = _rotate(env_file)
    assert r.returncode == 0, r.stderr
    second = dotenv_values(env_file)
    assert second["ATRIUM_PREVIOUS_SECRET_KEYS"] == f"{first['ATRIUM_SECRET_KEY']},{OLD}"
    r = _rotate(env_file, "--keep", "1")
    assert r.returncode == 0, r.stderr
    third = dotenv_values(env_file)
    assert third["ATRIUM_PREVIOUS_SECRET_KEYS"] == second["ATRIUM_SECRET_KEY"]
    r = _rotate(env_file, "--prune")
    assert r.returncode == 0, r.stderr
    pruned = dotenv_values(env_file)
    assert pruned["ATRIUM_SECRET_KEY"] == third["ATRIUM_SECRET_KEY"]
    assert pruned["ATRIUM_PREVIOUS_SECRET_KEYS"] == ""


def test_rotate_script_explains_a_missing_file(tmp_path: Path) -> None:
    r = _rotate(tmp_path / "missing.env")
    assert r.returncode == 2
    assert "missing.env" in r.stderr
