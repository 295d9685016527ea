"""WeightWatcher's base-model comparison on two safetensors checkpoints, the way its users run it.

Usage: python bench/weightwatcher_run.py TUNED_DIR BASE_DIR. Both checkpoints are loaded whole into
torch modules (WeightWatcher analyses nn.Module objects) with the same layer structure.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftaudit.pairing import DEFAULT_KINDS, module_kind


def as_module(weights: dict[str, torch.Tensor], names: list[str]) -> torch.nn.Module:
    layers = []
    for name in names:
        w = weights[name].float()
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def main(tuned_dir: str, base_dir: str) -> int:
    logging.disable(logging.WARNING)
    import weightwatcher

    base = load_file(Path(base_dir) / "model.safetensors")
    tuned = load_file(Path(tuned_dir) / "model.safetensors")
    names = [n for n, w in base.items() if w.ndim == 2 and module_kind(n) in DEFAULT_KINDS and n in tuned]
    details = weightwatcher.WeightWatcher().analyze(model=as_module(tuned, names), base_model=as_module(base, names))
    return len(details)


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2]))
