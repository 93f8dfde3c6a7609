"""The deployment files agree with the code: settings that exist, images, health checks, volumes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from atrium.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployment"
SETTINGS = {f"ATRIUM_{n.upper()}" for n in Settings.model_fields}


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_services_images_and_health_checks() -> None:
    services = _compose()["services"]
    assert services["mysql"]["image"] == "mysql:8.4"
    assert services["postgres"]["image"].startswith("pgvector/pgvector:pg17")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    assert "gunicorn" in services["api"]["command"]
    assert services["worker"]["command"][:2] == ["atrium", "worker"]
    assert services["beat"]["command"] == ["atrium", "beat"]
    for name in ("api", "worker", "mysql", "postgres", "redis", "mailpit"):
        assert "healthcheck" in services[name], f"{name} has no health check"
    for name in ("api", "worker", "beat"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["mysql"]["condition"] == "service_healthy"


def test_compose_uses_named_volumes_for_all_state() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    used = set()
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            assert not source.startswith((".", "/")), f"bind mount {vol}: use a named volume"
            used.add(source)
    assert used == declared == {"atrium-data", "mysql-data", "pg-data", "redis-data"}


def test_every_atrium_variable_in_deployment_files_is_a_real_setting() -> None:
    texts = [p.read_text() for p in DEPLOY.rglob("*") if p.is_file()]
    names = set()
    for text in texts:
        names |= set(re.findall(r"\b(ATRIUM_[A-Z0-9_]+)\b", text))
    # Variables of the compose file itself (ports, image), not Settings.
    compose_only = {
        "ATRIUM_IMAGE",
        "ATRIUM_HTTP_PORT",
        "ATRIUM_WORKER_CONCURRENCY",
    }
    unknown = sorted(names - SETTINGS - compose_only)
    assert not unknown, f"not settings of atrium.config.Settings: {unknown}"


def test_app_services_share_one_settings_block() -> None:
    services = _compose()["services"]
    env = {name: services[name]["environment"] for name in ("migrate", "api", "worker", "beat")}
    for key in (
        "ATRIUM_DATABASE_URL",
        "ATRIUM_VECTOR_DATABASE_URL",
        "ATRIUM_REDIS_URL",
        "ATRIUM_SECRET_KEY",
        "ATRIUM_CELERY_BROKER_URL",
    ):
        values = {name: e[key] for name, e in env.items()}
        assert len(set(values.values())) == 1, f"{key} differs between services: {values}"


def test_dockerfile_is_multi_stage_non_root_and_ships_the_model() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM .+ AS (\w+)$", text, re.M)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "build-essential" not in runtime and "uv" not in re.findall(r"\b\w+\b", runtime)
    assert re.search(r"^USER atrium", runtime, re.M)
    assert "uv sync --frozen --no-dev" in text
    # The embedding model is built (and checksum-verified) in the build stage, not taken from git.
    build = text.split("AS runtime", 1)[0]
    assert "python -m atrium.embedding.model_build" in build
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "src" not in ignored and ".env" in ignored and ".git" in ignored


def test_proxies_stream_sse_and_limit_uploads_to_the_largest_plan() -> None:
    import tomllib

    plans = tomllib.loads((ROOT / "config" / "plans.toml").read_text())["plans"]
    largest = max(int(p["max_upload_bytes"]) for p in plans.values())
    nginx = (DEPLOY / "nginx" / "atrium.conf.template").read_text()
    caddy = (DEPLOY / "caddy" / "Caddyfile").read_text()
    assert "proxy_buffering off;" in nginx
    assert "flush_interval -1" in caddy
    nginx_limit = int(re.search(r"client_max_body_size (\d+)m;", nginx)[1]) * 1024 * 1024  # type: ignore[index]
    # Caddy: one placeholder default for both the up-front check and request_body.
    caddy_limits = set(re.findall(r"\{\$MAX_BODY_BYTES:(\d+)\}", caddy))
    assert len(caddy_limits) == 1 and "max_size {$MAX_BODY_BYTES:" in caddy
    caddy_limit = int(caddy_limits.pop())
    for limit in (nginx_limit, caddy_limit):
        # Room for the largest plan's file plus multipart framing, and not unbounded.
        assert largest < limit <= largest * 1.2


def test_nginx_template_names_what_envsubst_fills_in() -> None:
    """Every ${NAME} outside the comments is in the header's list for envsubst (a name missing
    there would reach nginx as an unknown variable), and the header's example servers carry the
    failure parameters tests/ops/test_replicas.py runs with."""
    text = (DEPLOY / "nginx" / "atrium.conf.template").read_text()
    listed = re.search(r"^#\s+names='([^']+)'$", text, re.M)
    assert listed is not None
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{(\w+)\}", body)) == set(listed[1].split())
    assert "server 10.0.0.11:8000 max_fails=2 fail_timeout=10s;" in text


def test_proxies_go_on_to_the_next_replica_only_when_one_is_down() -> None:
    """nginx retries on connection errors and time-outs only, never on the app's own
    502/503/504 (provider or database failures that every replica shares); Caddy checks
    /healthz and has no passive checks (see the Caddyfile for the Caddy 2.6 bug)."""
    nginx = (DEPLOY / "nginx" / "atrium.conf.template").read_text()
    assert re.search(r"^\s*proxy_next_upstream error timeout;$", nginx, re.M)
    assert "non_idempotent" not in nginx
    caddy = (DEPLOY / "caddy" / "Caddyfile").read_text()
    directives = {line.split()[0] for line in caddy.splitlines() if line.strip()}
    assert {"health_uri", "lb_try_duration"} <= directives
    assert not {"fail_duration", "unhealthy_status", "max_fails"} & directives


def test_systemd_units_run_as_the_service_user_with_settings_from_one_file() -> None:
    for unit in ("atrium-api", "atrium-worker", "atrium-beat", "atrium-migrate"):
        text = (DEPLOY / "systemd" / f"{unit}.service").read_text()
        assert "User=atrium" in text
        assert "EnvironmentFile=/etc/atrium/atrium.env" in text
        assert "NoNewPrivileges=yes" in text
    api = (DEPLOY / "systemd" / "atrium-api.service").read_text()
    assert "gunicorn -c /opt/atrium/deployment/gunicorn.conf.py" in api


def test_gunicorn_conf_uses_uvicorn_workers_and_multiprocess_metrics(tmp_path: Path) -> None:
    import os
    import runpy

    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "m")
    try:
        conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    finally:
        if saved is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved
    assert conf["worker_class"] == "uvicorn_worker.UvicornWorker"
    assert conf["preload_app"] is False
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "counter_1.db").write_bytes(b"old")
    conf["on_starting"](None)
    assert not list((tmp_path / "m").iterdir())
    import uvicorn_worker  # noqa: F401 - the worker class gunicorn loads must be installed
