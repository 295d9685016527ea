"""How a stored weight matrix maps to its layer: as out × in (nn.Linear), or transposed.

The paper's left singular vectors are the layer's output directions, the columns of U for W stored
out × in as nn.Linear stores it. transformers' Conv1D (GPT-2 and its family) computes y = x·W + b
with W stored in × out, so its matrices are analysed transposed, as the layer applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ftaudit.pairing import TensorPair

CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
"""transformers model types (config.json `model_type`) whose CONV1D_MODULES are Conv1D layers."""
CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def conv1d_family(*model_types: str | None) -> bool:
    """Whether the first of `model_types` (config.json's, None where there is none) is a Conv1D family."""
    return next((t for t in model_types if t is not None), None) in CONV1D_MODELS


def stored_transposed(name: str, conv1d: bool) -> bool:
    """Whether tensor `name` of a model (a Conv1D family when `conv1d`) is stored in × out."""
    parts = name.split(".")
    return conv1d and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in CONV1D_MODULES


def as_analysed(stored: torch.Tensor, pair: TensorPair) -> torch.Tensor:
    """A tensor of `pair` as stored, turned out × in (a contiguous copy when transposed); and back again."""
    return stored.mT.contiguous() if pair.transposed else stored
