"""A LoRA on the experts' stacks of a model whose checkpoint stores them expert by expert; and a model saved
with the stacks (transformers' save_original_format=False) against its base stored expert by expert.

transformers 5 fuses Qwen3-MoE's `experts.{e}.gate_proj`/`up_proj`/`down_proj` (Mixtral's
`block_sparse_moe.experts.{e}.w1`/`w3`/`w2`, Nemotron-H's `backbone.….mixer.experts.{e}.up_proj`/
`down_proj`) into stacks as it loads them, and PEFT's target_parameters adapt the stacks. The adapter
is audited, and fixed, on the checkpoint's own matrices, as the model PEFT merges and transformers
saves is.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftaudit.cli import main
from tests import reference
from tests.invoke import json_report

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERTS = 4
LAYERS = 2
"""Layers with experts, the first ones of each model."""
SHAPES = {"hidden_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 128}
FAMILIES = {
    # name: (config class, its other settings, a layer's stored names, expert 0's parts of each stack, the stacks)
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": EXPERTS,
                                     "num_experts_per_tok": 2, "head_dim": 16},
                  "model.layers.{layer}.mlp.experts",
                  (["0.gate_proj.weight", "0.up_proj.weight"], ["0.down_proj.weight"]),
                  ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "mixtral": ("MixtralConfig", {"intermediate_size": 48, "num_local_experts": EXPERTS, "num_experts_per_tok": 2},
                "model.layers.{layer}.block_sparse_moe.experts",
                (["0.w1.weight", "0.w3.weight"], ["0.w2.weight"]),
                ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "nemotron_h": ("NemotronHConfig", {"num_hidden_layers": LAYERS + 1, "layers_block_type": ["moe", "moe", "attention"],
                                       "head_dim": 16, "n_routed_experts": EXPERTS, "num_experts_per_tok": 2,
                                       "moe_intermediate_size": 48, "moe_shared_expert_intermediate_size": 32,
                                       "intermediate_size": 96, "mamba_num_heads": 4, "mamba_head_dim": 16,
                                       "ssm_state_size": 16, "n_groups": 1},
                   "backbone.layers.{layer}.mixer.experts",
                   (["0.up_proj.weight"], ["0.down_proj.weight"]),
                   ["mixer.experts.up_proj", "mixer.experts.down_proj"]),
}


def parts(family: str, layer: int, expert: int) -> list[list[str]]:
    """The checkpoint's names of the parts of expert `expert`'s matrix of each stack in layer `layer`."""
    _, _, owner, first, _ = FAMILIES[family]
    return [[f"{owner.format(layer=layer)}.{expert}.{n[2:]}" for n in names] for names in first]


def all_parts(family: str) -> set[str]:
    return {n for layer in range(LAYERS) for e in range(EXPERTS) for names in parts(family, layer, e) for n in names}


@pytest.fixture(scope="module", params=list(FAMILIES))
def models(request, tmp_path_factory) -> dict[str, object]:
    """The base as transformers saves it (expert by expert), a PEFT LoRA on its stacks and q_proj with an update
    strong enough to bring intruders, and the model PEFT merges and transformers saves."""
    root = tmp_path_factory.mktemp(request.param)
    config_class, settings, _, _, targets = FAMILIES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SHAPES, **settings})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    model.save_pretrained(root / "base-layers-form", save_original_format=False)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets,
                           init_lora_weights=False)
    adapted = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(30.0)
    adapted.save_pretrained(root / "adapter")
    merged = adapted.merge_and_unload()
    merged.save_pretrained(root / "merged")
    merged.save_pretrained(root / "merged-layers-form", save_original_format=False)
    return {"family": request.param, "root": root}


def test_the_base_stores_each_experts_parts(models):
    stored = load_file(models["root"] / "base" / "model.safetensors")
    assert all_parts(models["family"]) <= stored.keys()
    assert not any(t.ndim == 3 for t in stored.values())


def test_the_adapter_is_audited_as_its_merged_model(models):
    root = models["root"]
    from_adapter = json_report("check", root / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    merged = json_report("check", root / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    names = {m["name"] for m in merged["matrices"]}
    assert all_parts(models["family"]) <= names and any(n.endswith("q_proj.weight") for n in names)
    reference.assert_audited_as_merged(from_adapter, merged, rank=2, alpha=4.0)
    assert from_adapter["tensors"]["unchanged"] == merged["tensors"]["unchanged"]


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_fix_patches_each_experts_parts(models, tmp_path, merge):
    """Each flagged part is patched; in the adapter, the parts of one expert share its factors, so their patches are
    cut back to the rank together, with the error reported for each."""
    root = models["root"]
    args = ["fix", root / "adapter", "--base", root / "base", "--out", tmp_path / "fixed", "--lambda", "0",
            "--json", tmp_path / "fix.json", "--no-cache", *(["--merge"] if merge else [])]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    if merge:
        fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    else:
        base_model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        peft.PeftModel.from_pretrained(base_model, tmp_path / "fixed").merge_and_unload().save_pretrained(
            tmp_path / "fixed-merged")
        fixed = load_file(tmp_path / "fixed-merged" / "model.safetensors")
    base, merged = load_file(root / "base" / "model.safetensors"), load_file(root / "merged" / "model.safetensors")
    changes = {c["name"]: c for c in record["changes"]}
    assert record["after"]["summary"]["intruder_dimensions"] < record["before"]["summary"]["intruder_dimensions"]
    assert any(".experts." in name for name in changes)
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            for names in parts(models["family"], layer, expert):
                patched, written, errors = [], [], set()
                for name in names:
                    w0, w = base[name].double(), merged[name].double()
                    change = changes.get(name)
                    if change is not None:
                        svd = torch.linalg.svd(w, full_matrices=False)
                        d = change["directions"]
                        w = w - (svd.U[:, d] * svd.S[d]) @ svd.Vh[d]
                        errors.add(change["truncation_error"] or 0.0)
                    patched.append(w - w0)
                    written.append(fixed[name].double() - w0)
                update, got = torch.cat(patched), torch.cat(written)
                error = (torch.linalg.norm(got - update) / torch.linalg.norm(update)).item()
                if not errors:  # no part of this expert was flagged: its update is kept
                    assert error < 1e-6
                    continue
                assert len(errors) == 1  # one cut for the expert's parts
                assert error == pytest.approx(errors.pop(), abs=1e-4)  # 0 when merged


def test_an_experts_module_saved_whole_is_audited_and_fixed_on_the_parts(models, tmp_path):
    """modules_to_save of the experts stores the stacks whole: each expert's parts are audited as the merged model's
    are, and patched within the adapter's stack."""
    root = models["root"]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "merged")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["experts"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")  # the merged stacks; ΔW = 0 on q_proj
    report = json_report("check", tmp_path / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    merged = json_report("check", root / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    experts = [m for m in merged["matrices"] if ".experts." in m["name"]]
    assert report["matrices"] == experts and {m["name"] for m in experts} == all_parts(models["family"])
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "adapter"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    base_model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    peft.PeftModel.from_pretrained(base_model, tmp_path / "fixed").merge_and_unload().save_pretrained(
        tmp_path / "fixed-merged")
    fixed, before = load_file(tmp_path / "fixed-merged" / "model.safetensors"), load_file(
        root / "merged" / "model.safetensors")
    flagged = {m["name"]: [j for j, c in enumerate(m["max_cos"]) if c < 0.5] for m in experts}
    assert any(flagged.values())
    for name, directions in flagged.items():
        svd = torch.linalg.svd(before[name].double(), full_matrices=False)
        expected = before[name].double() - (svd.U[:, directions] * svd.S[directions]) @ svd.Vh[directions]
        assert torch.allclose(fixed[name].double(), expected, atol=1e-5), name


def test_an_adapter_whose_experts_do_not_fit_the_base_is_refused(models, tmp_path):
    """A base with other expert widths is not the adapter's base: one line, exit 2."""
    config_class, settings, *_ = FAMILIES[models["family"]]
    other = {**settings, "moe_intermediate_size": 40} if "moe_intermediate_size" in settings else {
        **settings, "intermediate_size": 40}
    transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_class)(**{**SHAPES, **other})).save_pretrained(tmp_path / "other")
    result = CliRunner().invoke(main, ["check", str(models["root"] / "adapter"), "--base", str(tmp_path / "other")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "fit none of the base's" in result.stderr and result.stderr.endswith("is this the adapter's base?\n")


def test_a_base_with_more_experts_than_the_adapter_is_refused_naming_their_number(models, tmp_path):
    """The parts of each expert fit the factors' shapes, but the base has twice the adapter's experts: the one line
    says how many the base has, which its parts' shapes alone do not show."""
    config_class, settings, *_ = FAMILIES[models["family"]]
    more = {k: 2 * EXPERTS if k in ("num_experts", "num_local_experts", "n_routed_experts") else v
            for k, v in settings.items()}
    transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_class)(**{**SHAPES, **more})).save_pretrained(tmp_path / "more")
    result = CliRunner().invoke(main, ["check", str(models["root"] / "adapter"), "--base", str(tmp_path / "more")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "fit none of the base's" in result.stderr and f"({2 * EXPERTS} experts)" in result.stderr


def unprefixed(name: str) -> str:
    """A name of a report as the other side's prefix leaves it: Nemotron-H stores `backbone.…` as published and
    `model.…` in its layers' form, and the report drops a prefix that only one side has."""
    return name.removeprefix("backbone.")


def as_compared(report: dict) -> tuple[list[dict], dict, dict]:
    """The report's matrices, tensor lists and summary, names `unprefixed`."""
    matrices = [{**m, "name": unprefixed(m["name"])} for m in report["matrices"]]
    tensors = {k: sorted(map(unprefixed, v)) if isinstance(v, list) else v for k, v in report["tensors"].items()}
    summary = {**report["summary"], "heads": {unprefixed(k): v for k, v in report["summary"]["heads"].items()}}
    return matrices, tensors, summary


def test_a_model_saved_in_the_layers_form_is_audited_on_the_published_matrices(models):
    """The merged model saved with the experts' stacks (and Mixtral's router as `mlp.gate`) is audited against the
    base stored expert by expert exactly as the same model saved as published is: each expert's parts, nothing
    missing."""
    root = models["root"]
    stored = load_file(root / "merged-layers-form" / "model.safetensors")
    assert any(t.ndim == 3 for t in stored.values()) and not all_parts(models["family"]) & stored.keys()
    layers_form = json_report("check", root / "merged-layers-form", "--base", root / "base",
                              "--format", "json", "--no-cache")
    published = json_report("check", root / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    assert as_compared(layers_form) == as_compared(published)
    assert not published["tensors"]["missing_in_base"] and not published["tensors"]["missing_in_model"]


def test_a_base_saved_in_the_layers_form_is_cut_into_the_models_parts(models):
    root = models["root"]
    layers_form = json_report("check", root / "merged", "--base", root / "base-layers-form",
                              "--format", "json", "--no-cache")
    published = json_report("check", root / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    assert as_compared(layers_form) == as_compared(published)


def test_fix_of_a_model_saved_in_the_layers_form_writes_it_so_with_the_published_fix(models, tmp_path):
    """The parts flagged in the stacks are patched as in the model saved as published, and written back into the
    stacks: the same tensors, shapes and dtypes as the input, loading as the other fix's output does."""
    root = models["root"]
    for source in ("merged", "merged-layers-form"):
        result = CliRunner().invoke(main, ["fix", str(root / source), "--base", str(root / "base"), "--out",
                                           str(tmp_path / source), "--lambda", "0", "--no-cache",
                                           "--json", str(tmp_path / f"{source}.json")])
        assert result.exit_code in (0, 1), result.stderr
    records = [json.loads((tmp_path / f"{s}.json").read_text()) for s in ("merged", "merged-layers-form")]
    changes = [sorted(({**c, "name": unprefixed(c["name"]), "tensors": None} for c in r["changes"]),
                      key=lambda c: c["name"]) for r in records]  # in the order the tensors are written
    assert changes[0] == changes[1] and any(".experts." in c["name"] for c in changes[0])
    stacks = {t for c in records[1]["changes"] for t in c["tensors"]}
    written, given = (load_file(tmp_path / "merged-layers-form" / "model.safetensors"),
                      load_file(root / "merged-layers-form" / "model.safetensors"))
    assert stacks <= given.keys() and any(given[t].ndim == 3 for t in stacks)
    assert {k: (v.shape, v.dtype) for k, v in written.items()} == {k: (v.shape, v.dtype) for k, v in given.items()}
    loaded = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / s).state_dict()
              for s in ("merged", "merged-layers-form")]
    assert loaded[0].keys() == loaded[1].keys()
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0])
    assert any(not torch.equal(written[t], given[t]) for t in stacks)


@pytest.mark.parametrize("models", [f for f, (*_, first, _) in FAMILIES.items() if len(first[0]) == 2],
                         indirect=True)  # the families that store a stack in two parts
def test_fix_leaves_an_expert_whose_other_part_is_not_finite(models, tmp_path):
    """The parts of an expert's matrix share its factors: where one part holds NaN, the flagged other part cannot be
    cut back to the rank with it, and the expert's factors are written as they were; the other experts are fixed."""
    root = models["root"]
    report = json_report("check", root / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    flagged = {m["name"] for m in report["matrices"] if m["intruders"] > 0}
    expert = next(e for e in range(EXPERTS) if parts(models["family"], 0, e)[0][0] in flagged)
    shutil.copytree(root / "adapter", tmp_path / "adapter")
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = max((n for n in factors if ".layers.0." in n and "experts" in n and "lora_B" in n),
            key=lambda n: factors[n].shape[0])  # the stack of gate and up parts: 2·I rows, I of each
    factors[b][-1, expert] = float("nan")  # a row of the second part, in a column of the expert's factors
    save_file(factors, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "adapter"), "--base", str(root / "base"), "--out",
                                       str(tmp_path / "fixed"), "--lambda", "0", "--json", str(tmp_path / "fix.json"),
                                       "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    fixed = load_file(tmp_path / "fixed" / "adapter_model.safetensors")
    a = b.replace("lora_B", "lora_A")
    for factor, of_expert in ((b, lambda t: t.view(-1, 2, EXPERTS)[:, :, expert]),  # PEFT's interleaving, rank 2
                              (a, lambda t: t.view(EXPERTS, 2, -1)[expert])):
        assert torch.allclose(of_expert(fixed[factor]), of_expert(factors[factor]), rtol=0, atol=0, equal_nan=True)
    changes = {c["name"] for c in json.loads((tmp_path / "fix.json").read_text())["changes"]}
    assert not changes & set(parts(models["family"], 0, expert)[0]) and changes


def test_target_parameters_named_without_their_module_leave_the_layers_loras_alone(models, tmp_path):
    """PEFT matches target_parameters=["gate_up_proj", "down_proj"] with the parameters of those names, wherever they
    are: the factors of q_proj (target_modules) are a layer's LoRA still, not a LoRA on a q_proj.down_proj."""
    root = models["root"]
    targets = [t.rpartition(".")[2] for t in FAMILIES[models["family"]][4]]
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets,
                           init_lora_weights=False)
    torch.manual_seed(1)
    adapted = peft.get_peft_model(model, lora)
    adapted.save_pretrained(tmp_path / "adapter")
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    from_adapter = json_report("check", tmp_path / "adapter", "--base", root / "base", "--format", "json", "--no-cache")
    merged = json_report("check", tmp_path / "merged", "--base", root / "base", "--format", "json", "--no-cache")
    assert any(m["name"].endswith("q_proj.weight") for m in from_adapter["matrices"])
    reference.assert_audited_as_merged(from_adapter, merged, rank=2, alpha=4.0)


def test_phimoes_router_saved_in_the_layers_form_is_paired_with_the_published_one(tmp_path):
    """PhiMoE's layers name its router `mlp.router`, its checkpoint `block_sparse_moe.gate`: paired either way round."""
    config = transformers.PhimoeConfig(**SHAPES, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "published")
    model.save_pretrained(tmp_path / "layers-form", save_original_format=False)
    assert "model.layers.0.mlp.router.weight" in load_file(tmp_path / "layers-form" / "model.safetensors")
    for tuned, base in (("layers-form", "published"), ("published", "layers-form")):
        report = json_report("check", tmp_path / tuned, "--base", tmp_path / base, "--format", "json", "--no-cache")
        assert not report["tensors"]["missing_in_base"] and not report["tensors"]["missing_in_model"]
        assert {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(LAYERS)} <= set(
            report["tensors"]["unchanged"])
