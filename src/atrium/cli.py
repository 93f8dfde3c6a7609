"""The ``atrium`` command: serve, worker, beat, migrate, dev, create-superuser, import.

Each command imports what only it needs inside its function, against the rule of
docs/decisions/0014-import-rules.md: importing the worker, the accounts stack or the ingestion
pipeline at the top would cost every ``atrium`` start seconds (``atrium --help`` 0.4 s today;
``atrium.worker`` alone about 3.5 s, ``atrium.kit.superuser`` about 4 s on a developer's machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess  # nosec B404
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import typer

from atrium.config import ConfigurationError, Settings, get_settings
from atrium.kit.logging import configure_logging

cli = typer.Typer(
    help="Atrium: multi-tenant retrieval-augmented generation backend.",
    no_args_is_help=True,
    add_completion=False,
)


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigurationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _with_services() -> tuple[Settings, object]:
    """Settings with every URL resolved, starting embedded servers for the unset ones."""
    settings = _settings()
    _configure_logging(settings)
    services = None
    if not settings.vector_database_url or not settings.redis_url:
        # Lazy (see the module docstring): only a command without its servers needs it.
        from atrium.kit.embedded import apply_env, start_embedded

        services = start_embedded(settings)
        apply_env(services.env)
        get_settings.cache_clear()
        settings = _settings()
    return settings, services


def _metrics_dir(path: Path, *, wipe: bool = True) -> str:
    """Create (and by default empty) a ``PROMETHEUS_MULTIPROC_DIR``; returns its absolute path.

    Must run before the processes sharing it import ``prometheus_client``, which reads the
    variable at import time.
    """
    p = path.resolve()
    p.mkdir(parents=True, exist_ok=True)
    if wipe:
        for f in p.glob("*.db"):
            f.unlink(missing_ok=True)
    return str(p)


def _release(services: object) -> None:
    """Let go of the embedded servers this command started or joined (None: it used none)."""
    if services is not None:
        services.stop()  # type: ignore[attr-defined]


def _configure_logging(settings: Settings) -> None:
    """The same structured log lines as the API (JSON by default) in workers and beat."""
    configure_logging(settings.log_level, settings.log_json)


@cli.command()
def migrate(
    revision: str = typer.Option("head", help="Alembic revision for the account database."),
) -> None:
    """Apply the account-database and vector-database migrations."""
    settings, services = _with_services()
    # Lazy (see the module docstring): Alembic and psycopg for this command only.
    from atrium.kit.migrations import upgrade_account_db, upgrade_vector_db

    upgrade_account_db(settings.resolved_database_url, revision)
    version = asyncio.run(upgrade_vector_db(settings.vector_conninfo, settings.embedding_dimension))
    typer.echo(f"account database at {revision}; vector schema at version {version}")
    if services is not None:
        services.stop()  # type: ignore[attr-defined]


@cli.command()
def serve(
    workers: int = typer.Option(1, help="uvicorn worker processes."),
) -> None:
    """Run the API with uvicorn on ATRIUM_HOST:ATRIUM_PORT."""
    import uvicorn  # lazy (see the module docstring): only `serve` runs it

    settings, services = _with_services()
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Several processes answer /metrics: they must add up each other's values.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir(
            settings.data_dir / "metrics" / f"serve-{os.getpid()}"
        )
    try:
        uvicorn.run(
            "atrium.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
            proxy_headers=True,
            access_log=False,
        )
    finally:
        _release(services)


@cli.command()
def worker(
    concurrency: int = typer.Option(0, help="Worker processes (0: one per core)."),
    pool: str = typer.Option("prefork", help="Celery pool: prefork, solo or threads."),
    metrics_port: int | None = typer.Option(
        None, help="Serve Prometheus metrics on this port (default ATRIUM_WORKER_METRICS_PORT)."
    ),
    hostname: str = typer.Option(
        "",
        help="Celery node name, e.g. worker2@%h (%h: this host's name). Default celery@<host>; "
        "give each worker on one host its own.",
    ),
) -> None:
    """Run a Celery worker (ingestion, mail, purges, exports)."""
    settings, services = _with_services()
    port = settings.worker_metrics_port if metrics_port is None else metrics_port
    if port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Prefork children record the metrics; the main process serves their sum.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir(
            settings.data_dir / "metrics" / f"worker-{os.getpid()}"
        )
    # Lazy (see the module docstring): Celery and every task module, for the worker only.
    from atrium.kit import metrics
    from atrium.worker import celery_app

    metrics.install_celery_metrics()
    if port:
        metrics.start_worker_metrics_server(port)
    argv = [
        "worker",
        f"--loglevel={settings.log_level.upper()}",
        f"--pool={pool}",
        "--without-gossip",
        "--without-mingle",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if hostname:
        # Two workers with one node name on a broker answer pings and inspections as one.
        argv.append(f"--hostname={hostname}")
    main_pid = os.getpid()
    try:
        celery_app.worker_main(argv)
    finally:
        if os.getpid() == main_pid:  # not in a pool process leaving through this frame
            _release(services)


@cli.command()
def beat() -> None:
    """Run Celery beat (periodic jobs)."""
    settings, services = _with_services()
    # Lazy (see the module docstring): Celery and every task module, for beat only.
    from atrium.worker import celery_app

    try:
        celery_app.start(["beat", f"--loglevel={settings.log_level.upper()}"])
    finally:
        _release(services)


@cli.command("create-superuser")
def create_superuser(
    email: str = typer.Option(..., prompt=True),
    # Automation passes the password in the environment: an argument would show in `ps` and
    # /proc/<pid>/cmdline to every user of the host.
    password: str = typer.Option(
        ...,
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        envvar="ATRIUM_SUPERUSER_PASSWORD",
        show_envvar=True,
    ),
) -> None:
    """Create a verified superuser (or promote an existing user).

    The password comes from ``ATRIUM_SUPERUSER_PASSWORD`` when it is set, else from a prompt.
    """
    settings, services = _with_services()
    # Lazy (see the module docstring): the accounts stack (about 4 s) for this command only.
    from atrium.kit.superuser import ensure_superuser

    created = asyncio.run(ensure_superuser(settings, email, password))
    typer.echo(("created " if created else "promoted ") + email)
    if services is not None:
        services.stop()  # type: ignore[attr-defined]


@cli.command("import")
def import_(
    paths: list[Path] = typer.Argument(..., help="Files and directories to import."),
    tenant: str = typer.Option(..., help="The tenant's id."),
    collection: str = typer.Option(..., help="The collection's id or name."),
    group: int = typer.Option(256, min=1, help="Documents embedded and stored together."),
    processes: int = typer.Option(
        1, min=1, help="Model processes (one ONNX thread each); 1: one process, all threads."
    ),
) -> None:
    """Bulk-import files into a collection (a large first load; docs/operations.md).

    Each file ends as an upload processed by a worker would; an empty tenant partition is
    filled and indexed once, then attached. Exits 1 when any file failed, 2 when refused.
    """
    _, services = _with_services()
    try:
        code = _run_import(uuid.UUID(tenant), collection, paths, group, processes)
    finally:
        _release(services)
    raise typer.Exit(code)


def _run_import(
    tenant_id: uuid.UUID, collection: str, paths: list[Path], group: int, processes: int
) -> int:
    """Run the import in this process, print its report; the exit status."""
    # Lazy (see the module docstring): the ingestion pipeline and onnxruntime, for imports only.
    from atrium.ingestion.bulk import ImportReport, import_files
    from atrium.ingestion.bulk_embed import pooled
    from atrium.ingestion.tools import worker_tools
    from atrium.kit import runtime
    from atrium.kit.errors import AtriumError

    async def main() -> ImportReport:
        res = await runtime.resources()
        try:
            tools = pooled(await asyncio.to_thread(worker_tools, res.settings), processes)
            try:
                return await import_files(
                    res,
                    tools,
                    tenant_id,
                    collection,
                    paths,
                    group_documents=group,
                    progress=typer.echo,
                )
            finally:
                close = getattr(tools.embedder, "close", None)
                if close is not None:
                    close()
        finally:
            await runtime.close_resources()

    try:
        report = runtime.run(main())
    except AtriumError as exc:
        typer.echo(f"refused: {exc.message}", err=True)
        return 2
    for name, reason in report.failed:
        typer.echo(f"failed: {name}: {reason}", err=True)
    rate = report.imported / report.seconds if report.seconds else 0.0
    typer.echo(
        f"imported {report.imported} documents ({report.chunks} chunks, {report.mode}) in "
        f"{report.seconds:.1f} s ({rate:.1f} docs/s); {len(report.duplicates)} already there, "
        f"{len(report.failed)} failed"
    )
    typer.echo("seconds by stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report.stages.items()))
    return 1 if report.failed else 0


@cli.command()
def dev() -> None:
    """Start everything: embedded servers if unconfigured, migrations, API, worker and beat.

    Ctrl-C (or SIGTERM) stops every process this started.
    """
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # Handlers first: a Ctrl-C while the servers start or migrations run is remembered, and the
    # command stops cleanly at the next step instead of leaving servers behind.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    settings, services = _with_services()
    children: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    # From here on, whatever happens (Ctrl-C during migrations, a child crashing, an error),
    # the finally block stops every process this command started, embedded servers included.
    try:
        # Lazy (see the module docstring): Alembic and psycopg, once the servers are up.
        from atrium.kit.migrations import upgrade_account_db, upgrade_vector_db

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_account_db(settings.resolved_database_url)
        asyncio.run(upgrade_vector_db(settings.vector_conninfo, settings.embedding_dimension))

        env = dict(os.environ)
        # API, worker and beat share one metrics directory: the API's /metrics shows them all.
        env.setdefault(
            "PROMETHEUS_MULTIPROC_DIR", _metrics_dir(settings.data_dir / "metrics" / "dev")
        )
        base = [sys.executable, "-m", "atrium.cli"]
        specs = {
            "api": [*base, "serve"],
            "worker": [*base, "worker"],
            "beat": [*base, "beat"],
        }
        for name, argv in specs.items():
            if stopping:
                break
            # Own session, so a terminal's Ctrl-C reaches only us and we stop them in order.
            children[name] = subprocess.Popen(argv, env=env, start_new_session=True)  # noqa: S603  # nosec B603
        typer.echo(
            f"Atrium is starting on http://{settings.host}:{settings.port} "
            f"(data in {settings.data_dir.resolve()}); Ctrl-C stops it.",
            err=True,
        )
        code = _supervise(children, specs, env, lambda: stopping)
    except KeyboardInterrupt:
        code = 130
    finally:
        # A second Ctrl-C must not cut the shutdown short and orphan the servers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_children(children)
        if services is not None:
            services.stop()  # type: ignore[attr-defined]
        typer.echo("Atrium stopped.", err=True)
    raise typer.Exit(code)


#: Seconds before a crashed worker or beat starts again; doubled after each crash that came
#: within _STABLE_SECONDS of its start, up to _MAX_BACKOFF (systemd's Restart=on-failure in
#: production: deployment/systemd).
_FIRST_BACKOFF = 1.0
_MAX_BACKOFF = 30.0
_STABLE_SECONDS = 60.0


def _supervise(
    children: dict[str, subprocess.Popen[bytes]],
    specs: dict[str, list[str]],
    env: dict[str, str],
    stopping: Callable[[], bool],
) -> int:
    """Watch the children until ``stopping()``; the exit code ``atrium dev`` should return.

    A worker or beat that dies (killed for memory, a crash) is started again after a backoff:
    jobs wait in the broker and the outbox meanwhile, and the API keeps answering. The API
    dying ends the command, since nothing is left to serve.
    """
    started = dict.fromkeys(children, time.monotonic())
    backoff = dict.fromkeys(children, _FIRST_BACKOFF)
    due: dict[str, float] = {}
    while not stopping():
        now = time.monotonic()
        for name, proc in children.items():
            if name in due or proc.poll() is None:
                continue
            if name == "api":
                typer.echo(f"api exited with code {proc.returncode}; stopping.", err=True)
                return proc.returncode or 1
            # Its pool processes share its process group: none may keep running old work.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if now - started[name] >= _STABLE_SECONDS:
                backoff[name] = _FIRST_BACKOFF
            typer.echo(
                f"{name} exited with code {proc.returncode}; "
                f"starting it again in {backoff[name]:.0f} s.",
                err=True,
            )
            due[name] = now + backoff[name]
            backoff[name] = min(backoff[name] * 2, _MAX_BACKOFF)
        for name, when in list(due.items()):
            if now >= when:
                del due[name]
                children[name] = subprocess.Popen(  # noqa: S603  # nosec B603
                    specs[name], env=env, start_new_session=True
                )
                started[name] = now
        time.sleep(0.3)
    return 0


def _stop_children(children: dict[str, subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM each child (Celery: warm shutdown), then SIGKILL its whole process group."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in children.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        # The worker's pool processes share its process group; take any straggler with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    """Entry point of the ``atrium`` script."""
    cli()


if __name__ == "__main__":
    main()
