"""ftaudit type-checks under mypy, with the settings of pyproject.toml's [tool.mypy]."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_reports_no_error() -> None:
    # no cache (os.devnull): nothing left in the repo, and no stale entry to trust
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", os.devnull, "ftaudit"],
                         cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert run.returncode == 0 and not errors, "\n".join(errors) or run.stdout + run.stderr
