"""The command line as the tests call it: in-process, or in a process of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftaudit.cli import main


def run(*args: object) -> tuple[int, str, str]:
    """`ftaudit *args`: its exit code, stdout and stderr."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def json_report(*args: object) -> dict:
    """The JSON report that `ftaudit *args` (with `--format json`) prints, once it has audited (exit code 0 or 1)."""
    code, stdout, stderr = run(*args)
    assert code in (0, 1), stderr
    return json.loads(stdout)


def run_unprivileged(*args: object) -> subprocess.CompletedProcess[str]:
    """`ftaudit *args` in a process that file permissions apply to (root without its override capabilities)."""
    command = [sys.executable, "-m", "ftaudit", *map(str, args)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
        drop = "-dac_override,-dac_read_search"
        command = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def tmpfs_in_a_user_namespace(where: Path) -> bool:
    """Whether this user may mount a tmpfs in a new user and mount namespace (no root needed where allowed)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "mount", "-t", "tmpfs", "tmpfs", str(where)], capture_output=True)
    return probe.returncode == 0
