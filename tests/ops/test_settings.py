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
    s = load_settings(environment="production", secret_key="x" * 40, smtp_host="smtp.example")
    assert s.is_production


def test_development_on_loopback_accepts_default_secret() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        s = load_settings(environment="development", host=host, secret_key=DEFAULT_SECRET_KEY)
        assert s.secret_key.get_secret_value() == DEFAULT_SECRET_KEY


@pytest.mark.parametrize(
    ("environment", "host"),
    [("test", "127.0.0.1"), ("development", "0.0.0.0"), ("development", "10.1.2.3")],
)
def test_default_secret_refused_unless_development_on_loopback(environment: str, host: str) -> None:
    """The placeholder is public: with it anyone forges access and e-mail-change tokens."""
    with pytest.raises(ConfigurationError, match="ATRIUM_SECRET_KEY"):
        load_settings(environment=environment, host=host, secret_key=DEFAULT_SECRET_KEY)
    with pytest.raises(ConfigurationError, match="at least 32 characters"):
        load_settings(environment=environment, host=host, secret_key="short-secret")


@pytest.mark.parametrize("environment", ["test", "production"])
def test_previous_secret_keys_are_held_to_the_same_rule(environment: str) -> None:
    good = "x" * 40
    for bad in (DEFAULT_SECRET_KEY, "short"):
        with pytest.raises(ConfigurationError, match="ATRIUM_PREVIOUS_SECRET_KEYS"):
            load_settings(
                environment=environment,
                smtp_host="smtp.example.com",
                secret_key=good,
                previous_secret_keys=f"{'y' * 40},{bad}",
            )
    s = load_settings(
        environment=environment,
        smtp_host="smtp.example.com",
        secret_key=good,
        previous_secret_keys="y" * 40,
    )
    assert s.secret_keys == [good, "y" * 40]


def test_production_needs_smtp_or_an_explicit_outbox() -> None:
    """Mail carries sign-in links: production must deliver it, not leave it in files."""
    with pytest.raises(ConfigurationError, match="ATRIUM_SMTP_HOST"):
        load_settings(environment="production", secret_key="x" * 40, smtp_host="")
    s = load_settings(environment="production", secret_key="x" * 40, smtp_host="", mail_outbox=True)
    assert s.is_production and not s.smtp_host


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
        secret_key="x" * 40,
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
