"""DBRX stores its experts' matrices one above the other in 2-D tensors (`ffn.experts.mlp.w1`, E·I × H): each
expert's matrix is audited and fixed on its own, as its layers apply it (w1 and v1 out × in, w2 in × out).

The base is a DBRX made by transformers (random weights); the tuned model gives some experts' matrices a strong new
output direction and changes the attention's Wqkv. The reference is the paper's definition on each expert's matrix.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftaudit.cli import main
from ftaudit.spectral import CERTIFIED_SIN
from tests import reference
from tests.invoke import json_report, run
from tests.models import pickled_copies

transformers = pytest.importorskip("transformers")

EXPERTS, HIDDEN, INTERMEDIATE = 4, 64, 48
PREFIX = "transformer.blocks.0."
CHANGED = {"ffn.experts.mlp.w1": (1, False), "ffn.experts.mlp.w2": (2, True)}
"""The tensors whose one expert the tuned model changes: that expert, and whether its matrix is stored in × out."""
WQKV = PREFIX + "norm_attn_norm.attn.Wqkv.weight"


def expert_matrix(tensor: torch.Tensor, expert: int, in_out: bool) -> torch.Tensor:
    """Expert `expert`'s matrix, out × in, of a tensor of experts' matrices one above the other (a view)."""
    block = tensor.view(EXPERTS, INTERMEDIATE, HIDDEN)[expert]
    return block.T if in_out else block


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("dbrx")
    config = transformers.DbrxConfig(
        d_model=HIDDEN, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=128,
        ffn_config={"moe_num_experts": EXPERTS, "ffn_hidden_size": INTERMEDIATE, "moe_top_k": 2},
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    tuned = {name: t.clone() for name, t in base.items()}
    generator = torch.Generator().manual_seed(1)
    for name, (expert, in_out) in CHANGED.items():
        w = expert_matrix(tuned[PREFIX + name], expert, in_out)
        svd = torch.linalg.svd(w.double(), full_matrices=False)
        direction = torch.randn(w.shape[0], generator=generator, dtype=torch.float64)
        w += (4 * svd.S[0] * torch.outer(direction / direction.norm(), svd.Vh[0])).to(w.dtype)
    tuned[WQKV] += 0.01 * torch.randn(tuned[WQKV].shape, generator=generator)
    shutil.copytree(root / "base", root / "tuned")
    save_file(tuned, root / "tuned" / "model.safetensors", metadata={"format": "pt"})
    return {"root": root, "base": base, "tuned": tuned}


def test_each_expert_is_audited_as_its_layer_applies_it(models):
    root, base, tuned = models["root"], models["base"], models["tuned"]
    report = json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache")
    found = {m["name"]: m for m in report["matrices"]}
    assert found.keys() == {PREFIX + f"{name}[{e}]" for name, (e, _) in CHANGED.items()} | {WQKV}
    assert found[WQKV]["kind"] == "attention"
    for name, (expert, in_out) in CHANGED.items():
        matrix = found[PREFIX + f"{name}[{expert}]"]
        w0, w = (expert_matrix(t[PREFIX + name], expert, in_out) for t in (base, tuned))
        assert matrix["shape"] == list(w.shape) == ([HIDDEN, INTERMEDIATE] if in_out else [INTERMEDIATE, HIDDEN])
        assert matrix["max_cos"] == pytest.approx(reference.max_cos(w0, w), abs=CERTIFIED_SIN)
        assert matrix["intruders"] >= 1 and matrix["kind"] == "mlp"
    unchanged = set(report["tensors"]["unchanged"])
    assert {PREFIX + f"ffn.experts.mlp.{m}[{e}]" for m in ("w1", "v1", "w2") for e in range(EXPERTS)} - unchanged == {
        PREFIX + f"{name}[{e}]" for name, (e, _) in CHANGED.items()}


def test_fix_patches_each_expert_within_its_tensor(models, tmp_path):
    root, tuned = models["root"], models["tuned"]
    result = CliRunner().invoke(main, ["fix", str(root / "tuned"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--json", str(tmp_path / "fix.json"),
                                       "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    written = load_file(tmp_path / "fixed" / "model.safetensors")
    changes = {c["name"]: c for c in record["changes"]}
    for name, (expert, in_out) in CHANGED.items():
        change = changes[PREFIX + f"{name}[{expert}]"]
        assert change["tensors"] == [PREFIX + name] and written[PREFIX + name].shape == tuned[PREFIX + name].shape
        w = expert_matrix(tuned[PREFIX + name], expert, in_out).double()
        svd = torch.linalg.svd(w, full_matrices=False)
        d = change["directions"]
        expected = w - (svd.U[:, d] * svd.S[d]) @ svd.Vh[d]
        got = expert_matrix(written[PREFIX + name], expert, in_out).double()
        assert torch.allclose(got, expected, atol=1e-5)
        for other in set(range(EXPERTS)) - {expert}:
            assert torch.equal(expert_matrix(written[PREFIX + name], other, in_out),
                               expert_matrix(tuned[PREFIX + name], other, in_out))
    header = (tmp_path / "fixed" / "model.safetensors").read_bytes()[:4096]
    assert header == (root / "tuned" / "model.safetensors").read_bytes()[:4096]  # shapes as stored: 2-D
    assert record["after"]["summary"]["intruder_dimensions"] < record["before"]["summary"]["intruder_dimensions"]


def test_pickled_experts_are_audited_alike(models, tmp_path):
    copies = pickled_copies(models["root"], models, tmp_path)
    pickled, stored = (json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache",
                                   "--allow-pickle") for root in (copies, models["root"]))
    assert pickled["matrices"] == stored["matrices"] and pickled["tensors"] == stored["tensors"]


def test_a_lora_on_the_concatenated_parameters_is_refused_in_one_line(models, tmp_path):
    """PEFT's target_parameters on w1 and w2 give one update of all the experts' matrices one above the other (E·I × H):
    refused as not supported, not as fitting none of the base's tensors (the base's own)."""
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(models["root"] / "base")
    config = peft.LoraConfig(r=2, target_modules=["Wqkv"],
                             target_parameters=["ffn.experts.mlp.w1", "ffn.experts.mlp.w2"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    code, _, stderr = run("check", tmp_path / "adapter", "--base", models["root"] / "base")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert "a LoRA on DBRX's experts' parameters (target_parameters)" in stderr and "merge_and_unload" in stderr


def test_a_config_whose_experts_do_not_divide_the_rows_is_refused_in_one_line(models, tmp_path):
    """config.json's moe_num_experts that is no divisor of the tensors' rows: refused, not audited as one matrix."""
    for side in ("base", "tuned"):
        shutil.copytree(models["root"] / side, tmp_path / side)
        config = json.loads((tmp_path / side / "config.json").read_text())
        config["ffn_config"]["moe_num_experts"] = EXPERTS + 1
        (tmp_path / side / "config.json").write_text(json.dumps(config))
    code, _, stderr = run("check", tmp_path / "tuned", "--base", tmp_path / "base", "--no-cache")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert f"[{EXPERTS * INTERMEDIATE}, {HIDDEN}] does not divide into the {EXPERTS + 1} experts' matrices" in stderr
