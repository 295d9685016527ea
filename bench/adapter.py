"""Auditing a LoRA adapter directly against auditing the same fine-tune merged to disk.

Usage: python bench/adapter.py [--repeats 5]. Uses the committed adapter examples/minilm-lora-r8 and
its merge (made by peft's merge_and_unload in bench/.work); prints the table and writes
docs/benchmarks-adapter.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

from run import ROOT, WORK, measure, minilm

ADAPTER = ROOT / "examples" / "minilm-lora-r8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    merged = minilm("lora")
    cache = WORK / "cache-adapter"
    env = {**os.environ, "FTAUDIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    runs = {"adapter (W0 + s·B·A in memory)": ADAPTER, "merged checkpoint": merged.tuned}
    samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for _ in range(args.repeats):
        for label, tuned in runs.items():
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                argv = [sys.executable, "-m", "ftaudit", "check", str(tuned), "--base", str(merged.base), "--quiet"]
                samples.setdefault((label, state), []).append(measure(argv, env))
    lines = [
        "# Adapter audit against merged-model audit",
        "",
        f"Measured by `python bench/adapter.py --repeats {args.repeats}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPU cores, device cpu; medians of whole-process runs, interleaved. The adapter is the "
        "committed examples/minilm-lora-r8 (1.3 MB); the merged checkpoint is the same fine-tune merged by peft "
        "(91 MB). Both audits give the same intruder counts (tests/test_minilm.py checks it).",
        "",
        "| input | cache | wall (s) | peak RSS (MiB) |",
        "|---|---|---:|---:|",
    ]
    for (label, state), values in samples.items():
        wall = statistics.median(w for w, _ in values)
        rss = statistics.median(m for _, m in values) / 2**20
        lines.append(f"| {label} | {state} | {wall:.2f} | {rss:.0f} |")
        print(f"{label:32} {state:5} {wall:6.2f} s {rss:6.0f} MiB", flush=True)
    (ROOT / "docs" / "benchmarks-adapter.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
