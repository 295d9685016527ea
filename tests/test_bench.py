"""The benchmark scripts' command lines: `--help` describes a run instead of starting one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fix_benchmark_help_prints_its_usage_and_runs_nothing():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fix.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fix.py") and "Usage: python bench/fix.py" in proc.stdout
