"""Atrium scaled out on one machine, from the shipped files in ``deployment/``.

API replicas are gunicorn with ``deployment/gunicorn.conf.py`` (what the systemd unit and the
image run), one port each; Celery workers are ``atrium worker`` with their own ``--hostname``;
nginx runs ``deployment/nginx/atrium.conf.template`` rendered as its header tells operators, and
Caddy runs ``deployment/caddy/Caddyfile`` with its ``{$...}`` placeholders set. Everything listens
on loopback ports chosen at start (Caddy on every interface: see :class:`CaddyProxy`) and runs as
a child process, never as a system service.

A missing ``nginx`` or ``caddy`` binary fails the run (``./scripts/test`` installs both).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.live import wait_ready
from tests.support.load import free_port
from tests.support.services import ServiceMissing

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployment"
NGINX_TEMPLATE = DEPLOY / "nginx" / "atrium.conf.template"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"


def binary(name: str) -> str:
    """The path of ``name`` (``/usr/sbin`` included, which a non-root PATH may lack).

    Raises:
        ServiceMissing: it is not installed; the message says how to install it.
    """
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise ServiceMissing(
            f"`{name}` is not installed. ./scripts/test installs Debian's nginx and caddy "
            "(sudo apt-get install -y nginx caddy); tests/ops/test_replicas.py runs the shipped "
            "proxy configurations with them."
        )
    return found


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait until something accepts connections on loopback ``port``.

    Raises:
        RuntimeError: ``proc`` exited first, or nothing listened in ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.args!r} did not listen on {port}:\n{tail(log)}")


def tail(path: Path, size: int = 4000) -> str:
    """The end of a log file ('' when there is none)."""
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc``'s process group (it was started in a session of its own) and
    reap it; SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def self_signed_certificate(directory: Path) -> Path:
    """Write ``fullchain.pem`` and ``privkey.pem`` (as an ACME client lays them out) for
    ``localhost`` and ``127.0.0.1`` into ``directory``; returns the certificate's path, which
    clients trust as their only CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / "fullchain.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain


def nginx_template_names(text: str) -> list[str]:
    """The names the template's header gives envsubst (its ``names='A B'`` line)."""
    match = re.search(r"^#\s+names='([^']+)'$", text, re.M)
    if match is None:
        raise AssertionError(f"{NGINX_TEMPLATE} documents no names for envsubst")
    return match[1].split()


def render_nginx(values: Mapping[str, str]) -> str:
    """The nginx template with ``values`` filled in, as ``envsubst '<its names>'`` does: only
    ``${NAME}`` of the listed names is replaced, so nginx's own ``$host`` etc. stay.

    Raises:
        AssertionError: ``values`` does not name exactly the template's variables.
    """
    text = NGINX_TEMPLATE.read_text()
    names = nginx_template_names(text)
    if set(names) != set(values):
        raise AssertionError(f"the template's variables are {names}, not {sorted(values)}")
    for name in names:
        text = text.replace("${" + name + "}", values[name])
    return text


class NginxProxy:
    """nginx with the rendered shipped site, its own prefix, pid, logs and temp paths.

    The site file is what ``/etc/nginx/conf.d/atrium.conf`` would be; the main file written
    here stands for the distribution's ``/etc/nginx/nginx.conf`` (not shipped by Atrium). Its
    access log records each request's id, status and the replica(s) that served it
    (``$upstream_addr``: two addresses when nginx went on to the next replica).
    """

    def __init__(self, workdir: Path, api_ports: Sequence[int], tls_dir: Path) -> None:
        self.workdir = workdir
        self.tls_dir = tls_dir
        self.port = free_port()
        self.http_port = free_port()
        self.api_ports = list(api_ports)
        self.conf = workdir / "nginx.conf"
        self.site = workdir / "atrium.conf"
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy's HTTPS base URL."""
        return f"https://127.0.0.1:{self.port}"

    def write(self, server_params: str) -> Path:
        """Render the site for loopback, each API port a ``server`` line with
        ``server_params`` (as the template's header writes them); returns the main file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        servers = "\n    ".join(
            f"server 127.0.0.1:{port} {server_params};" for port in self.api_ports
        )
        self.site.write_text(
            render_nginx(
                {
                    "SERVER_NAME": "localhost",
                    "TLS_DIR": str(self.tls_dir),
                    "HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
                    "HTTPS_LISTEN": f"127.0.0.1:{self.port}",
                    "API_SERVERS": servers,
                }
            )
        )
        temp = self.workdir / "temp"
        temp.mkdir(exist_ok=True)
        # As root, nginx's workers would run as "nobody", who cannot enter pytest's 0700
        # temporary directories (request bodies are spooled there).
        user = "user root root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}worker_processes 1;\n"
            f"pid {self.workdir}/nginx.pid;\n"
            f"error_log {self.error_log} warn;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            "    log_format replicas '$request_id $status $upstream_addr';\n"
            f"    access_log {self.access_log} replicas;\n"
            + "".join(
                f"    {kind}_temp_path {temp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"    include {self.site};\n"
            "}\n"
        )
        return self.conf

    def command(self, *extra: str) -> list[str]:
        """``nginx`` with this prefix and configuration (and ``extra`` options)."""
        return [
            binary("nginx"),
            "-p",
            str(self.workdir),
            "-e",
            str(self.error_log),
            "-c",
            str(self.conf),
            *extra,
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Run nginx in the foreground (``daemon off``) as a child process."""
        log = self.workdir / "nginx.out"
        self.proc = subprocess.Popen(
            self.command("-g", "daemon off;"),
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, self.proc, self.error_log, timeout)

    def stop(self) -> None:
        """SIGQUIT: nginx's graceful shutdown."""
        stop_group(self.proc, signal.SIGQUIT)

    def entries(self) -> list[tuple[str, int, list[str]]]:
        """nginx's access log: each request's id, status and the replica addresses it tried,
        in order."""
        out = []
        for line in self.access_log.read_text().splitlines():
            rid, status, addrs = line.split(" ", 2)
            out.append((rid, int(status), [a.strip() for a in addrs.split(",")]))
        return out


class CaddyProxy:
    """Caddy running the shipped Caddyfile, its placeholders set for plain HTTP on loopback.

    Caddy listens on the site address's port on every interface (the shipped file sets no
    ``bind``); the port is a free one, and the site only answers the Host ``127.0.0.1``. The
    admin API is off (two test sessions would both want localhost:2019), and Caddy's data and
    configuration directories are this proxy's own.
    """

    def __init__(self, workdir: Path, api_ports: Sequence[int], **placeholders: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "caddy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "XDG_DATA_HOME": str(workdir / "data"),
            "XDG_CONFIG_HOME": str(workdir / "config"),
            "SITE_ADDRESS": f"http://127.0.0.1:{self.port}",
            "API_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in api_ports),
            "CADDY_ADMIN": "off",
            **placeholders,
        }

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def validate(self, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``caddy validate`` of the shipped file with ``env`` (default: this proxy's)."""
        return subprocess.run(
            [binary("caddy"), "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=dict(env if env is not None else self.env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self, timeout: float = 30.0) -> None:
        """``caddy run`` as a child process."""
        self.proc = subprocess.Popen(
            [binary("caddy"), "run", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, self.proc, self.log, timeout)

    def stop(self) -> None:
        """SIGTERM: Caddy's graceful shutdown."""
        stop_group(self.proc)

    def log_lines(self) -> int:
        """How many lines Caddy has logged so far."""
        return len(self.log.read_text(errors="replace").splitlines())

    def wait_health_check_failed(self, address: str, after: int, timeout: float = 30.0) -> None:
        """Wait until Caddy's active health check has found ``address`` down in a log line
        after the first ``after`` (it logs the failure just before it takes the replica out
        of the rotation).

        Raises:
            AssertionError: no such failure was logged in ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines()[after:]:
                if "health_checker.active" in line and f'"host":"{address}"' in line:
                    return
            time.sleep(0.2)
        raise AssertionError(f"Caddy never found {address} down:\n{tail(self.log)}")


class ApiReplica:
    """One API replica: gunicorn with the shipped ``deployment/gunicorn.conf.py``, one worker.

    Its log (``ATRIUM_LOG_LEVEL=INFO``) holds Atrium's access line per request with the
    request id the proxy sent, so a test can tell which replica served a request.
    """

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        metrics = workdir / f"{name}-metrics"
        metrics.mkdir(parents=True, exist_ok=True)
        self.env = {
            **env,
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_WORKERS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "ATRIUM_LOG_LEVEL": "INFO",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start gunicorn (see :meth:`wait_ready`)."""
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "-c",
                str(DEPLOY / "gunicorn.conf.py"),
                "atrium.app:create_app()",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for ``/readyz`` to answer 200.

        Raises:
            RuntimeError: gunicorn exited, or was not ready in ``timeout`` seconds.
        """
        assert self.proc is not None
        wait_ready(self.proc, self.url, f"replica {self.name}", lambda: tail(self.log), timeout)

    def served(self, request_id: str) -> bool:
        """Whether this replica logged a request with ``request_id``."""
        pattern = rf'"request_id":\s*"{re.escape(request_id)}"'
        return re.search(pattern, self.log.read_text(errors="replace")) is not None

    def kill(self) -> None:
        """SIGKILL the master and its worker at once, as a crashed host would."""
        stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: gunicorn's graceful shutdown."""
        stop_group(self.proc)
