"""Experts stacked in one 3-D tensor are audited and fixed one expert's matrix at a time, as the layer applies it.

The models are mixtures of experts made by transformers (random weights): a Llama 4, a gpt-oss and an Aria,
whose stacks are stored E × in × out, and a GraniteMoE, whose stacks are stored E × out × in; the last two
store them under other names than their layers use (input_linear, fc1 for experts.gate_up_proj). The tuned models change
some experts by hand and leave the others as the base has them. The reference is the paper's
definition on each expert's out × in matrix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftaudit.cli import main
from ftaudit.layout import Layout
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.local import LocalStorage
from ftaudit.spectral import CERTIFIED_SIN
from tests import reference
from tests.invoke import json_report
from tests.models import pickled_copies

transformers = pytest.importorskip("transformers")

EXPERTS = 4
CHANGED = (1, 3)
"""The experts the tuned models change; the others are left as the base has them."""


COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_local_experts": EXPERTS, "vocab_size": 128}
FAMILIES = {
    # name: (model class, its config's other settings, the stacks' names, whether they are stored E × in × out)
    "llama4": ("Llama4ForCausalLM", {"intermediate_size_mlp": 128, "head_dim": 16, "interleave_moe_layer_step": 1},
               [f"model.layers.0.feed_forward.experts.{m}" for m in ("gate_up_proj", "down_proj")], True),
    "gpt_oss": ("GptOssForCausalLM", {"head_dim": 16, "layer_types": ["full_attention"]},
                [f"model.layers.0.mlp.experts.{m}" for m in ("gate_up_proj", "down_proj")], True),
    "granite": ("GraniteMoeForCausalLM", {"num_experts_per_tok": 2},
                [f"model.layers.0.block_sparse_moe.{m}.weight" for m in ("input_linear", "output_linear")], False),
    "aria": ("AriaTextForCausalLM", {"moe_num_experts": EXPERTS, "moe_topk": 2, "moe_num_shared_experts": 1},
             [f"model.layers.0.mlp.experts.{m}.weight" for m in ("fc1", "fc2")], True),
}


LAYERS_NAMES = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
                "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
                "experts.fc1.weight": "experts.gate_up_proj", "experts.fc2.weight": "experts.down_proj"}
"""The stacks that GraniteMoE's and Aria's checkpoints store under other names than their layers use."""


def layers_name(stored: str) -> str:
    """The name transformers' layers give stack `stored` of a checkpoint."""
    return next((stored.replace(a, b) for a, b in LAYERS_NAMES.items() if stored.endswith(a)), stored)


def mixture_of_experts(family: str, folder: Path) -> dict[str, bool]:
    """A model of `family` saved to `folder`; its stacks, each with whether it is stored in × out."""
    model_class, settings, stacks, in_out = FAMILIES[family]
    model = getattr(transformers, model_class)
    model(model.config_class(**COMMON, **settings)).save_pretrained(folder)
    return dict.fromkeys(stacks, in_out)


def analysed(stored: torch.Tensor, in_out: bool) -> torch.Tensor:
    """An expert's matrix out × in."""
    return stored.T if in_out else stored


@pytest.fixture(scope="module", params=list(FAMILIES))
def models(request, tmp_path_factory) -> dict[str, object]:
    """The base, and a full fine-tune whose changed experts each gain a strong new output direction read from the
    matrix's top input direction: an intruder of the out × in matrix, which the in × out one does not show."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    stacks = mixture_of_experts(request.param, root / "base")
    base = load_file(root / "base" / "model.safetensors")
    shutil.copytree(root / "base", root / "tuned")
    tuned = with_intruders(base, stacks)
    save_file(tuned, root / "tuned" / "model.safetensors", metadata={"format": "pt"})
    return {"root": root, "stacks": stacks, "base": base, "tuned": tuned}


def with_intruders(base: dict[str, torch.Tensor], stacks: dict[str, bool]) -> dict[str, torch.Tensor]:
    """`base` with the CHANGED experts' matrices of `stacks` (each stored in × out or not) given an intruder."""
    tuned = dict(base)
    generator = torch.Generator().manual_seed(1)
    for name, in_out in stacks.items():
        stack = base[name].clone()
        for e in CHANGED:
            w = analysed(stack[e], in_out)
            svd = torch.linalg.svd(w.double(), full_matrices=False)
            out_dir = torch.randn(w.shape[0], generator=generator, dtype=torch.float64)
            w += (4 * svd.S[0] * torch.outer(out_dir / out_dir.norm(), svd.Vh[0])).to(w.dtype)
        tuned[name] = stack
    return tuned


def test_each_expert_is_audited_out_by_in(models):
    root, base, tuned = models["root"], models["base"], models["tuned"]
    report = json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache")
    found = {m["name"]: m for m in report["matrices"]}
    for name, in_out in models["stacks"].items():
        assert [f"{name}[{e}]" for e in range(EXPERTS) if e not in CHANGED] == [
            n for n in report["tensors"]["unchanged"] if n.startswith(name)]
        for e in CHANGED:
            matrix = found[f"{name}[{e}]"]
            w0, w = analysed(base[name][e], in_out), analysed(tuned[name][e], in_out)
            assert matrix["shape"] == list(w.shape) and matrix["kind"] == "mlp" and matrix["layer"] == 0
            assert matrix["max_cos"] == pytest.approx(reference.max_cos(w0, w), abs=CERTIFIED_SIN)
            assert matrix["max_cos"][0] < 0.5 and matrix["intruders"] >= 1
            if in_out:  # as stored, the top left vector is the base's own: no intruder would show
                assert reference.max_cos(w0.T, w.T)[0] > 0.9
    assert not any(n.startswith(tuple(models["stacks"])) for n in report["tensors"]["missing_in_model"])
    assert not any("bias" in n for n in [*found, *report["tensors"]["unchanged"]])  # gpt-oss's E × out biases


def test_fix_scales_each_expert_and_writes_the_stack_back(models, tmp_path):
    root, base, tuned = models["root"], models["base"], models["tuned"]
    result = CliRunner().invoke(main, ["fix", str(root / "tuned"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--json", str(tmp_path / "fix.json"),
                                       "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    written = load_file(tmp_path / "fixed" / "model.safetensors")
    changes = {c["name"]: c for c in record["changes"]}
    for name, in_out in models["stacks"].items():
        assert written[name].shape == tuned[name].shape and written[name].dtype == tuned[name].dtype
        for e in range(EXPERTS):
            if e not in CHANGED:
                assert torch.equal(written[name][e], tuned[name][e])
                continue
            change = changes[f"{name}[{e}]"]
            assert change["tensors"] == [name]
            w = analysed(tuned[name][e], in_out).double()
            svd = torch.linalg.svd(w, full_matrices=False)
            new = analysed(written[name][e], in_out).double()
            left = torch.linalg.norm(svd.U[:, change["directions"]].T @ new, dim=1) / svd.S[change["directions"]]
            assert left.max().item() < 1e-5  # each intruder's output direction is gone
            kept = svd.U[:, 10:]
            assert torch.allclose(kept.T @ new, kept.T @ w, atol=1e-5)  # the rest is untouched
    assert {n for n in written if n not in models["stacks"]} == set(base)- set(models["stacks"])
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fixed")  # the stacks load as the layers hold them
    assert record["after"]["summary"]["intruder_dimensions"] < record["before"]["summary"]["intruder_dimensions"]


class CountingStorage(LocalStorage):
    """A folder whose reads are counted in bytes."""

    read_bytes = 0

    def read(self, name: str, start: int, length: int) -> bytearray:
        self.read_bytes += length
        return super().read(name, start, length)


def test_an_expert_is_read_alone(models):
    root, tuned = models["root"], models["tuned"]
    storage = CountingStorage(root / "tuned")
    checkpoint = Checkpoint(storage, ["model.safetensors"])
    for name in models["stacks"]:
        for e in range(EXPERTS):
            before = storage.read_bytes
            assert torch.equal(checkpoint.load(name, e), tuned[name][e])
            assert storage.read_bytes - before == tuned[name][e].numel() * tuned[name].element_size()


def test_pickled_stacks_are_audited_alike(models, tmp_path):
    copies = pickled_copies(models["root"], models, tmp_path)
    pickled, stored = (json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache",
                                   "--allow-pickle") for root in (copies, models["root"]))
    assert pickled["matrices"] == stored["matrices"] and pickled["tensors"] == stored["tensors"]


def test_one_expert_is_excluded_by_its_name_in_the_report(models, tmp_path):
    """`--exclude 'stack[e]'` leaves that expert's matrix out of the audit and out of the fix; the others are kept."""
    root, tuned = models["root"], models["tuned"]
    stack, left_out = next(iter(models["stacks"])), CHANGED[0]
    excluded = f"{stack}[{left_out}]"
    report = json_report("check", root / "tuned", "--base", root / "base", "--exclude", excluded, "--format", "json",
                 "--no-cache")
    names = {m["name"] for m in report["matrices"]}
    assert excluded not in names and f"{stack}[{CHANGED[1]}]" in names
    result = CliRunner().invoke(main, ["fix", str(root / "tuned"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--exclude", excluded, "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    written = load_file(tmp_path / "fixed" / "model.safetensors")
    assert torch.equal(written[stack][left_out], tuned[stack][left_out])
    assert not torch.equal(written[stack][CHANGED[1]], tuned[stack][CHANGED[1]])


def test_a_fine_tune_saved_in_the_layers_form_is_audited_as_published(models, tmp_path):
    """transformers' save_original_format=False writes the stacks (and GraniteMoE's router) as the layers name them:
    each expert's matrix is still paired with the base's, and the fix writes it back there."""
    root = models["root"]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "tuned")
    model.save_pretrained(tmp_path / "layers-form", save_original_format=False)
    published = json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache")
    report = json_report("check", tmp_path / "layers-form", "--base", root / "base", "--format", "json", "--no-cache")
    assert report["matrices"] == published["matrices"] and report["tensors"] == published["tensors"]
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "layers-form"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    written, given = (load_file(tmp_path / f / "model.safetensors") for f in ("fixed", "layers-form"))
    assert written.keys() == given.keys()
    changed = {layers_name(n) for n in models["stacks"]}
    assert changed <= written.keys() and all(not torch.equal(written[n], given[n]) for n in changed)
    refixed = json_report("check", tmp_path / "fixed", "--base", root / "base", "--format", "json", "--no-cache")
    assert refixed["summary"]["intruder_dimensions"] < published["summary"]["intruder_dimensions"]


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory) -> dict[str, object]:
    """A PEFT LoRA on the base's stacks as the layers name them (target_parameters), and its merged model."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapter")
    model = transformers.AutoModelForCausalLM.from_pretrained(models["root"] / "base")
    runtime = [n for n, p in model.named_parameters() if p.ndim == 3]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                             target_parameters=[n.split("layers.0.")[1] for n in runtime])
    torch.manual_seed(3)
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(30.0)  # an update strong enough to bring intruders
    adapted.save_pretrained(root / "adapter")
    adapted.merge_and_unload().save_pretrained(root / "merged")
    return {"root": root}


def test_a_lora_on_stacked_experts_is_audited_as_its_merged_model(models, adapter):
    """Where the checkpoint stores the stacks under other names than the layers use (GraniteMoE's input_linear for
    experts.gate_up_proj), the adapter's are found under those."""
    root, base = adapter["root"], models["root"] / "base"
    merged = json_report("check", root / "merged", "--base", base, "--format", "json", "--no-cache")
    from_adapter = json_report("check", root / "adapter", "--base", base, "--format", "json", "--no-cache")
    assert {m["name"] for m in merged["matrices"]} == {f"{n}[{e}]" for n in models["stacks"] for e in range(EXPERTS)}
    reference.assert_audited_as_merged(from_adapter, merged, rank=2, alpha=4.0)


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_fix_of_a_lora_on_stacked_experts(models, adapter, tmp_path, merge):
    """Each flagged expert's update is patched: in PEFT's interleaved factors (cut back to their rank), or merged."""
    root, base = adapter["root"], models["root"] / "base"
    args = ["fix", str(root / "adapter"), "--base", str(base), "--out", str(tmp_path / "fixed"), "--lambda", "0",
            "--json", str(tmp_path / "fix.json"), "--no-cache", *(["--merge"] if merge else [])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1), result.stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    if merge:
        fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    else:  # merged by PEFT and saved under the checkpoint's names
        peft = pytest.importorskip("peft")
        model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                               tmp_path / "fixed")
        model.merge_and_unload().save_pretrained(tmp_path / "fixed-merged")
        fixed = load_file(tmp_path / "fixed-merged" / "model.safetensors")
    merged, original = load_file(root / "merged" / "model.safetensors"), models["base"]
    changes = {c["name"]: c for c in record["changes"]}
    assert changes and record["after"]["summary"]["intruder_dimensions"] < record["before"]["summary"][
        "intruder_dimensions"]
    for name, in_out in models["stacks"].items():
        for e in range(EXPERTS):
            w0, w = analysed(original[name][e], in_out).double(), analysed(merged[name][e], in_out).double()
            written = analysed(fixed[name][e], in_out).double()
            change = changes.get(f"{name}[{e}]")
            if change is None:  # an expert without intruders keeps its update
                assert torch.allclose(written, w, atol=1e-6)
                continue
            svd = torch.linalg.svd(w, full_matrices=False)
            u, v, sigma = svd.U[:, change["directions"]], svd.Vh[change["directions"]], svd.S[change["directions"]]
            patched_update = w - (u * sigma) @ v - w0
            error = torch.linalg.norm(written - w0 - patched_update) / torch.linalg.norm(patched_update)
            assert error.item() == pytest.approx(change["truncation_error"] or 0.0, abs=1e-4)
            assert error.item() < 0.9


def test_an_adapter_that_saves_an_experts_module_whole_is_audited_and_fixed(models, tmp_path):
    """PEFT's modules_to_save of an experts module stores its stacks whole, replacing the base's: each expert is
    audited as the full fine-tune's is, and fixed within the adapter's stack."""
    peft = pytest.importorskip("peft")
    root, stacks, tuned = models["root"], models["stacks"], models["tuned"]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "tuned")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["experts"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")  # the tuned stacks; ΔW = 0 on q_proj
    report = json_report("check", tmp_path / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    full = json_report("check", root / "tuned", "--base", root / "base", "--format", "json", "--no-cache")
    assert report["matrices"] == full["matrices"]
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "adapter"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    written = load_file(tmp_path / "fixed" / "adapter_model.safetensors")
    for name in stacks:  # saved as the layers name it
        stack = written[f"base_model.model.{layers_name(name)}"]
        kept = [e for e in range(EXPERTS) if torch.equal(stack[e], tuned[name][e])]
        assert kept == [e for e in range(EXPERTS) if e not in CHANGED]


def test_a_stack_of_single_input_matrices_stored_in_by_out_is_audited(tmp_path):
    """An E × 1 × out stack of an in × out family (a selected 3-D tensor that is no real experts' stack) is analysed
    as E matrices out × 1: the transposed matrix is a copy of standard strides, which can be hashed for the cache."""
    name = "model.layers.0.self_attn.kernel.weight"
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(2, 1, 3, generator=generator)}
    tuned = {name: base[name] + torch.randn(2, 1, 3, generator=generator)}
    for side, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
        (tmp_path / side / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    report = json_report("check", tmp_path / "tuned", "--base", tmp_path / "base", "--format", "json")
    assert [(m["name"], m["shape"]) for m in report["matrices"]] == [(f"{name}[{e}]", [3, 1]) for e in range(2)]


def test_a_family_saved_both_ways_is_read_from_the_shapes(tmp_path):
    """Qwen3-VL-MoE's published checkpoints store their stacks E × in × out, and transformers 5 saves them
    E × out × in: a fine-tune saved by transformers is audited against the published base expert by expert, out × in,
    from the shapes and the hidden width, and fixed in its own layout."""
    config = transformers.Qwen3VLMoeConfig(
        text_config={"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": EXPERTS,
                     "num_experts_per_tok": 2, "vocab_size": 128,
                     "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "deepstack_visual_indexes": []})
    torch.manual_seed(0)
    transformers.Qwen3VLMoeForConditionalGeneration(config).save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    stacks = dict.fromkeys((n for n in saved if n.endswith(("experts.gate_up_proj", "experts.down_proj"))), False)
    assert {saved[n].shape[1:] for n in stacks} == {(96, 64), (64, 48)}  # out × in, as transformers saves them
    shutil.copytree(tmp_path / "saved", tmp_path / "published")
    published = {n: t.transpose(1, 2).contiguous() if n in stacks else t for n, t in saved.items()}
    save_file(published, tmp_path / "published" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(tmp_path / "saved", tmp_path / "tuned")
    tuned = with_intruders(saved, stacks)
    save_file(tuned, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    report = json_report("check", tmp_path / "tuned", "--base", tmp_path / "published",
                         "--format", "json", "--no-cache")
    found = {m["name"]: m for m in report["matrices"]}
    assert set(found) == {f"{n}[{e}]" for n in stacks for e in CHANGED} and not report["tensors"]["shape_mismatch"]
    for name in stacks:
        assert [n for n in report["tensors"]["unchanged"] if n.startswith(name)] == [
            f"{name}[{e}]" for e in range(EXPERTS) if e not in CHANGED]
        for e in CHANGED:
            assert found[f"{name}[{e}]"]["shape"] == list(tuned[name][e].shape)
            expected = reference.max_cos(published[name][e].T, tuned[name][e])
            assert found[f"{name}[{e}]"]["max_cos"] == pytest.approx(expected, abs=CERTIFIED_SIN)
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "tuned"), "--base", str(tmp_path / "published"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    assert all(fixed[n].shape == tuned[n].shape and not torch.equal(fixed[n], tuned[n]) for n in stacks)
    transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "fixed")

    # A LoRA on the stacks of the model loaded from the published base holds each expert's ΔW as the layers hold it
    peft = pytest.importorskip("peft")
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "published")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(3)
    adapted = peft.get_peft_model(model, lora)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    from_adapter = json_report("check", tmp_path / "adapter", "--base", tmp_path / "published", "--format", "json",
                       "--no-cache")
    merged = json_report("check", tmp_path / "merged", "--base", tmp_path / "published",
                         "--format", "json", "--no-cache")
    assert len(from_adapter["matrices"]) == len(merged["matrices"]) == 2 * EXPERTS
    for ours, theirs in zip(from_adapter["matrices"], merged["matrices"]):
        assert ours["name"] == theirs["name"] and ours["shape"] == theirs["shape"]
        assert ours["max_cos"] == pytest.approx(theirs["max_cos"], abs=2 * CERTIFIED_SIN)


def test_a_stacks_layout_is_read_from_its_shape_where_that_tells():
    layout = Layout(hidden_size=64)
    assert layout.transposed("mlp.experts.gate_up_proj", (4, 64, 192))  # hidden → 2I: in × out
    assert not layout.transposed("mlp.experts.gate_up_proj", (4, 192, 64))
    assert layout.transposed("mlp.experts.down_proj", (4, 96, 64))  # I → hidden: in × out
    assert not layout.transposed("block_sparse_moe.output_linear.weight", (4, 64, 96))
    assert not layout.transposed("mlp.experts.down_proj", (4, 64, 64))  # square: the family says
    assert Layout(experts_in_out=True, hidden_size=64).transposed("mlp.experts.down_proj", (4, 64, 64))
    assert not layout.transposed("mlp.experts.mixer", (4, 64, 96))  # the name does not say which projection
    assert Layout(experts_in_out=True).transposed("mlp.experts.gate_up_proj", (4, 192, 64))  # no width: the family


def test_a_parameter_targeted_in_several_layers_is_audited_in_each(models, tmp_path):
    """target_parameters that name one parameter of several layers ("0.mlp.experts.gate_up_proj",
    "1.mlp.experts.gate_up_proj") adapt each of those layers' stacks."""
    peft = pytest.importorskip("peft")
    root = models["root"]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    layers = next(n for n, p in model.named_parameters() if p.ndim == 3 and n.endswith("gate_up_proj"))
    stack = next(n for n in models["stacks"] if layers_name(n).endswith("gate_up_proj"))
    targets = [f"{i}.{layers.partition('layers.0.')[2]}" for i in (0, 1)]
    config = peft.LoraConfig(r=2, target_modules=[], init_lora_weights=False, target_parameters=targets)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    from_adapter = json_report("check", tmp_path / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    merged = json_report("check", tmp_path / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    assert [m["name"] for m in from_adapter["matrices"]] == [f"{stack}[{e}]" for e in range(EXPERTS)]
    for ours, theirs in zip(from_adapter["matrices"], merged["matrices"], strict=True):
        assert ours["max_cos"] == pytest.approx(theirs["max_cos"], abs=2 * CERTIFIED_SIN)


def test_rank_and_alpha_patterns_of_one_parameter(models, tmp_path):
    """PEFT gives each parameter the rank and alpha its patterns match: the factors of one module's two stacks may
    differ in rank, and each pair is read with its own."""
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(models["root"] / "base")
    runtime = [n for n, p in model.named_parameters() if p.ndim == 3]
    down = next(n.rpartition(".")[2] for n in runtime if "down" in n)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=False,
                             target_parameters=[n.split("layers.0.")[1] for n in runtime],
                             rank_pattern={down: 3}, alpha_pattern={down: 9})
    torch.manual_seed(4)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    base = models["root"] / "base"
    merged = json_report("check", tmp_path / "merged", "--base", base, "--format", "json", "--no-cache")
    from_adapter = json_report("check", tmp_path / "adapter", "--base", base, "--format", "json", "--no-cache")
    by_name = {m["name"]: m for m in merged["matrices"]}
    for matrix in from_adapter["matrices"]:
        rank, alpha = (3, 9.0) if "down" in layers_name(matrix["name"].partition("[")[0]) else (2, 4.0)
        assert matrix["lora"] == {"rank": rank, "alpha": alpha, "scaling": alpha / rank}
        assert matrix["indicators"]["numerical_rank"] == by_name[matrix["name"]]["indicators"]["numerical_rank"] == rank
        assert matrix["max_cos"] == pytest.approx(by_name[matrix["name"]]["max_cos"], abs=2 * CERTIFIED_SIN)
    assert from_adapter["model"]["adapter"]["r"] == [2, 3]


def test_a_lora_on_stacks_with_an_invalid_rank_is_refused(models, adapter, tmp_path):
    shutil.copytree(adapter["root"] / "adapter", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": "two"}))
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(models["root"] / "base")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"ftaudit: error: {tmp_path / 'adapter'}/adapter_config.json: the rank of ")
    assert result.stderr.endswith(" must be a positive integer (got 'two')\n")
