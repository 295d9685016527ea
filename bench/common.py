"""What the benchmarks share: where they work, Llama's matrix shapes, and measuring one whole process."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
sys.path.insert(0, str(ROOT))


def llama_shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """The seven matrices of one Llama layer, by module path, as (rows, columns)."""
    attention = {f"self_attn.{m}": (hidden, hidden) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return {**attention, "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}


LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
sys.stderr.write(err.decode(errors="replace")[-500:])
"""


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one process, started from a small launcher process so
    that its peak memory is its own (a child forked from this large process would count its pages)."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], env=env, capture_output=True, text=True)
    wall, rss, code = done.stdout.split()
    if int(code) not in (0, 1) or "Traceback" in done.stderr:
        raise SystemExit(f"{argv[:4]} failed with {code}: {done.stderr}")
    return float(wall), int(rss)


def cold_and_warm(
    runs: dict[tuple[Hashable, str], tuple[Path, Path]], repeats: int, cache: Path
) -> dict[tuple[Hashable, str, str], list[tuple[float, int]]]:
    """`ftaudit check TUNED --base BASE` for each run, in `repeats` interleaved rounds, each cold (the spectrum
    cache `cache` emptied first) then warm: (wall seconds, peak RSS bytes) by (run's key..., "cold"|"warm")."""
    env = {**os.environ, "FTAUDIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    samples: dict[tuple[Hashable, str, str], list[tuple[float, int]]] = {}
    for _ in range(repeats):
        for (model, label), (tuned, base) in runs.items():
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                argv = [sys.executable, "-m", "ftaudit", "check", str(tuned), "--base", str(base), "--quiet"]
                samples.setdefault((model, label, state), []).append(measure(argv, env))
    return samples


def medians(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """The median wall seconds and the median peak RSS in MiB of `samples` (wall seconds, peak RSS bytes)."""
    return statistics.median(w for w, _ in samples), statistics.median(r for _, r in samples) / 2**20
