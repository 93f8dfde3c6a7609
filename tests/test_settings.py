"""Bad settings fail at start with a message that names the setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from atrium.config import DEFAULT_SECRET_KEY, ConfigurationError, Settings, load_settings


def test_production_refuses_default_secret() -> None:
    with pytest.raises(ConfigurationError, match="ATRIUM_SECRET_KEY"):
        load_settings(environment="production", secret_key=DEFAULT_SECRET_KEY)


def test_production_refuses_short_secret() -> None:
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        load_settings(environment="production", secret_key="short-secret")


def test_production_accepts_long_secret() -> None:
    s = load_settings(environment="production", secret_key="x" * 40)
    assert s.is_production


def test_development_accepts_default_secret() -> None:
    s = load_settings(environment="development", secret_key=DEFAULT_SECRET_KEY)
    assert s.secret_key.get_secret_value() == DEFAULT_SECRET_KEY


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"database_url": "postgres://x/y"}, "ATRIUM_DATABASE_URL"),
        ({"vector_database_url": "mysql://x/y"}, "ATRIUM_VECTOR_DATABASE_URL"),
        ({"chunk_tokens": 64, "chunk_overlap_tokens": 64}, "ATRIUM_CHUNK_OVERLAP_TOKENS"),
        ({"port": 70000}, "ATRIUM_PORT"),
        ({"environment": "staging"}, "ATRIUM_ENVIRONMENT"),
    ],
)
def test_invalid_values_name_the_setting(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        load_settings(**overrides)


def test_lists_from_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATRIUM_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ["https://a.example", "https://b.example"]


def test_derived_urls() -> None:
    s = load_settings(
        redis_url="unix:///tmp/r.sock?db=0",
        celery_broker_url="",
        host="0.0.0.0",
        port=9000,
        database_url="",
        public_url="",
    )
    assert s.resolved_broker_url == "redis+socket:///tmp/r.sock?db=0"
    assert s.resolved_public_url == "http://0.0.0.0:9000"
    assert s.resolved_database_url.startswith("sqlite+aiosqlite:///")


def test_cli_exits_with_the_message_on_bad_settings() -> None:
    env = {
        **os.environ,
        "ATRIUM_ENVIRONMENT": "production",
        "ATRIUM_SECRET_KEY": DEFAULT_SECRET_KEY,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "atrium.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "ATRIUM_SECRET_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr
