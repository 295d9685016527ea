"""A Llama-2-7B-shaped audit on a GPU, against the disk's read rate and a decomposition ceiling.

Usage: python bench/gpu.py [--layers 32] [--hidden 4096] [--mlp 11008] [--vocab 32000] [--device cuda] [--doc PATH]

Measures, in this order:

- the ceiling: what the device takes for the kernels an audit cannot avoid, timed on one matrix of
  each shape and multiplied by the count: float64 Gram and eigh of the base, float32 Gram of the
  tuned matrix and the start of its top-k (the iterated start, or the float32 eigh where that does
  not converge), float64 Gram and eigvalsh of ΔW; warm, without the base's share;
- the disk's read rate, after making on the device a BF16 base with Llama's shapes and a tuned copy
  with a rank-16 update on every attention and MLP matrix, one safetensors shard per layer
  (bench/.work/gpu-LAYERSxHIDDEN): both models read once, in 64 MiB pieces;
- ftaudit cold (empty cache) and warm (the base's spectra cached, 14 GiB, under the default cap),
  each as its own process.

Before each read the kernel is asked to drop both models' pages from the page cache, so that the
weights come from the disk where it does. The table (docs/benchmarks-gpu.md, or --doc) is rewritten
after each step, so a run cut short keeps what it measured. `--device cpu` with small sizes checks
the script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import ROOT, WORK, llama_shapes, measure

from ftaudit.spectral import START_FACTOR, iterated_start

RANK = 16
K = 10
"""The top k an audit examines (its default)."""
PIECE = 64 * 2**20


def make_pair(folder: Path, layers: int, hidden: int, mlp: int, vocab: int, device: torch.device) -> tuple[Path, Path]:
    """The base and tuned model folders, made once: sharded BF16 safetensors with an index."""
    base_dir, tuned_dir = folder / "base", folder / "tuned"
    if (tuned_dir / "model.safetensors.index.json").exists():
        return base_dir, tuned_dir
    shapes = llama_shapes(hidden, mlp)
    g = torch.Generator(device=device).manual_seed(0)
    maps: dict[Path, dict[str, str]] = {base_dir: {}, tuned_dir: {}}
    for d in maps:
        d.mkdir(parents=True, exist_ok=True)
    for shard in range(layers + 1):
        file = f"model-{shard:05d}.safetensors"
        base: dict[str, torch.Tensor] = {}
        tuned: dict[str, torch.Tensor] = {}
        if shard == layers:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                base[name] = tuned[name] = (torch.randn(vocab, hidden, generator=g, device=device) * 0.02).bfloat16().cpu()
        else:
            for module, (rows, cols) in shapes.items():
                name = f"model.layers.{shard}.{module}.weight"
                w = torch.randn(rows, cols, generator=g, device=device) / cols**0.5
                delta = torch.randn(rows, RANK, generator=g, device=device) @ torch.randn(RANK, cols, generator=g, device=device)
                base[name] = w.bfloat16().cpu()
                tuned[name] = (w + delta * (0.02 / cols**0.5)).bfloat16().cpu()
        for d, tensors in ((base_dir, base), (tuned_dir, tuned)):
            save_file(tensors, d / file)
            maps[d].update(dict.fromkeys(tensors, file))
    for d, weight_map in maps.items():
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base_dir, tuned_dir


def weight_files(*folders: Path) -> list[Path]:
    return sorted(p for d in folders for p in d.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Ask the kernel to drop the files' pages from the page cache, so the next read comes from the
    disk. A kernel may ignore it (a sandbox's, say): the disk's read rate then shows memory's."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as error:
            print(f"{path.name}: the page cache was not dropped ({error.strerror})", flush=True)
        finally:
            os.close(fd)


def disk_read(files: list[Path]) -> tuple[float, int]:
    """Seconds to read the files from the disk, and their bytes."""
    evict(files)
    buffer = bytearray(PIECE)
    start, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return time.perf_counter() - start, total


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of fn() on the device, after one untimed call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def other_library(g64: torch.Tensor, device: torch.device) -> dict[str, float]:
    """On CUDA, the float64 eigensolvers' times with MAGMA instead of torch's default library (not
    counted in the ceiling: they show whether the other library would lower it)."""
    if device.type != "cuda":
        return {}
    default = torch.backends.cuda.preferred_linalg_library()
    try:
        torch.backends.cuda.preferred_linalg_library("magma")
        return {
            "float64 eigvalsh (MAGMA)": timed(lambda: torch.linalg.eigvalsh(g64), device),
            "base float64 eigh (MAGMA)": timed(lambda: torch.linalg.eigh(g64), device),
        }
    except RuntimeError as error:  # a torch built without MAGMA
        print(f"MAGMA not timed: {error}", flush=True)
        return {}
    finally:
        torch.backends.cuda.preferred_linalg_library(default)


def ceiling(layers: int, hidden: int, mlp: int, device: torch.device) -> tuple[float, float, dict[str, float]]:
    """Seconds the unavoidable kernels take, cold and warm, and each kernel's time per matrix shape."""
    counts = {(hidden, hidden): 4 * layers, (mlp, hidden): 2 * layers, (hidden, mlp): layers}
    cold = warm = 0.0
    kernels: dict[str, float] = {}
    block = START_FACTOR * K + 1
    for (rows, cols), count in counts.items():
        w = torch.randn(rows, cols, device=device, dtype=torch.float64) / cols**0.5
        small = (lambda a: a @ a.mT) if rows <= cols else (lambda a: a.mT @ a)
        g64, g32 = small(w), small(w.float())
        if iterated_start(g32, block, K) is not None:
            start = "float32 start (iterated)", timed(lambda: iterated_start(g32, block, K), device)
        else:
            start = "float32 start (eigh)", timed(lambda: torch.linalg.eigh(g32), device)
        shared = {
            "float32 Gram": timed(lambda: small(w.float()), device),
            start[0]: start[1],
            "float64 Gram": timed(lambda: small(w), device),
            "float64 eigvalsh": timed(lambda: torch.linalg.eigvalsh(g64), device),
        }
        base = {"base float64 eigh": timed(lambda: torch.linalg.eigh(g64), device)}  # its Gram costs ΔW's
        for name, seconds in {**shared, **base, **other_library(g64, device)}.items():
            kernels[f"{name}, {rows}×{cols}"] = seconds
        warm += count * sum(shared.values())
        cold += count * (sum(shared.values()) + shared["float64 Gram"] + sum(base.values()))
    return cold, warm, kernels


@dataclass
class Findings:
    """What the benchmark has measured so far; written out after each step, so a run cut short keeps it."""

    name: str
    args: argparse.Namespace
    ceiling: tuple[float, float]
    """Seconds, cold and warm."""
    kernels: dict[str, float]
    disk: tuple[float, float] | None = None
    """Gigabytes read and seconds taken."""
    runs: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Wall seconds and peak RSS bytes, by audit."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks-gpu.md",
                        help="Where to write the table, rewritten after each step.")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu with small sizes")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    cold_ceiling, warm_ceiling, kernels = ceiling(args.layers, args.hidden, args.mlp, device)
    found = Findings(name, args, (cold_ceiling, warm_ceiling), kernels)
    print(f"ceiling: cold {cold_ceiling:.1f} s, warm {warm_ceiling:.1f} s", flush=True)
    write(found)
    folder = WORK / f"gpu-{args.layers}x{args.hidden}"
    start = time.perf_counter()
    base_dir, tuned_dir = make_pair(folder, args.layers, args.hidden, args.mlp, args.vocab, device)
    print(f"inputs ready in {time.perf_counter() - start:.0f} s", flush=True)
    files = weight_files(base_dir, tuned_dir)
    read_s, read_bytes = disk_read(files)
    found.disk = read_bytes / 1e9, read_s
    print(f"disk: {read_bytes / 1e9:.1f} GB in {read_s:.1f} s", flush=True)
    write(found)
    cache = folder / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "FTAUDIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "ftaudit", "check", str(tuned_dir), "--base", str(base_dir),
            "--device", args.device, "--quiet"]
    for label in ("cold", "warm"):
        evict(files)
        found.runs[label] = measure(argv, env)
        print(f"ftaudit {label}: {found.runs[label][0]:.1f} s", flush=True)
        write(found)
    print(args.doc.read_text())


def write(found: Findings) -> None:
    """The table of what was measured so far, written to `found.args.doc`."""
    args = found.args
    lines = [
        "# GPU benchmark",
        "",
        f"Written by `python bench/gpu.py` on {time.strftime('%Y-%m-%d')}: {found.name}, torch {torch.__version__}. "
        f"Input: a BF16 pair with Llama's shapes, {args.layers} layers, hidden {args.hidden}, MLP {args.mlp}, "
        f"vocabulary {args.vocab}, a rank-{RANK} update on each of its {7 * args.layers} matrices. Each audit is "
        "one whole process, after asking the kernel to drop both models from the page cache (posix_fadvise; "
        "a kernel that ignores it leaves them in memory, and the disk rate below is then memory's). The lower "
        "bound is the larger of the disk's read time and the ceiling (reading and decomposing overlap).",
        "",
    ]
    if found.disk is not None:
        gigabytes, read_s = found.disk
        lines += [f"Disk: both models, {gigabytes:.1f} GB, read in {read_s:.1f} s: {gigabytes / read_s:.2f} GB/s.", ""]
    if found.runs and found.disk is not None:
        lines += ["| audit | wall (s) | achieved GB/s | decomposition ceiling (s) | lower bound (s) | wall / bound "
                  "| peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, (wall, rss) in found.runs.items():
            ceiling_s = found.ceiling[0 if label == "cold" else 1]
            bound = max(found.disk[1], ceiling_s)
            lines.append(f"| ftaudit {label} | {wall:.1f} | {found.disk[0] / wall:.2f} | {ceiling_s:.1f} | {bound:.1f} "
                         f"| {wall / bound:.2f} | {rss / 2**20:.0f} |")
        lines.append("")
    else:
        lines += [f"Decomposition ceiling: cold {found.ceiling[0]:.1f} s, warm {found.ceiling[1]:.1f} s.", ""]
    lines += ["Kernel times per matrix (median of 3) that make up the ceiling (cold also counts the base's float64 "
              "Gram, which costs what ΔW's does; rows marked MAGMA are the same solvers in that library, not "
              "counted):", "", "| kernel | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in found.kernels.items()]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
