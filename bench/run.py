"""ftaudit against the paper's reference implementation and the peers, measured side by side.

Usage: python bench/run.py [--repeats 3] [--widths 1024 2048 4096] [--depths 1 2 4] [--no-peers] [--once-from 4096]

Builds its inputs in bench/.work (real MiniLM fine-tunes, synthetic pairs with Llama's shapes), then
runs every tool on every input in interleaved rounds, each as its own process, and records whole-process
wall time and peak resident memory (from wait4). Prints the table and writes docs/benchmarks.md.
Inputs at least `--once-from` wide are measured once, without the peers (a round takes many minutes).
The start-up floor (an interpreter that only imports torch) is measured beside them, so the table
also gives each ratio net of it.
Install the peers with `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import ROOT, WORK, llama_shapes, measure

from examples import minilm_finetunes as ft

LLAMA_MLP_RATIO = 11008 / 4096


@dataclass(frozen=True)
class Pair:
    label: str
    tuned: Path
    base: Path
    largest_pair_bytes: int
    width: int


def synthetic(width: int, layers: int, seed: int = 0) -> Pair:
    """A Llama-shaped bf16 base and a tuned copy with a rank-16 update on every matrix."""
    folder = WORK / f"synthetic-{width}x{layers}"
    base_dir, tuned_dir = folder / "base", folder / "tuned"
    ffn = round(width * LLAMA_MLP_RATIO / 64) * 64
    shapes = llama_shapes(width, ffn)
    largest = max(r * c for r, c in shapes.values()) * 2 * 2
    if not (tuned_dir / "model.safetensors").exists():
        g = torch.Generator().manual_seed(seed)
        base, tuned = {}, {}
        for i in range(layers):
            for module, (rows, cols) in shapes.items():
                name = f"model.layers.{i}.{module}.weight"
                w = torch.randn(rows, cols, generator=g) / cols**0.5
                delta = torch.randn(rows, 16, generator=g) @ torch.randn(16, cols, generator=g) * (0.02 / cols**0.5)
                base[name], tuned[name] = w.to(torch.bfloat16), (w + delta).to(torch.bfloat16)
        for d, tensors in ((base_dir, base), (tuned_dir, tuned)):
            d.mkdir(parents=True, exist_ok=True)
            save_file(tensors, d / "model.safetensors")
    return Pair(f"synthetic {width} wide, {layers} layer{'s' * (layers > 1)} (bf16)", tuned_dir, base_dir, largest, width)


def minilm(kind: str) -> Pair:
    folder = WORK / f"minilm-{kind}"
    if not (folder / "model.safetensors").exists():
        if kind == "lora":
            ft.make_lora(folder, rank=8, save="merged")
        else:
            ft.make_full(folder)
    size = 30522 * 384 * 4 * 2  # the word embeddings, read for their row-norm drift
    label = f"MiniLM {'LoRA r=8, merged' if kind == 'lora' else 'full fine-tune'}"
    return Pair(label, folder, ft.base_model_dir(), size, 384)


STARTUP = "start-up floor (import torch)"
REFERENCE = "reference (f32 full SVD)"


def tools(peers: bool) -> dict[str, list[str]]:
    py = sys.executable
    found = {
        STARTUP: [py, "-c", "import torch"],
        "ftaudit cold": [py, "-m", "ftaudit", "check", "{tuned}", "--base", "{base}", "--device", "cpu", "--quiet"],
        "ftaudit warm": [py, "-m", "ftaudit", "check", "{tuned}", "--base", "{base}", "--device", "cpu", "--quiet"],
        REFERENCE: [py, str(ROOT / "bench" / "reference_svd.py"), "{tuned}", "{base}"],
    }
    if peers:
        found["modeldelta"] = [py, "-m", "modeldelta", "{base}", "{tuned}", "-o", "{out}.json", "-q"]
        found["WeightWatcher (base_model)"] = [py, str(ROOT / "bench" / "weightwatcher_run.py"), "{tuned}", "{base}"]
    return found


def run(pairs: list[Pair], repeats: int, peers: bool, once_from: int) -> list[dict[str, object]]:
    rows = []
    for pair in pairs:
        cache = WORK / "cache"
        env = {**os.environ, "FTAUDIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        once = pair.width >= once_from
        measured = tools(peers and not once)
        samples: dict[str, list[tuple[float, int]]] = {name: [] for name in measured}
        for _ in range(1 if once else repeats):
            for name, template in measured.items():
                if name == "ftaudit cold":
                    shutil.rmtree(cache, ignore_errors=True)
                argv = [a.format(tuned=pair.tuned, base=pair.base, out=WORK / "out") for a in template]
                samples[name].append(measure(argv, env))
        reference = statistics.median(w for w, _ in samples[REFERENCE])
        floor = statistics.median(w for w, _ in samples[STARTUP])
        for name, values in samples.items():
            wall = statistics.median(w for w, _ in values)
            rss = statistics.median(m for _, m in values)
            net = None if name == STARTUP else (wall - floor) / (reference - floor)
            rows.append({"input": pair.label, "tool": name, "wall": wall, "rss": rss, "ratio": wall / reference,
                         "net": net, "runs": len(values), "budget": 4 * pair.largest_pair_bytes + 400 * 2**20})
            print(f"{pair.label:45} {name:30} {wall:8.2f} s {rss / 2**20:8.0f} MiB  {wall / reference:5.2f}x ref",
                  flush=True)
    return rows


def write(rows: list[dict[str, object]], repeats: int) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python bench/run.py` on {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, device cpu. Each figure is the median "
        f"of the runs counted in `runs` ({repeats} unless said) of the whole process (start-up and imports included), "
        "tools interleaved round by round. `ratio` is wall time over the reference's in the same run; `net ratio` "
        "is the same with the start-up floor (an interpreter importing torch, measured in the same rounds) taken "
        "off both. The memory budget is the target 4 × the largest tensor pair + 400 MiB.",
        "",
        "| input | tool | runs | wall (s) | ratio | net ratio | peak RSS (MiB) | RSS budget (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        net = "" if r["net"] is None else f"{r['net']:.2f}"
        lines.append(
            f"| {r['input']} | {r['tool']} | {r['runs']} | {r['wall']:.2f} | {r['ratio']:.2f} | {net} | "
            f"{r['rss'] / 2**20:.0f} | {r['budget'] / 2**20:.0f} |"
        )
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--depths", type=int, nargs="*", default=[1, 2, 4], help="layers, at the smallest width")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--once-from", type=int, default=4096, help="width from which inputs run once, without peers")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    pairs = [minilm("lora"), minilm("full")]
    pairs += [synthetic(min(args.widths), d) for d in args.depths]
    pairs += [synthetic(w, 1) for w in args.widths if w != min(args.widths)]
    rows = run(pairs, args.repeats, not args.no_peers, args.once_from)
    write(rows, args.repeats)


if __name__ == "__main__":
    main()
