"""An audit split into shards: each shard's time against the whole audit's, and the merge's.

Usage: python bench/shards.py [--repeats 3] [--width 1024] [--layers 8] [--shards 2 4 8]. Builds in
bench/.work the synthetic Llama-shaped bf16 pair of bench/run.py (a rank-16 update on every matrix),
then, in interleaved rounds, runs the whole audit and every shard of each split (`check --shard I/N`,
cold: no cache), each as its own process, then `merge` of each split's reports. Shards run one after
another here; on N machines (a CI job matrix) the audit takes as long as its slowest shard plus the
merge. Prints the table and writes docs/benchmarks-shards.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from common import ROOT, WORK, measure
from run import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    pair = synthetic(args.width, args.layers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    check = [sys.executable, "-m", "ftaudit", "check", str(pair.tuned), "--base", str(pair.base), "--device", "cpu",
             "--no-cache", "--quiet"]
    reports = WORK / "shards"
    reports.mkdir(parents=True, exist_ok=True)
    whole: list[float] = []
    shard_walls: dict[tuple[int, int], list[float]] = {}
    merges: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        whole.append(measure(check, env)[0])
        for n in args.shards:
            paths = [reports / f"{i}-of-{n}.json" for i in range(1, n + 1)]
            for i, path in enumerate(paths, 1):
                argv = [*check, "--shard", f"{i}/{n}", "--json", str(path)]
                shard_walls.setdefault((n, i), []).append(measure(argv, env)[0])
            merge = [sys.executable, "-m", "ftaudit", "merge", *map(str, paths), "--quiet"]
            merges.setdefault(n, []).append(measure(merge, env)[0])
    whole_wall = statistics.median(whole)
    lines = [
        "# Benchmarks: shards",
        "",
        f"Written by `python bench/shards.py --repeats {args.repeats} --width {args.width} --layers {args.layers} "
        f"--shards {' '.join(map(str, args.shards))}` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, device cpu, no cache. Input: {pair.label}, {7 * args.layers} matrices. Each "
        f"figure is the median of {args.repeats} interleaved rounds of whole processes (start-up included). "
        "`on N machines` is the slowest shard plus the merge: the audit's time when each shard runs on its own "
        "machine.",
        "",
        "| split | whole audit (s) | shards, fastest – slowest (s) | merge (s) | on N machines (s) | speed-up |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for n in args.shards:
        walls = [statistics.median(shard_walls[(n, i)]) for i in range(1, n + 1)]
        merge = statistics.median(merges[n])
        parallel = max(walls) + merge
        lines.append(f"| {n} | {whole_wall:.2f} | {min(walls):.2f} – {max(walls):.2f} | {merge:.2f} | "
                     f"{parallel:.2f} | {whole_wall / parallel:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs" / "benchmarks-shards.md").write_text(text)


if __name__ == "__main__":
    main()
