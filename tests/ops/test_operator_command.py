"""The runbook's way to run an `atrium` command with the service's settings really loads them.

The settings file is installed mode 0600, owned by root (docs/deployment.md); a command that
switches to the `atrium` user *before* reading it (`sudo -u atrium bash -c '. file; ...'`) gets
"Permission denied" and runs with no settings at all. The documented command is taken from
docs/operations.md, pointed at a throw-away file and user, and must see the settings as that user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
USER = "atrium-optest"


def _documented_command() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"settings loaded\..*?```bash\n(.*?)\n```", text, re.S)
    assert block, "docs/operations.md lost the command that runs atrium with the settings"
    return block[1].strip()


def _ensure_user() -> None:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )


def test_documented_command_runs_as_atrium_with_the_root_only_settings() -> None:
    assert os.geteuid() == 0, "this check needs root, as the runbook's command does"
    _ensure_user()
    # Not pytest's tmp_path: its parents are private to root, and the probe runs as the user.
    tmp_path = Path(tempfile.mkdtemp(prefix="atrium-optest-"))
    marker = uuid.uuid4().hex
    env_file = tmp_path / "atrium.env"
    env_file.write_text(f"ATRIUM_OPTEST_MARKER={marker}\n")
    env_file.chmod(0o600)
    out = tmp_path / "seen.txt"
    tmp_path.chmod(0o777)
    # The command the runbook runs, replaced by a script that reports who it runs as and what
    # it sees (a file: the documented line is already inside single quotes).
    probe = tmp_path / "probe"
    probe.write_text(
        f"#!{sys.executable}\n"
        "import os, pwd, sys\n"
        "with open(sys.argv[1], 'w') as fh:\n"
        "    fh.write(pwd.getpwuid(os.getuid()).pw_name + ' ' + "
        "os.environ.get('ATRIUM_OPTEST_MARKER', 'none'))\n"
    )
    probe.chmod(0o755)
    command = (
        _documented_command()
        .removeprefix("sudo ")
        .replace("/etc/atrium/atrium.env", str(env_file))
        .replace("cd /opt/atrium", f"cd {tmp_path}")
        .replace("=atrium ", f"={USER} ")
        .replace(".venv/bin/atrium --help", f"{probe} {out}")
    )
    r = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert out.read_text() == f"{USER} {marker}"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
