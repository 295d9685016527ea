"""Auditing a mixture of experts whose experts are stacked in 3-D tensors, as the number of experts grows.

Usage: python bench/moe.py [--repeats 3] [--experts 4 8 16]. Builds in bench/.work one MoE layer with
Qwen3-30B-A3B's expert shapes (hidden 2048, expert MLP 768: gate_up E × 1536 × 2048 and down
E × 2048 × 768, BF16, stored as transformers 5 saves Qwen3-VL-MoE) for each E, a full fine-tune with a
rank-16 update on every expert, and a PEFT LoRA on both stacks (target_parameters, r = 16, each
expert's factors interleaved as PEFT stores them). The same LoRA is also audited against the same
base stored as Qwen3-MoE's checkpoints are, expert by expert (gate_proj, up_proj, down_proj: 3·E
matrices). Runs each audit as its own process in interleaved rounds, cold and warm cache, and records
wall time and peak resident memory; prints the table and writes docs/benchmarks-moe.md. Each expert's
matrix is read alone, so peak memory should not grow with E while the stacks do.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import ROOT, WORK, cold_and_warm, medians

HIDDEN, EXPERT_MLP, RANK = 2048, 768, 16
STACKS = {"gate_up_proj": (2 * EXPERT_MLP, HIDDEN), "down_proj": (HIDDEN, EXPERT_MLP)}
"""Each stack's expert matrix, out × in as stored."""
PREFIX = "model.language_model.layers.0.mlp.experts"
CONFIG = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": HIDDEN, "moe_intermediate_size": EXPERT_MLP}}
PARTS_PREFIX = "model.layers.0.mlp.experts"
PARTS_CONFIG = {"model_type": "qwen3_moe", "hidden_size": HIDDEN, "moe_intermediate_size": EXPERT_MLP}
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""How Qwen3-MoE's checkpoints store each expert's matrix of a stack: its parts, one above the other."""
FULL, LORA, LORA_PARTS = "full fine-tune", "LoRA on the stacks (target_parameters)", "same LoRA, base stored per expert"


def build(experts: int) -> tuple[dict[str, tuple[Path, Path]], int]:
    """The (tuned, base) folders of each input for `experts` experts, and the bytes of one stack."""
    folder = WORK / f"moe-{experts}"
    base_dir, tuned_dir, adapter_dir = folder / "base", folder / "tuned", folder / "adapter"
    parts_dir, parts_adapter_dir = folder / "base-parts", folder / "adapter-parts"
    if not (parts_adapter_dir / "adapter_model.safetensors").exists():
        g = torch.Generator().manual_seed(experts)
        base, tuned, parts, factors = {}, {}, {}, {}
        for stack, (rows, cols) in STACKS.items():
            w = torch.randn(experts, rows, cols, generator=g) / cols**0.5
            b = torch.randn(experts, rows, RANK, generator=g) * (0.02 / cols**0.5)
            a = torch.randn(experts, RANK, cols, generator=g)
            base[f"{PREFIX}.{stack}"] = w.to(torch.bfloat16)
            tuned[f"{PREFIX}.{stack}"] = (w + b @ a).to(torch.bfloat16)
            names = PARTS[stack]
            for e in range(experts):
                for name, part in zip(names, w[e].to(torch.bfloat16).chunk(len(names)), strict=True):
                    parts[f"{PARTS_PREFIX}.{e}.{name}.weight"] = part.contiguous()
            # PEFT's ParamWrapper: A is (E·r) × in, B is out × (r·E); its nesting names the second parameter's pair
            module = "" if stack == "down_proj" else ".base_layer"
            factors[f"{module}.lora_A.weight"] = a.reshape(experts * RANK, cols).contiguous()
            factors[f"{module}.lora_B.weight"] = b.permute(1, 2, 0).reshape(rows, RANK * experts).contiguous()
        for folder_, tensors, config in ((base_dir, base, CONFIG), (tuned_dir, tuned, CONFIG),
                                         (parts_dir, parts, PARTS_CONFIG)):
            folder_.mkdir(parents=True, exist_ok=True)
            save_file(tensors, folder_ / "model.safetensors")
            (folder_ / "config.json").write_text(json.dumps(config))
        for folder_, prefix in ((adapter_dir, PREFIX), (parts_adapter_dir, PARTS_PREFIX)):
            folder_.mkdir(parents=True, exist_ok=True)
            save_file({f"base_model.model.{prefix}{k}": v for k, v in factors.items()},
                      folder_ / "adapter_model.safetensors")
            config = {"peft_type": "LORA", "r": RANK, "lora_alpha": RANK, "target_modules": [],
                      "target_parameters": [f"mlp.experts.{s}" for s in STACKS], "base_model_name_or_path": "synthetic"}
            (folder_ / "adapter_config.json").write_text(json.dumps(config))
    stack_bytes = experts * max(r * c for r, c in STACKS.values()) * 2
    inputs = {FULL: (tuned_dir, base_dir), LORA: (adapter_dir, base_dir), LORA_PARTS: (parts_adapter_dir, parts_dir)}
    return inputs, stack_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--experts", type=int, nargs="*", default=[4, 8, 16])
    args = parser.parse_args()
    cache = WORK / "cache-moe"
    runs, sizes = {}, {}
    for experts in args.experts:
        inputs, sizes[experts] = build(experts)
        runs |= {(experts, label): folders for label, folders in inputs.items()}
    samples = cold_and_warm(runs, args.repeats, cache)
    lines = [
        "# Mixture of experts: stacked experts as their number grows",
        "",
        f"Measured by `python bench/moe.py --repeats {args.repeats} --experts {' '.join(map(str, args.experts))}` on "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, device cpu; medians of whole-process runs, "
        "interleaved. One MoE layer with Qwen3-30B-A3B's expert shapes (hidden 2048, expert MLP 768), BF16, its E "
        "experts stacked in two 3-D tensors (gate_up E × 1536 × 2048, down E × 2048 × 768); every expert's matrix is "
        "a matrix audited (2·E of them). The full fine-tune adds a rank-16 update to every expert; the LoRA holds "
        "rank-16 factors of every expert in PEFT's interleaved layout. The same LoRA is audited against the same base "
        "stored as Qwen3-MoE's checkpoints are, expert by expert: gate_proj and up_proj (768 × 2048 each) and "
        "down_proj, 3·E matrices. Each expert's matrix is read alone: peak memory does not follow the stack's size.",
        "",
        "| experts | input | cache | wall (s) | per matrix (s) | peak RSS (MiB) | one stack (MiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for (experts, label, state), values in samples.items():
        wall, rss = medians(values)
        matrices = (3 if label == LORA_PARTS else 2) * experts
        lines.append(f"| {experts} | {label} | {state} | {wall:.2f} | {wall / matrices:.3f} | {rss:.0f} "
                     f"| {sizes[experts] / 2**20:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs" / "benchmarks-moe.md").write_text(text)


if __name__ == "__main__":
    main()
