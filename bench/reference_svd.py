"""The paper's measurement as its authors run it: full float32 SVDs of every base and tuned matrix.

Usage: python bench/reference_svd.py TUNED_DIR BASE_DIR  (model.safetensors in each; attention and MLP
matrices, k = 10, ε = 0.5). Prints the intruder total.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ftaudit.pairing import DEFAULT_KINDS, module_kind


def main(tuned_dir: str, base_dir: str, k: int = 10, epsilon: float = 0.5) -> int:
    total = 0
    with safe_open(Path(base_dir) / "model.safetensors", "pt") as base, \
            safe_open(Path(tuned_dir) / "model.safetensors", "pt") as tuned:
        for name in base.keys():
            w0 = base.get_tensor(name)
            if w0.ndim != 2 or module_kind(name) not in DEFAULT_KINDS or name not in tuned.keys():
                continue
            u0 = torch.linalg.svd(w0.float(), full_matrices=False).U
            ut = torch.linalg.svd(tuned.get_tensor(name).float(), full_matrices=False).U[:, :k]
            total += int(((u0.T @ ut).abs().max(dim=0).values < epsilon).sum())
    return total


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2]))
