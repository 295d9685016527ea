"""How a stored weight tensor maps to its layer's matrices: as out × in (nn.Linear), transposed, or stacked.

The paper's left singular vectors are the layer's output directions, the columns of U for W stored
out × in as nn.Linear stores it. transformers' Conv1D (GPT-2 and its family) computes y = x·W + b
with W stored in × out, so its matrices are analysed transposed, as the layer applies them.

A mixture-of-experts layer may store its experts' matrices as one 3-D tensor, E × out × in (the
layout of transformers' fused experts), or E × in × out in the families that compute x·W_e (Llama 4,
gpt-oss): each expert's matrix is analysed on its own, named `tensor[e]`, out × in. DBRX stores its
experts' matrices one above the other in 2-D tensors (`ffn.experts.mlp.w1`, E·I × H), seen as the
stacks they are, E × I × H, as its layers view them. Where config.json
gives the hidden width, a stack's layout is read from its shape: the hidden width is the input of an
up or gate projection and the output of a down projection. So are checkpoints of one family saved
both ways (Qwen3-VL-MoE's, E × in × out as published, E × out × in as transformers 5 saves them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ftaudit.base import Architecture

CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
"""transformers model types (config.json `model_type`) whose CONV1D_MODULES are Conv1D layers."""
CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
EXPERTS_IN_OUT_MODELS = frozenset({
    "llama4", "llama4_text", "gpt_oss", "openai_privacy_filter", "aria", "aria_text", "ergo",
})
"""transformers model types whose stacked experts are stored E × in × out (every other stack is E × out × in)."""
EXPERTS_MARKED_TRANSPOSED = EXPERTS_IN_OUT_MODELS - {"llama4", "llama4_text"}
"""Those whose experts class transformers marks `is_transposed`: PEFT's LoRA on their stacks (target_parameters)
holds each expert's ΔWᵀ as B·A; on every other stack, each expert's ΔW (Llama 4's too)."""
CONCATENATED_EXPERTS = re.compile(r"(^|\.)experts\.mlp\.(w1|v1|w2)$")
"""DBRX's tensors of experts' matrices one above the other: w1 and v1 out × in, w2 in × out."""


@dataclass(frozen=True)
class Layout:
    """How a model family stores its matrices, known from config.json's `model_type` and hidden width."""

    conv1d: bool = False
    """The family's CONV1D_MODULES are Conv1D layers, stored in × out."""
    experts_in_out: bool = False
    """The family's stacked experts are stored E × in × out."""
    peft_experts_transposed: bool = False
    """PEFT's LoRA on the family's stacked experts holds each expert's ΔWᵀ (EXPERTS_MARKED_TRANSPOSED)."""
    hidden_size: int | None = None
    """The width of the hidden states, which tells a stack's layout from its shape."""
    concatenated_experts: int | None = None
    """The number of experts whose matrices the family stores one above the other in 2-D tensors (DBRX)."""
    tied_embeddings: bool | None = None
    """config.json's `tie_word_embeddings`: the output head shares the input embedding's weight; None where unsaid."""

    @classmethod
    def of(cls, *architectures: Architecture) -> Layout:
        """The layout of the first of `architectures` (config.json's) whose type is known; the first hidden width, and
        the first that says whether the embeddings are tied."""
        model_type = next((a.model_type for a in architectures if a.model_type is not None), None)
        hidden = next((a.hidden_size for a in architectures if a.hidden_size is not None), None)
        experts = next((a.experts for a in architectures if a.experts is not None), None)
        tied = next((a.tied_embeddings for a in architectures if a.tied_embeddings is not None), None)
        return cls(model_type in CONV1D_MODELS, model_type in EXPERTS_IN_OUT_MODELS,
                   model_type in EXPERTS_MARKED_TRANSPOSED, hidden, experts if model_type == "dbrx" else None, tied)

    def stacked_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The E × rows × cols stack that 2-D tensor `name` holds, its experts' matrices one above the other (DBRX's);
        None for any other tensor."""
        experts = self.concatenated_experts
        if experts is None or len(shape) != 2 or shape[0] % experts or not self.concatenated(name):
            return None
        return experts, shape[0] // experts, shape[1]

    def concatenated(self, name: str) -> bool:
        """Whether tensor `name` holds its experts' matrices one above the other, read as a stack (DBRX's)."""
        return self.concatenated_experts is not None and CONCATENATED_EXPERTS.search(name) is not None

    def transposed(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether tensor `name` of this shape holds its matrices in × out."""
        if is_expert_stack(name, shape):
            if self.concatenated(name):
                return _projection(name) == "down"  # DBRX's w2, x·W_e, even where its matrices are square
            return self._stack_in_out(name, shape[1], shape[2])
        parts = name.split(".")
        return self.conv1d and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in CONV1D_MODULES

    def _stack_in_out(self, name: str, rows: int, cols: int) -> bool:
        """Whether a stack of E × rows × cols matrices is stored in × out: from which side is the hidden width, where
        the name says what the projection is and exactly one side is that wide; else from the family."""
        role = _projection(name)
        if self.hidden_size is None or role is None or (rows == self.hidden_size) == (cols == self.hidden_size):
            return self.experts_in_out
        return (rows == self.hidden_size) == (role == "up")


def _projection(name: str) -> str | None:
    """"up" for a projection from the hidden states (up, gate, w1, w3, input_linear), "down" for one back to them
    (down, w2, output_linear); None when the name does not say."""
    leaf = name.removesuffix(".weight").rpartition(".")[2]
    if leaf.startswith("down") or leaf in ("w2", "output_linear", "fc2"):
        return "down"
    if leaf.startswith(("up", "gate")) or leaf in ("w1", "w3", "v1", "input_linear", "fc1"):
        return "up"
    return None


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor holds one matrix per expert: 3-D, not a convolution's kernel (out × in × width), and not a
    vector shaped to broadcast (RWKV's `time_mix_*`, 1 × 1 × hidden, applied elementwise)."""
    return len(shape) == 3 and min(shape) > 0 and shape[:2] != (1, 1) and "conv" not in name.lower()


def expert_name(name: str, expert: int) -> str:
    """How the report names expert `expert`'s matrix of stacked tensor `name`."""
    return f"{name}[{expert}]"


def matrix_tensor(name: str) -> str:
    """The tensor that holds matrix `name`: itself, or the stack of an expert's matrix (`tensor[e]`)."""
    return re.sub(r"\[\d+\]$", "", name)


def as_analysed(stored: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A matrix as stored, turned out × in when it is stored `transposed` (a copy of standard strides); and back."""
    return stored.mT.clone(memory_format=torch.contiguous_format) if transposed else stored
