"""Auditing a LoRA adapter directly against auditing the same fine-tune merged to disk.

Usage: python bench/adapter.py [--repeats 5] [--widths 1024 2048]. Uses the committed adapter
examples/minilm-lora-r8 and its merge (made by peft's merge_and_unload in bench/.work), and a rank-16
adapter on synthetic Llama-shaped bases of the given widths with its float32 merge (made here), where
the matrices are wide enough for the factor route; prints the table and writes docs/benchmarks-adapter.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import ROOT, WORK, cold_and_warm, medians
from run import minilm, synthetic

ADAPTER = ROOT / "examples" / "minilm-lora-r8"
RANK, ALPHA = 16, 32


def synthetic_adapter(width: int) -> tuple[Path, Path, Path]:
    """A rank-16 LoRA (peft's layout) on every matrix of the synthetic Llama-shaped base `width` wide,
    and the same fine-tune merged in float32: (adapter dir, merged dir, base dir)."""
    base_dir = synthetic(width, 1).base
    folder = WORK / f"synthetic-{width}-adapter"
    adapter_dir, merged_dir = folder / "adapter", folder / "merged"
    if not (merged_dir / "model.safetensors").exists():
        g = torch.Generator().manual_seed(1)
        factors, merged = {}, {}
        for name, w in load_file(base_dir / "model.safetensors").items():
            rows, cols = w.shape
            a = torch.randn(RANK, cols, generator=g) / cols**0.5
            b = torch.randn(rows, RANK, generator=g) * 0.005
            prefix = "base_model.model." + name.removesuffix(".weight")
            factors[f"{prefix}.lora_A.weight"], factors[f"{prefix}.lora_B.weight"] = a, b
            merged[name] = w.float() + (ALPHA / RANK) * (b.double() @ a.double()).float()
        adapter_dir.mkdir(parents=True, exist_ok=True)
        merged_dir.mkdir(parents=True, exist_ok=True)
        save_file(factors, adapter_dir / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "base_model_name_or_path": "synthetic/base",
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
        save_file(merged, merged_dir / "model.safetensors")
    return adapter_dir, merged_dir, base_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="*", default=[1024, 2048],
                        help="synthetic Llama-shaped bases with a rank-16 adapter, beside MiniLM")
    args = parser.parse_args()
    merged = minilm("lora")
    cache = WORK / "cache-adapter"
    runs = {("MiniLM", "adapter (W0 + s·B·A in memory)"): (ADAPTER, merged.base),
            ("MiniLM", "merged checkpoint"): (merged.tuned, merged.base)}
    for width in args.widths:
        adapter_dir, merged_dir, base_dir = synthetic_adapter(width)
        model = f"synthetic {width} wide, 1 layer, r={RANK}"
        runs[(model, "adapter (W0 + s·B·A in memory)")] = (adapter_dir, base_dir)
        runs[(model, "merged checkpoint (F32)")] = (merged_dir, base_dir)
    samples = cold_and_warm(runs, args.repeats, cache)
    lines = [
        "# Adapter audit against merged-model audit",
        "",
        f"Measured by `python bench/adapter.py --repeats {args.repeats}` on {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPU cores, device cpu; medians of whole-process runs, interleaved. The MiniLM adapter is "
        "the committed examples/minilm-lora-r8 (1.3 MB) and its merged checkpoint the same fine-tune merged by peft "
        "(91 MB); both audits give the same intruder counts (tests/test_minilm.py checks it). MiniLM's matrices are "
        "under 512 wide, so there both audits take the generic top-k route and the adapter audit gains by reading "
        "less. The synthetic rows put a random rank-16 adapter (α = 32) on every matrix of a Llama-shaped BF16 base "
        "(as in bench/run.py) and merge it in float32; there the adapter audit takes the factor route of "
        "ftaudit/low_rank.py (tests/test_low_rank.py checks it against a float64 SVD).",
        "",
        "| model | input | cache | wall (s) | peak RSS (MiB) |",
        "|---|---|---|---:|---:|",
    ]
    for (model, label, state), values in samples.items():
        wall, rss = medians(values)
        lines.append(f"| {model} | {label} | {state} | {wall:.2f} | {rss:.0f} |")
        print(f"{model:34} {label:32} {state:5} {wall:6.2f} s {rss:6.0f} MiB", flush=True)
    (ROOT / "docs" / "benchmarks-adapter.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
