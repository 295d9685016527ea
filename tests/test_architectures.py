"""Real architectures end to end: every linear map a tiny transformers model applies is audited, once, as the layer
applies it.

Each model is made by transformers with random weights, fine-tuned by hand (a strong low-rank update of new directions
in every other matrix, a small dense change in the others), and saved with save_pretrained, which writes each
family's checkpoint layout. The reference is the paper's definition computed from the model objects: a float64 SVD of
each layer's out × in matrix (nn.Linear's weight, Conv1D's transposed, each expert's of transformers' fused stacks),
named as the checkpoint stores it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import reference
from tests.invoke import run

transformers = pytest.importorskip("transformers")

Matrices = dict[str, torch.Tensor]
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)


def _stored_as_published(name: str, w: torch.Tensor) -> Matrices:
    """An expert's matrix of transformers' fused stacks as the published checkpoint stores it: Mixtral's w1, w3, w2."""
    found = re.fullmatch(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)\[(\d+)\]", name)
    if found is None:
        return {re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", name): w}
    owner, stack, e = found.groups()
    parts = f"{owner}.block_sparse_moe.experts.{e}"
    if stack == "down_proj":
        return {f"{parts}.w2.weight": w}
    half = w.shape[0] // 2
    return {f"{parts}.w1.weight": w[:half], f"{parts}.w3.weight": w[half:]}


def _stored_whole(name: str, w: torch.Tensor) -> Matrices:
    """GraniteMoE's stacks, stored whole under their published names, and its router."""
    name = name.replace("experts.gate_up_proj[", "input_linear.weight[").replace("experts.down_proj[", "output_linear.weight[")
    return {name.replace("router.weight", "router.layer.weight"): w}


def _nemotron_h(name: str, w: torch.Tensor) -> Matrices:
    """Nemotron-H's layers, stored under `backbone.`, its experts (not gated: up_proj, down_proj) one by one."""
    name = re.sub(r"^model\.", "backbone.", name)
    return {re.sub(r"experts\.(up_proj|down_proj)\[(\d+)\]$", r"experts.\2.\1.weight", name): w}


def _as_named(name: str, w: torch.Tensor) -> Matrices:
    return {name: w}


def _gpt_neox(name: str, w: torch.Tensor) -> Matrices:
    """GPT-NeoX's output head, which transformers names lm_head, stored as embed_out."""
    return {"embed_out.weight" if name == "lm_head.weight" else name: w}


ARCHITECTURES: dict[str, tuple[dict[str, object], Callable[[str, torch.Tensor], Matrices]]] = {
    # fused projections, each one linear map analysed whole: Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's
    # query_key_value
    "phi3": ({"num_key_value_heads": 2}, _as_named),
    "gpt_neox": ({}, _gpt_neox),
    # Conv1D (in × out) in GPT-2's first family
    "openai-gpt": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}, _as_named),
    # the head tied to the input embedding, stored once
    "gemma": ({"num_key_value_heads": 2, "head_dim": 16}, _as_named),
    # transformers' fused experts saved as the checkpoints store them: one tensor per expert and projection
    # (Mixtral's w1, w3, w2 and its router renamed), whole stacks under their published names (GraniteMoE's
    # input_linear, output_linear), E × in × out stacks (gpt-oss, whose experts transformers marks is_transposed,
    # and Llama 4, whose it does not; their experts 64 wide, as the hidden states, so that the family tells the
    # layout of the square down_proj, which the shape cannot)
    "mixtral": (EXPERTS, _stored_as_published),
    "granitemoe": (EXPERTS, _stored_whole),
    "gpt_oss": ({**EXPERTS, "intermediate_size": 64, "head_dim": 16,
                 "layer_types": ["full_attention", "sliding_attention"]}, _as_named),
    "llama4_text": ({**EXPERTS, "intermediate_size": 64, "head_dim": 16, "intermediate_size_mlp": 96}, _as_named),
    # GPT-2's Conv1D layers in another family, and heads named otherwise: predict_state, predict_action, predict_return
    "decision_transformer": ({"state_dim": 5, "act_dim": 3, "n_layer": 2, "n_head": 4, "n_inner": 96, "max_ep_len": 32,
                              "n_positions": 64}, _as_named),
    # RWKV: its time_mix_* (1 × 1 × hidden) mix tokens elementwise, no matrices
    "rwkv": ({"attention_hidden_size": 64, "context_length": 64}, _as_named),
    # state-space mixers: in_proj, x_proj, dt_proj and out_proj are all the mixer's linear maps
    "mamba": ({"state_size": 8, "expand": 2}, _as_named),
    "falcon_h1": ({"num_key_value_heads": 2, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                   "mamba_d_state": 8, "mamba_n_groups": 1}, _as_named),
    # a hybrid whose layers are all `mixer`s: Mamba's, attention's, a mixture of experts' (with its router, `gate`)
    "nemotron_h": ({"num_hidden_layers": 3, "layers_block_type": ["mamba", "moe", "attention"], "head_dim": 16,
                    "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 48, "moe_shared_expert_intermediate_size": 32, "mamba_num_heads": 4,
                    "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1}, _nemotron_h),
    # a hybrid layer's shared transformer block, mapped into its Mamba layer by a `linear` of its own
    "zamba2": ({"layers_block_type": ["mamba", "hybrid"], "mamba_d_state": 8, "mamba_headdim": 16, "n_mamba_heads": 8,
                "mamba_ngroups": 1, "num_key_value_heads": 4, "attention_head_dim": 16, "num_mem_blocks": 1,
                "use_shared_attention_adapter": False, "use_mem_rope": False}, _as_named),
    "lfm2": ({"layer_types": ["conv", "full_attention"], "num_key_value_heads": 2, "block_ff_dim": 96,
              "block_auto_adjust_ff_dim": False}, _as_named),
}


def _model(architecture: str, seed: int) -> torch.nn.Module:
    extra, _ = ARCHITECTURES[architecture]
    config = transformers.AutoConfig.for_model(architecture, **{**SMALL, **extra})
    torch.manual_seed(seed)
    if architecture == "decision_transformer":  # no language model
        return transformers.AutoModel.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def linear_maps(model: torch.nn.Module) -> Matrices:
    """Each linear map the model applies, out × in, in float64: nn.Linear's and nn.Embedding's weight, Conv1D's
    transposed, each expert's matrix of a fused stack (E × in × out where the experts compute x·W_e); a parameter tied
    to another once."""
    found: Matrices = {}
    seen: set[int] = set()
    for owner, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.ndim < 2:
                continue
            seen.add(id(p))
            w, full = p.detach().double(), f"{owner}.{name}" if owner else name
            kind = type(module).__name__
            if isinstance(module, transformers.pytorch_utils.Conv1D):
                found[full] = w.T
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or (name == "weight" and "Router" in kind):
                found[full] = w
            elif p.ndim == 3 and kind.endswith("Experts"):
                in_out = getattr(module, "is_transposed", kind == "Llama4TextExperts")  # Llama 4's x·W_e, unmarked
                found.update({f"{full}[{e}]": w[e].T if in_out else w[e] for e in range(len(w))})
    return found


def fine_tune(model: torch.nn.Module) -> None:
    """Every other matrix (each expert's on its own) gets a rank-2 update of new directions twice its norm, the others
    a small dense change."""
    g = torch.Generator().manual_seed(1)
    matrices = [m for p in dict.fromkeys(model.parameters()) if p.ndim >= 2 for m in (p.data if p.ndim == 3 else [p.data])]
    with torch.no_grad():
        for i, m in enumerate(matrices):
            w = m.double()
            if i % 2:
                delta = 1e-3 * w.std() * torch.randn(w.shape, generator=g, dtype=torch.float64)
            else:
                delta = torch.randn(len(w), 2, generator=g, dtype=torch.float64) @ torch.randn(
                    2, w.shape[1], generator=g, dtype=torch.float64)
                delta *= 2 * torch.linalg.matrix_norm(w, 2) / torch.linalg.matrix_norm(delta, 2)
            m.copy_(w + delta)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_linear_map_is_audited_as_the_layer_applies_it(tmp_path: Path, architecture: str) -> None:
    base, tuned = _model(architecture, 0), _model(architecture, 0)
    fine_tune(tuned)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--json", tmp_path / "r.json",
                          "--include", "embedding,head", "--device", "cpu", "--quiet")
    assert code in (0, 1), stderr
    report = json.loads((tmp_path / "r.json").read_text())
    stored = ARCHITECTURES[architecture][1]
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    b, t = linear_maps(base), linear_maps(tuned)
    for name in b:
        for (stored_name, w0), wt in zip(stored(name, b[name]).items(), stored(name, t[name]).values()):
            expected[stored_name] = (w0, wt)
    names = [m["name"] for m in report["matrices"]]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(expected)
    k, epsilon = report["settings"]["k"], report["settings"]["epsilon"]
    for matrix in report["matrices"]:
        w0, wt = expected[matrix["name"]]
        cosines = reference.max_cos(w0, wt, k)
        assert matrix["shape"] == list(wt.shape), matrix["name"]
        assert matrix["max_cos"] == pytest.approx(cosines, abs=1e-6), matrix["name"]
        assert matrix["intruders"] == sum(c < epsilon for c in cosines), matrix["name"]
    assert report["summary"]["intruder_dimensions"] >= len(expected) // 2
