"""The command line run in-process, as the tests call it."""

from __future__ import annotations

import json

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
