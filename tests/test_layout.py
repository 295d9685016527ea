"""GPT-2's Conv1D layers store W in × out: their matrices are audited and fixed as the layer applies them.

The models are GPT-2s made by transformers (random weights, 512 wide, so that an adapter's matrices
take the factor route of ftaudit/low_rank.py), fine-tuned by hand and by a real PEFT LoRA adapter
(fan_in_fan_out, as PEFT sets it for GPT-2). The reference is the paper's definition on Wᵀ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ftaudit.cli import main
from ftaudit.base import Architecture
from ftaudit.layout import Layout
from ftaudit.spectral import CERTIFIED_SIN
from tests import reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2(folder: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=512, n_layer=1, n_head=8)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return model


def run(*args: object) -> tuple[int, dict, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.stderr
    return result.exit_code, json.loads(result.stdout), result.stderr


def fix(model: Path, base: Path, tmp_path: Path) -> dict:
    """`ftaudit fix --lambda 0` into tmp_path/fixed; its JSON record."""
    result = CliRunner().invoke(main, ["fix", str(model), "--base", str(base), "--out", str(tmp_path / "fixed"),
                                       "--lambda", "0", "--json", str(tmp_path / "fix.json"), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    return json.loads((tmp_path / "fix.json").read_text())


def conv1d_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each Conv1D weight as stored (in × out), by its name in the checkpoint."""
    state = model.state_dict()
    return {f"transformer.h.0.{m}.weight": state[f"transformer.h.0.{m}.weight"].detach().clone() for m in CONV1D}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("gpt2")
    base_model = gpt2(root / "base")
    base = conv1d_weights(base_model)
    tuned_model = gpt2(root / "tuned")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned_model.named_parameters():
            if name in base:
                # A strong new output direction read from the base's top input direction: an intruder of
                # Wᵀ (out × in), while the stored matrix's top left vector stays the base's own.
                param.copy_(base[name])
                in_dir = torch.linalg.svd(base[name].double(), full_matrices=False).U[:, 0].float()
                out_dir = torch.randn(param.shape[1], generator=generator)
                param += 4.0 * torch.outer(in_dir, out_dir / out_dir.norm())
    tuned_model.save_pretrained(root / "tuned")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
                           fan_in_fan_out=True)
    torch.manual_seed(2)
    adapted = peft.get_peft_model(gpt2(root / "unused"), lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(40.0)  # an update strong enough to bring intruders
    adapted.save_pretrained(root / "adapter")
    merged = conv1d_weights(adapted.merge_and_unload())
    return {"root": root, "base": base, "tuned": conv1d_weights(tuned_model), "merged": merged}


def test_conv1d_names():
    gpt2, other = Layout.of(Architecture(), Architecture("gpt2")), Layout.of(Architecture("llama"), Architecture("gpt2"))
    assert gpt2.transposed("transformer.h.3.attn.c_attn.weight", (512, 1536))
    assert gpt2.transposed("h.0.mlp.c_proj.weight", (2048, 512))
    assert not gpt2.transposed("h.0.mlp.c_proj.bias", (512,))
    assert not gpt2.transposed("transformer.wte.weight", (96, 512))
    assert not other.transposed("model.layers.0.mlp.c_fc.weight", (512, 2048))  # the tuned side's type comes first


def test_dbrx_experts_one_above_the_other_are_read_as_stacks():
    dbrx = Layout.of(Architecture("dbrx", 64, 4))
    assert dbrx.stacked_shape("transformer.blocks.0.ffn.experts.mlp.w2", (192, 64)) == (4, 48, 64)
    assert dbrx.transposed("transformer.blocks.0.ffn.experts.mlp.w2", (4, 48, 64))  # x·W_e: in × out
    assert not dbrx.transposed("transformer.blocks.0.ffn.experts.mlp.v1", (4, 48, 64))
    assert dbrx.stacked_shape("transformer.blocks.0.ffn.experts.mlp.w1", (190, 64)) is None  # not E row blocks
    assert dbrx.stacked_shape("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight", (192, 64)) is None
    assert Layout.of(Architecture("llama", 64, 4)).stacked_shape("ffn.experts.mlp.w1", (192, 64)) is None


def test_dbrx_w2_is_in_out_where_its_experts_matrices_are_square():
    """ffn_hidden_size = d_model: the shapes cannot tell, DBRX's layers apply w2 as x·W_e all the same."""
    dbrx = Layout.of(Architecture("dbrx", 64, 4))
    assert dbrx.transposed("transformer.blocks.0.ffn.experts.mlp.w2", (4, 64, 64))
    assert not dbrx.transposed("transformer.blocks.0.ffn.experts.mlp.w1", (4, 64, 64))


@pytest.mark.parametrize("side", ["tuned", "adapter"])
def test_conv1d_matrices_are_audited_out_by_in(models, side):
    root, base = models["root"], models["base"]
    tuned = models["tuned" if side == "tuned" else "merged"]
    _, report, _ = run("check", root / side, "--base", root / "base", "--format", "json", "--no-cache")
    found = {m["name"]: m for m in report["matrices"]}
    assert set(found) == set(tuned)
    for name, w in tuned.items():
        inputs, outputs = w.shape
        assert found[name]["shape"] == [outputs, inputs]
        expected = reference.max_cos(base[name].T, w.T)
        assert found[name]["max_cos"] == pytest.approx(expected, abs=CERTIFIED_SIN), name
        if side == "tuned":  # the stored matrix's left vectors (the layer's inputs) would show no intruder
            assert found[name]["max_cos"][0] < 0.5 < reference.max_cos(base[name], w)[0], name
    assert report["summary"]["intruder_dimensions"] >= len(tuned)


def test_fix_scales_the_output_directions_and_writes_them_back_in_by_out(models, tmp_path):
    root, tuned = models["root"], models["tuned"]
    record = fix(root / "tuned", root / "base", tmp_path)
    written = load_file(tmp_path / "fixed" / "model.safetensors")
    assert {c["name"] for c in record["changes"]} == set(tuned)
    for c in record["changes"]:
        w = tuned[c["name"]].double().T  # out × in
        svd = torch.linalg.svd(w, full_matrices=False)
        u = svd.U[:, c["directions"]]
        new = written[c["name"]].double()
        assert new.shape == tuned[c["name"]].shape
        left = torch.linalg.norm(u.T @ new.T, dim=1) / svd.S[c["directions"]]
        assert left.max().item() < 1e-5, c["name"]  # each intruder's output direction is gone
        kept = svd.U[:, 10:]  # directions below the top k are untouched
        assert torch.allclose(kept.T @ new.T, kept.T @ w, atol=1e-5)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fixed")
    for name in tuned:
        assert torch.equal(loaded.state_dict()[name], written[name])
    assert record["after"]["summary"]["intruder_dimensions"] < record["before"]["summary"]["intruder_dimensions"]


def test_adapter_fix_keeps_peft_layout_and_holds_the_patch(models, tmp_path):
    root, base, merged = models["root"], models["base"], models["merged"]
    record = fix(root / "adapter", root / "base", tmp_path)
    assert record["changes"]
    model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(root / "base"),
                                           tmp_path / "fixed")
    fixed = conv1d_weights(model.merge_and_unload())
    for c in record["changes"]:
        name = c["name"]
        w = merged[name].double().T
        svd = torch.linalg.svd(w, full_matrices=False)
        u, v, sigma = svd.U[:, c["directions"]], svd.Vh[c["directions"]], svd.S[c["directions"]]
        patched_update = w - (u * sigma) @ v - base[name].double().T
        written_update = fixed[name].double().T - base[name].double().T
        error = torch.linalg.norm(written_update - patched_update) / torch.linalg.norm(patched_update)
        assert error.item() == pytest.approx(c["truncation_error"], abs=1e-4), name
        assert error.item() < 0.9
