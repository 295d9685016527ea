"""What ftaudit does not audit among adapters gets a clear error naming it, never a wrong number."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from examples import minilm_finetunes as ft
from ftaudit.cli import main
from ftaudit.fix import untied_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm-lora-r8"


def adapter(tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors is not None:
        save_file(tensors(load_file(folder / "adapter_model.safetensors")), folder / "adapter_model.safetensors")
    return folder


def with_short_magnitude(t: dict) -> dict:
    name = next(n for n in t if n.endswith("lora_A.weight")).replace("lora_A.weight", "lora_magnitude_vector")
    return {**t, name: torch.ones(7)}


def with_lone_magnitude(t: dict) -> dict:
    return {**t, "base_model.model.embeddings.word_embeddings.lora_magnitude_vector": torch.ones(384)}


def without_one_b(t: dict) -> dict:
    return {n: v for n, v in t.items() if n != next(n for n in t if n.endswith("lora_B.weight"))}


def with_short_bias(t: dict) -> dict:
    name = next(n for n in t if n.endswith("lora_B.weight")).replace("lora_B.weight", "lora_B.bias")
    return {**t, name: torch.ones(7)}


def with_singular_values(t: dict, rank: int = 8) -> dict:
    """t with AdaLoRA's singular values E (rank × 1) beside each module's factors."""
    return {**t, **{n.replace("lora_A.weight", "lora_E"): torch.ones(rank, 1) for n in t if n.endswith("lora_A.weight")}}


def with_integer_factor(t: dict) -> dict:
    name = next(n for n in t if n.endswith("lora_B.weight"))
    return {**t, name: t[name].to(torch.int32)}


def rank_zero(t: dict) -> dict:
    return {n: v[:0] if "lora_A" in n else v[:, :0] if "lora_B" in n else v for n, v in t.items()}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"kasa_config": {"beta": 0.0001, "gamma": 0.001}}, None, "KaSA adapters (kasa_config) are not supported"),
        ({"use_bdlora": {"nblocks": 2}}, None, "block-diagonal LoRA adapters (use_bdlora) are not supported"),
        ({"init_lora_weights": "corda"}, None, "init_lora_weights='corda' are not supported"),
        ({"arrow_config": {"top_k": 1, "task_adapter_names": ["task_0", "task_1"]}}, None,
         "Arrow router adapters (arrow_config) are not supported"),
        ({"peft_type": "IA3"}, None, "IA3 adapters are not supported (only LoRA and AdaLoRA)"),
        ({"peft_type": "LOKR"}, None, "LOKR adapters are not supported"),
        ({"target_parameters": "mlp.experts.w1"}, None, "target_parameters must be a list of parameter names"),
        (None, with_short_magnitude, "the DoRA magnitude vector is [7], not one value per output (384)"),
        (None, with_lone_magnitude, "module embeddings.word_embeddings has a DoRA magnitude vector but no LoRA factors"),
        (None, without_one_b, "has lora_A but not its pair"),
        ({"lora_alpha": "sixteen"}, None, "lora_alpha must be a number"),
        ({"lora_alpha": float("nan")}, None, "lora_alpha must be a number (got nan)"),
        ({"lora_alpha": float("inf")}, None, "lora_alpha must be a number (got inf)"),
        ({"alpha_pattern": {"query": "big"}}, None, "alpha_pattern must map module patterns to numbers"),
        ({"alpha_pattern": {"(query": 32}}, None, "alpha_pattern: '(query' is not a valid regular expression"),
        ({"rank_pattern": {"[query": 2}}, None, "rank_pattern: '[query' is not a valid regular expression"),
        ({"alpha_pattern": {"(?i)query": 2}}, None, "alpha_pattern: '(?i)query' is not a valid regular expression"),
        (None, rank_zero, "have rank 0"),
        (None, with_singular_values, "(lora_E) in an adapter whose adapter_config.json's peft_type is not ADALORA"),
        ({"peft_type": "ADALORA"}, None, "AdaLoRA module encoder.layer.0.attention.output.dense has no lora_E"),
        ({"peft_type": "ADALORA"}, lambda t: with_singular_values(t, 7), "lora_E is [7, 1], not one value per rank ([8, 1])"),
        ({"peft_type": "ADALORA", "init_r": 0}, with_singular_values, "init_r must be a positive integer (got 0)"),
        ({"peft_type": "ADALORA", "target_parameters": ["w1"]}, None,
         "AdaLoRA on raw parameters (target_parameters) is not supported"),
        (None, with_integer_factor, "adapter/adapter_model.safetensors: tensor 'base_model.model."),
        (None, with_short_bias, "lora_B.bias [7] (lora_bias) fits no bias of the base's"),
    ],
)
def test_unsupported_or_broken_adapters_are_refused(tmp_path, config, tensors, message):
    folder = adapter(tmp_path, config, tensors)
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(ft.base_model_dir())])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_adapter_on_the_wrong_base_is_refused(tmp_path):
    from tests.models import llama_like, write_model
    base = write_model(tmp_path / "base", llama_like())
    result = CliRunner().invoke(main, ["check", str(adapter(tmp_path)), "--base", str(base)])
    assert result.exit_code == 2 and "which the base does not have" in result.stderr


def only_query_and_value(t: dict) -> dict:
    return {n: v for n, v in t.items() if ".attention.self.query." in n or ".attention.self.value." in n}


def test_matrices_an_adapter_leaves_unchanged_are_not_missing_in_the_model(tmp_path):
    """An adapter of some modules (PEFT's default for Llama is q_proj and v_proj) leaves the base's other
    matrices as they are: the model has them, unchanged. They had been listed as missing in the model,
    a reason in every verdict, and a failed audit under fail_on_missing."""
    folder = adapter(tmp_path, tensors=only_query_and_value)
    policy = tmp_path / "policy.yaml"
    policy.write_text("verdict:\n  fail_on_missing: true\n  fail_at: never\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        main, ["check", str(folder), "--base", str(ft.base_model_dir()), "--policy", str(policy), "--json", str(out)])
    report = json.loads(out.read_text())
    assert result.exit_code == 0, result.stderr
    assert report["tensors"]["missing_in_model"] == [] and report["tensors"]["missing_in_base"] == []
    names = {m["name"] for m in report["matrices"]}
    assert len(names) == 12 and all(".query." in n or ".value." in n for n in names)
    assert not any("missing" in reason for reason in report["verdict"]["reasons"])


def test_an_adapter_and_its_merged_model_get_the_same_summary_and_verdict(tmp_path):
    """The base matrices a q/v adapter leaves alone are unchanged in its merged model too: both audits list
    them as unchanged and summarise the same analysed matrices (an adapter's rate had been over q and v only,
    its merged model's over every matrix)."""
    folder = adapter(tmp_path, tensors=only_query_and_value)
    base_dir = ft.base_model_dir()
    weights = load_file(base_dir / "model.safetensors")
    factors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    for name, a in factors.items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = factors[name.replace(".lora_A.", ".lora_B.")]
            target = f"{module}.weight"
            weights[target] = (weights[target].double() + scaling * b.double() @ a.double()).float()
    merged = tmp_path / "merged"
    merged.mkdir()
    save_file(weights, merged / "model.safetensors")
    reports = []
    for model in (folder, merged):
        out = tmp_path / f"{model.name}.json"
        result = CliRunner().invoke(main, ["check", str(model), "--base", str(base_dir), "--json", str(out)])
        assert result.exit_code in (0, 1), result.stderr
        reports.append(json.loads(out.read_text()))
    from_adapter, from_merged = reports
    assert len(from_adapter["tensors"]["unchanged"]) == 24
    assert from_adapter["tensors"]["unchanged"] == from_merged["tensors"]["unchanged"]
    assert [m["name"] for m in from_adapter["matrices"]] == [m["name"] for m in from_merged["matrices"]]
    for key in ("matrices_analysed", "intruder_dimensions", "matrices_with_intruders", "intruder_rate", "risk"):
        assert from_adapter["summary"][key] == from_merged["summary"][key], key
    assert from_adapter["summary"]["update"]["type"] == from_merged["summary"]["update"]["type"] == "partial"
    assert from_adapter["verdict"] == from_merged["verdict"]


def test_trained_token_rows_replace_those_rows_of_the_embedding(tmp_path):
    """PEFT's trainable_token_indices: the adapter holds new rows for some tokens of the embedding, which a
    merge copies in. The adapter's rows had been listed as a tensor missing in the base."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base_dir = ft.base_model_dir()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                             trainable_token_indices={"word_embeddings": [5, 101, 2000]})
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.BertModel.from_pretrained(base_dir, local_files_only=True), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.mul_(50.0)  # trained rows, long enough to be new strong directions
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    reports = {}
    for side in ("adapter", "merged"):
        out = tmp_path / f"{side}.json"
        result = CliRunner().invoke(main, ["check", str(tmp_path / side), "--base", str(base_dir), "--json", str(out),
                                           "--include", "embedding", "--no-cache"])
        assert result.exit_code in (0, 1), result.stderr
        reports[side] = json.loads(out.read_text())
    adapter_report, merged_report = reports["adapter"], reports["merged"]
    assert adapter_report["tensors"]["missing_in_base"] == [] and adapter_report["model"]["adapter"][
        "trainable_tokens"] == {"embeddings.word_embeddings": 3}
    embedding = "embeddings.word_embeddings.weight"
    found = {side: next(m for m in r["matrices"] if m["name"] == embedding) for side, r in reports.items()}
    assert found["adapter"]["max_cos"] == pytest.approx(found["merged"]["max_cos"], abs=1e-6)
    assert found["adapter"]["indicators"]["relative_update_norm"] == pytest.approx(
        found["merged"]["indicators"]["relative_update_norm"], rel=1e-6)
    heads = adapter_report["summary"]["heads"][embedding], merged_report["summary"]["heads"][embedding]
    assert heads[0] == pytest.approx(heads[1], rel=1e-6) and heads[0]["max_relative_change"] > 1
    assert found["adapter"]["indicators"]["numerical_rank"] == 3  # three rows changed
    assert found["adapter"]["intruders"] > 0  # the long rows are new strong directions of the vocabulary
    fixed = ["fix", str(tmp_path / "adapter"), "--base", str(base_dir), "--include", "embedding", "--lambda", "0"]
    result = CliRunner().invoke(main, [*fixed, "--out", str(tmp_path / "fixed")])
    assert result.exit_code == 2 and not (tmp_path / "fixed").exists()
    assert result.stderr == (f"ftaudit: error: {embedding}: the adapter stores only some of its rows "
                             "(trainable_token_indices), which cannot hold the fix of the whole matrix: pass --merge "
                             "to write a merged model\n")
    result = CliRunner().invoke(main, [*fixed, "--out", str(tmp_path / "fixed"), "--merge", "--json",
                                       str(tmp_path / "fix.json")])
    assert result.exit_code in (0, 1), result.stderr
    record = json.loads((tmp_path / "fix.json").read_text())
    assert embedding in {c["name"] for c in record["changes"]}
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_file = json.loads(config_path.read_text())
    weights_path = tmp_path / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_path)
    none = {n: (v[:0] if "trainable_tokens_delta" in n else v) for n, v in weights.items()}
    save_file(none, weights_path)  # no token rows at all: nothing to replace
    config_path.write_text(json.dumps({**config_file, "trainable_token_indices": []}))
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(base_dir), "--quiet"])
    assert result.exit_code in (0, 1) and result.stderr == "", result.stderr
    save_file(weights, weights_path)
    config_path.write_text(json.dumps({**config_file, "trainable_token_indices": {"word_embeddings": [5, 101]}}))
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(base_dir)])
    assert result.exit_code == 2 and "does not match adapter_config.json's trainable_token_indices" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def saved_and_merged(config: object, folder: Path, drawn: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """A PEFT model of the MiniLM base with LoRA `config`, its parameters that `drawn` names drawn at random, saved to
    `folder`: the state dict PEFT's merge gives."""
    import peft
    import transformers

    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.BertModel.from_pretrained(ft.base_model_dir(), local_files_only=True),
                                config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if drawn(name):
                param.normal_()
    model.save_pretrained(folder)
    return model.merge_and_unload().state_dict()


def fixed_merged(adapter: Path, tmp_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`fix --merge --lambda 1` of `adapter` against the MiniLM base (no intruder scaled): its record, and the weights
    it writes."""
    record = tmp_path / "fix.json"
    result = CliRunner().invoke(main, ["fix", str(adapter), "--base", str(ft.base_model_dir()), "--merge", "--out",
                                       str(tmp_path / "fixed"), "--lambda", "1", "--json", str(record), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(record.read_text()), load_file(tmp_path / "fixed" / "model.safetensors")


def test_a_lora_bias_is_merged_into_the_layers_bias(tmp_path):
    """PEFT's lora_bias gives lora_B a bias, which a merge adds, scaled, to the layer's bias: `fix --merge` writes the
    bias PEFT merges, and the report does not list lora_B's bias as a tensor the adapter saves whole."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    base_dir = ft.base_model_dir()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True,
                             init_lora_weights=False)
    merged = saved_and_merged(config, tmp_path / "adapter", lambda name: "lora_B" in name and name.endswith("bias"))
    record, written = fixed_merged(tmp_path / "adapter", tmp_path)
    assert record["before"]["model"]["adapter"]["modules_to_save"] == []
    biases = [n for n in written if n.endswith(("query.bias", "value.bias"))]
    base = load_file(base_dir / "model.safetensors")
    assert len(biases) == 12 and not any(torch.equal(written[n], base[n]) for n in biases)
    for name in biases:
        assert torch.allclose(written[name], merged[name], atol=1e-6), name


@pytest.mark.parametrize("variant", ["velora_config", "monteclora_config"])
def test_the_state_of_a_variant_that_merges_as_lora_is_no_tensor_of_the_model(tmp_path, variant):
    """VeLoRA's projection and MonteCLoRA's sampler are saved beside the factors, but PEFT merges W0 + s·B·A all the
    same: they are neither tensors saved whole nor matrices missing in the base, and a merged model can be written."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora import config as lora_config
    base_dir = ft.base_model_dir()
    settings = {"velora_config": lora_config.VeloraConfig(), "monteclora_config": lora_config.MontecloraConfig()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                             **{variant: settings[variant]})
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.BertModel.from_pretrained(base_dir, local_files_only=True), config)
    model(torch.tensor([[101, 2000, 102]]))  # MonteCLoRA makes its sampler on the first forward pass
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".lora_velora_" in n or ".lora_monteclora_" in n for n in saved)
    out = tmp_path / "fix.json"
    result = CliRunner().invoke(main, ["fix", str(tmp_path / "adapter"), "--base", str(base_dir), "--merge", "--out",
                                       str(tmp_path / "fixed"), "--json", str(out), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    before = json.loads(out.read_text())["before"]
    assert before["model"]["adapter"]["modules_to_save"] == [] and before["tensors"]["missing_in_base"] == []
    assert len(before["matrices"]) == 12  # query and value of the 6 layers


def peft_variant(tmp_path: Path, **lora: object) -> tuple[Path, Path]:
    """A small Llama (saved as the base) and the adapter PEFT makes of it with the LoRA options `lora`."""
    import peft
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.variants import QALoraLinearVariant
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=50))
    model.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **lora})
    adapted = peft.get_peft_model(model, config)
    if config.use_qalora:  # PEFT gives QALoRA's pooled A to GPTQ layers only, which need CUDA: the same, on plain ones
        for module in adapted.modules():
            if isinstance(module, LoraLinear):
                QALoraLinearVariant.init(module, "default", config)
    adapted.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", tmp_path / "base"


@pytest.mark.parametrize(("lora", "message"), [
    ({"alora_invocation_tokens": [3, 4], "task_type": "CAUSAL_LM"},
     "aLoRA adapters (alora_invocation_tokens) are not supported"),
    ({"use_qalora": True, "qalora_group_size": 16}, "QALoRA adapters (use_qalora) are not supported"),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer-replicating adapters (layer_replication) are not supported"),
])
def test_lora_variants_peft_makes_but_not_as_w0_plus_ba_are_refused(tmp_path, lora, message):
    """aLoRA, which PEFT cannot merge, had been audited as if merged, QALoRA's narrower A had been taken for the sign
    of another base, and the LoRA of a replicated layer (the tuned model's layer 1, a copy of the base's layer 0) had
    been applied to the base's layer of that index."""
    folder, base = peft_variant(tmp_path, **lora)
    for command in (["check"], ["fix", "--out", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, [*command, str(folder), "--base", str(base)])
        assert result.exit_code == 2 and result.stderr == f"ftaudit: error: {folder}: {message}\n", result.stderr


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_a_lora_initialised_on_a_changed_base_is_refused(tmp_path, init):
    """PiSSA and OLoRA subtract the initial B·A from W0: the saved factors apply to that changed base, which the adapter
    does not hold. They had been audited on the published base, with wrong numbers."""
    folder, base = peft_variant(tmp_path, init_lora_weights=init)
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base)])
    assert result.exit_code == 2 and f"init_lora_weights={init!r} are not supported" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_conv1d_layers_are_transposed_whatever_the_config_says(tmp_path):
    """PEFT sets fan_in_fan_out layer by layer (True for GPT-2's Conv1D, False for a Linear head), and the config saves
    the last: an adapter of both saves False. Its square attn.c_proj had been built with ΔW untransposed, silently."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=1, n_head=4, vocab_size=50, n_positions=32, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, target_modules=["attn.c_proj", "lm_head"], init_lora_weights=False)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    adapted.merge_and_unload().save_pretrained(tmp_path / "merged")
    found = {}
    for side in ("adapter", "merged"):
        out = tmp_path / f"{side}.json"
        result = CliRunner().invoke(main, ["check", str(tmp_path / side), "--base", str(tmp_path / "base"), "--json",
                                           str(out), "--include", "head", "--no-cache"])
        assert result.exit_code in (0, 1), result.stderr
        found[side] = {m["name"]: m for m in json.loads(out.read_text())["matrices"]}
    assert sorted(found["adapter"]) == sorted(found["merged"]) == ["lm_head.weight", "transformer.h.0.attn.c_proj.weight"]
    for name, matrix in found["merged"].items():
        assert found["adapter"][name]["max_cos"] == pytest.approx(matrix["max_cos"], abs=1e-5), name
        assert found["adapter"][name]["indicators"]["relative_update_norm"] == pytest.approx(
            matrix["indicators"]["relative_update_norm"], rel=1e-5), name


def test_the_base_layers_an_adapter_saves_are_those_peft_loads(tmp_path):
    """PEFT saves the base layer of a targeted embedding (embed_tokens.base_layer.weight) and, with bias="all", the
    trained biases of adapted layers (query.base_layer.bias), and loads them in place of the base's. They had been
    taken for tensors the base lacks, and the trained biases left out of the merge."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, base = peft_variant(tmp_path, target_modules=["embed_tokens", "q_proj"])
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(folder / "adapter_model.safetensors")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base), "--include", "embedding", "--json",
                                       str(out), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(out.read_text())
    assert report["tensors"]["missing_in_base"] == [] and report["model"]["adapter"]["modules_to_save"] == []
    assert "model.embed_tokens.weight" in {m["name"] for m in report["matrices"]}
    weights = load_file(folder / "adapter_model.safetensors")
    name = "base_model.model.model.embed_tokens.base_layer.weight"
    save_file({**weights, name: torch.cat([weights[name], weights[name][:10]])}, folder / "adapter_model.safetensors")
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base)])
    assert result.exit_code == 2 and "is of another shape (a resized vocabulary)" in result.stderr, result.stderr

    base_dir = ft.base_model_dir()
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], bias="all", init_lora_weights=False)
    merged = saved_and_merged(config, tmp_path / "bias", lambda name: name.endswith("bias"))
    record, written = fixed_merged(tmp_path / "bias", tmp_path)
    assert not any("base_layer" in n for n in record["before"]["model"]["adapter"]["modules_to_save"])
    assert set(written) <= set(load_file(base_dir / "model.safetensors"))
    biases = [n for n in written if n.endswith(("query.bias", "value.bias", "dense.bias"))]
    assert len(biases) == 31  # query, value and 3 dense layers of each of 6, and the pooler
    for name in biases:
        assert torch.allclose(written[name], merged[name], atol=1e-6), name


EMBEDDINGS = {"llama": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}


def tied_head(tmp_path: Path, family: str, head: str | None = None, tie: bool = True,
              **lora: object) -> tuple[Path, Path, Path]:
    """A small model of `family` whose lm_head is tied to its input embedding (`tie`: config.json's
    tie_word_embeddings), an adapter PEFT makes of it with the LoRA options `lora` (its token rows and whole tensors
    changed, as trained), and the model PEFT merges from that adapter loaded back: their folders. The checkpoint stores
    only the embedding, as transformers saves a tied model, or also an lm_head.weight: a `copy` of the embedding, or
    `other` values."""
    import peft
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=50, tie_word_embeddings=tie))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=1, n_head=4, vocab_size=50, n_positions=32, tie_word_embeddings=tie))
    model.save_pretrained(tmp_path / "base")
    if head is not None:
        weights = load_file(tmp_path / "base" / "model.safetensors")
        embedding = weights[EMBEDDINGS[family]]
        weights["lm_head.weight"] = embedding.clone() if head == "copy" else torch.randn_like(embedding)
        save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
        model = type(model).from_pretrained(tmp_path / "base")
    peft.get_peft_model(model, peft.LoraConfig(r=4, init_lora_weights=False, **lora)).save_pretrained(
        tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name in weights:
        if "lora_" not in name and "base_layer" not in name:  # token rows, whole tensors: PEFT starts them as the base's
            weights[name] = weights[name] + torch.randn_like(weights[name])
        elif "lora_magnitude_vector" in name:  # DoRA's, which PEFT starts at the norms that leave W0 + ΔW as it is
            weights[name] = weights[name] * (1 + 0.3 * torch.randn_like(weights[name]))
        elif "lora_embedding_B" in name:  # N(0, 1): an update 200 times the embedding, whose merge in float32 would
            weights[name] = weights[name] / 100  # move its cosines by 1e-5
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    base = type(model).from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    return tmp_path / "adapter", tmp_path / "base", tmp_path / "merged"


@pytest.mark.parametrize(("family", "targets", "embedding"), [
    ("llama", ["lm_head", "q_proj"], "model.embed_tokens.weight"),
    ("gpt2", ["lm_head", "c_attn"], "transformer.wte.weight"),
])
def test_a_lora_on_a_head_tied_to_the_embedding_is_audited_as_peft_merges_it(tmp_path, family, targets, embedding):
    """A base with tie_word_embeddings stores only its input embedding, which its lm_head shares: PEFT's merge of a
    LoRA on lm_head changes that one tensor. The adapter had been refused as adapting a tensor the base lacks."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, base, merged = tied_head(tmp_path, family, target_modules=targets)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    found, reports = {}, {}
    for side in (folder, merged):
        out = tmp_path / f"{side.name}.json"
        result = CliRunner().invoke(main, ["check", str(side), "--base", str(base), "--json", str(out), "--include",
                                           "embedding", "--no-cache"])
        assert result.exit_code in (0, 1), result.stderr
        reports[side.name] = json.loads(out.read_text())
        found[side.name] = {m["name"]: m for m in reports[side.name]["matrices"]}
    assert embedding in found["adapter"] and sorted(found["adapter"]) == sorted(found["merged"])
    for name, matrix in found["merged"].items():
        assert found["adapter"][name]["max_cos"] == pytest.approx(matrix["max_cos"], abs=1e-5), name
        assert found["adapter"][name]["intruders"] == matrix["intruders"], name
        assert found["adapter"][name]["indicators"]["relative_update_norm"] == pytest.approx(
            matrix["indicators"]["relative_update_norm"], rel=1e-5), name
    assert found["adapter"][embedding]["lora"]["rank"] == 4
    heads = reports["adapter"]["summary"]["heads"][embedding], reports["merged"]["summary"]["heads"][embedding]
    assert heads[0] == pytest.approx(heads[1], rel=1e-5)
    assert reports["adapter"]["model"]["adapter"]["tied"] == {"lm_head": embedding}
    assert reports["adapter"]["tensors"]["missing_in_base"] == []
    for selection, analysed in [([], False), (["--include", "head"], True), (["--include", "lm_head.weight"], True),
                                (["--include", "embedding", "--exclude", "lm_head*"], False)]:
        result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base), "--format", "json", "--no-cache",
                                           *selection])
        assert result.exit_code in (0, 1), result.stderr
        assert f"lm_head is tied to the input embedding (tie_word_embeddings): its LoRA is audited as PEFT merges it, " \
               f"as an update of {embedding}, the embedding's weight too" in result.stderr
        assert "matches no weight matrix" not in result.stderr
        report = json.loads(result.stdout)
        assert (embedding in {m["name"] for m in report["matrices"]}) == analysed, selection
        assert embedding in report["summary"]["heads"]  # measured for its row norms when not analysed in full

    record, written = tmp_path / "fix.json", tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(folder), "--base", str(base), "--merge", "--out", str(written),
                                       "--lambda", "1", "--include", "head", "--json", str(record), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    expected = load_file(merged / "model.safetensors")
    weights = load_file(written / "model.safetensors")
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    import transformers
    loaded = transformers.AutoModelForCausalLM.from_pretrained(written)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert torch.allclose(loaded.get_output_embeddings().weight, expected[embedding], atol=1e-6)
    result = CliRunner().invoke(main, ["fix", str(folder), "--base", str(base), "--out", str(tmp_path / "patched"),
                                       "--lambda", "0.5", "--include", "head", "--json", str(record), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    changes = {c["name"]: c["tensors"] for c in json.loads(record.read_text())["changes"]}
    assert changes[embedding] == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]

    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()),
                                                  "tie_word_embeddings": False}))
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base)])
    assert result.exit_code == 2 and result.stderr.startswith(
        f"ftaudit: error: {folder}: adapts lm_head, which the base does not have: is this the adapter's base?"), \
        result.stderr


@pytest.mark.parametrize("head", [None, "copy"])
@pytest.mark.parametrize("lora", [
    {"target_modules": ["lm_head", "embed_tokens", "q_proj"]},
    {"target_modules": ["lm_head", "q_proj"], "ensure_weight_tying": True},
])
def test_a_lora_on_both_a_tied_head_and_its_embedding_is_refused(tmp_path, lora, head):
    """PEFT's merge adds the updates of both layers to the one tensor they share (with ensure_weight_tying, the same
    update twice): a model neither layer computes. The embedding's update had been silently replaced by the head's;
    where the base stores a copy of the embedding as lm_head.weight too, each had been audited on its own tensor."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, base, _ = tied_head(tmp_path, "llama", head, **lora)
    for command in (["check"], ["fix", "--merge", "--out", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, [*command, str(folder), "--base", str(base)])
        assert result.exit_code == 2 and result.stderr == (
            f"ftaudit: error: {folder}: adapts both lm_head and model.embed_tokens, which the base ties into one "
            "tensor, model.embed_tokens.weight (tie_word_embeddings): PEFT's merge adds both updates to it, a model "
            "neither layer computes; if the merged model is the one you use, merge the adapter (PEFT's "
            "merge_and_unload) and audit that\n"), result.stderr


def test_a_tied_head_whose_embedding_the_base_stores_twice_is_refused(tmp_path):
    """Of two token embeddings of the head's shape, the one it is tied to is not told by the checkpoint."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, base, _ = tied_head(tmp_path, "llama", target_modules=["lm_head", "q_proj"])
    weights = load_file(base / "model.safetensors")
    save_file({**weights, "model.decoder.embed_tokens.weight": weights["model.embed_tokens.weight"].clone()},
              base / "model.safetensors")
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base)])
    assert result.exit_code == 2 and result.stderr == (
        f"ftaudit: error: {folder}: lm_head, tied to the input embedding, fits more than one of the base's embeddings "
        "(model.decoder.embed_tokens.weight, model.embed_tokens.weight): merge the adapter into its base (PEFT's "
        "merge_and_unload) and audit the merged model\n"), result.stderr


def test_trained_token_rows_of_a_tied_head_are_audited_as_peft_merges_them(tmp_path):
    """PEFT's merge of trainable_token_indices on a tied lm_head writes those rows of the embedding it shares. The
    adapter had been refused as adapting an lm_head the base does not have."""
    pytest.importorskip("peft")
    import peft
    import transformers

    folder, base, _ = tied_head(tmp_path, "llama", target_modules=["q_proj"],
                                trainable_token_indices={"lm_head": [1, 2]})
    weights = load_file(folder / "adapter_model.safetensors")
    rows = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
    weights[rows] = torch.randn_like(weights[rows])  # as trained: PEFT starts them at the base's rows
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), folder)
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    found, said = {}, {}
    for side in (folder, tmp_path / "merged"):
        result = CliRunner().invoke(main, ["check", str(side), "--base", str(base), "--format", "json", "--include",
                                           "embedding", "--no-cache"])
        assert result.exit_code in (0, 1), result.stderr
        found[side.name], said[side.name] = json.loads(result.stdout), result.stderr
    embedding = "model.embed_tokens.weight"
    assert found["adapter"]["model"]["adapter"]["tied"] == {"lm_head": embedding}
    assert said["adapter"] == "ftaudit: WARNING: lm_head is tied to the input embedding (tie_word_embeddings): its " \
        f"trained token rows are audited as PEFT merges them, as rows of {embedding}, the embedding's weight too\n"
    matrices = [{m["name"]: m["max_cos"] for m in found[side]["matrices"]} for side in ("adapter", "merged")]
    assert sorted(matrices[0]) == sorted(matrices[1]) and embedding in matrices[0]
    for name, max_cos in matrices[1].items():
        assert matrices[0][name] == pytest.approx(max_cos, abs=1e-5), name


def audits_agree(folder: Path, base: Path, merged: Path, *options: str) -> tuple[dict, dict, str]:
    """The audits of adapter `folder` and of the model PEFT merges from it, heads and embeddings analysed in full: the
    same matrices with the same numbers, and the same tensors left out. Both reports, and what the adapter's said."""
    reports, said = [], []
    for side in (folder, merged):
        result = CliRunner().invoke(main, ["check", str(side), "--base", str(base), "--format", "json", "--include",
                                           "embedding", "--include", "head", "--no-cache", *options])
        assert result.exit_code in (0, 1), result.stderr
        reports.append(json.loads(result.stdout))
        said.append(result.stderr)
    found = [{m["name"]: m for m in report["matrices"]} for report in reports]
    assert sorted(found[0]) == sorted(found[1])
    for name, matrix in found[1].items():
        assert found[0][name]["max_cos"] == pytest.approx(matrix["max_cos"], abs=1e-5), name
        assert found[0][name]["intruders"] == matrix["intruders"], name
        assert found[0][name]["indicators"]["relative_update_norm"] == pytest.approx(
            matrix["indicators"]["relative_update_norm"], rel=1e-5), name
    for key in ("missing_in_base", "missing_in_model", "shape_mismatch", "unchanged"):
        assert reports[0]["tensors"][key] == reports[1]["tensors"][key], key
    heads = [report["summary"]["heads"] for report in reports]
    for name, head in heads[0].items():  # the merged model's unchanged ones too
        assert head == pytest.approx(heads[1][name], rel=1e-5, abs=1e-9), name
    return reports[0], reports[1], said[0]


def card_names_and_merge_writes(tmp_path: Path, folder: Path, base: Path, merged: Path, named: str) -> list[str]:
    """Adapter `folder`'s card section names it as `named` says; `fix --merge` with λ = 1 writes the model PEFT merges
    (`merged`). The start of a fix command line for it."""
    card = CliRunner().invoke(main, ["check", str(folder), "--base", str(base), "--card", str(tmp_path / "card.md"),
                                     "--quiet"])
    assert card.exit_code in (0, 1) and f"`{folder}` ({named}" in (tmp_path / "card.md").read_text()
    common = ["fix", str(folder), "--base", str(base), "--no-cache", "--quiet"]
    same = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "same"), "--merge", "--lambda", "1"])
    assert same.exit_code in (0, 1), same.stderr
    written, expected = load_file(tmp_path / "same" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert sorted(written) == sorted(expected)
    assert all(torch.allclose(written[n], expected[n], rtol=0, atol=1e-6) for n in expected)
    return common


@pytest.mark.parametrize(("family", "targets"), [("llama", ["q_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_a_dora_adapter_is_audited_and_merged_as_peft_merges_it(tmp_path, family, targets):
    """DoRA (use_dora): each output's row of W0 + ΔW rescaled to its magnitude (a column of GPT-2's in × out Conv1D
    weights, fan_in_fan_out). The adapter's audit is the merged model's; `fix --merge` with λ = 1 writes the model
    PEFT merges; the fix written as an adapter, whose factors cannot hold it, is refused."""
    pytest.importorskip("peft")
    folder, base, merged = tied_head(tmp_path, family, tie=False, target_modules=targets, use_dora=True)
    report, _, _ = audits_agree(folder, base, merged)
    assert report["model"]["adapter"]["use_dora"] is True and report["summary"]["intruder_dimensions"] > 0
    common = card_names_and_merge_writes(tmp_path, folder, base, merged, "DoRA adapter, r = 4, α = 8)")
    refused = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "fix")])
    assert refused.exit_code == 2 and refused.stderr.endswith(
        ": a DoRA module (use_dora), whose factors and magnitudes cannot hold the fix of the matrix they rescale: pass "
        "--merge to write a merged model\n"), refused.stderr


def adalora(tmp_path: Path, family: str, targets: list[str], lora_alpha: int, allocated: bool) -> tuple[Path, Path, Path]:
    """A small model of `family`, an AdaLoRA adapter PEFT makes of it (init_r 6) with trained factors and singular
    values, its ranks `allocated` (rank_pattern: the first module keeps none, the others some) or not, and the model
    PEFT merges from that adapter loaded back: their folders."""
    import peft
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=50))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=50, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    tuned = peft.get_peft_model(model, peft.AdaLoraConfig(
        init_r=6, target_r=3, total_step=100, target_modules=targets, lora_alpha=lora_alpha,
        fan_in_fan_out=family == "gpt2"))
    for name, parameter in tuned.named_parameters():
        if "lora_" in name:  # as trained: PEFT starts B and E at zero
            parameter.data = torch.randn_like(parameter) / 4
    if allocated:
        modules = [n for n, m in tuned.base_model.model.named_modules() if "default" in getattr(m, "lora_E", {})]
        kept = [[False] * 6] + [(torch.rand(6) > 0.4).tolist() for _ in modules[1:]]
        tuned.peft_config["default"].rank_pattern = {f"{n}.lora_E": k for n, k in zip(modules, kept)}
    tuned.save_pretrained(tmp_path / "adapter")
    base = type(model).from_pretrained(tmp_path / "base")
    peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "merged")
    return tmp_path / "adapter", tmp_path / "base", tmp_path / "merged"


@pytest.mark.parametrize(("family", "targets", "lora_alpha", "allocated"), [
    ("llama", ["q_proj", "down_proj"], 16, True), ("llama", ["q_proj", "down_proj"], 0, True),
    ("llama", ["q_proj", "v_proj"], 8, False), ("gpt2", ["c_attn", "c_fc"], 16, True)])
def test_an_adalora_adapter_is_audited_and_merged_as_peft_merges_it(tmp_path, family, targets, lora_alpha, allocated):
    """AdaLoRA: ΔW = B·(A ⊙ E)·lora_alpha/(init_r + 1e-5) (the kept rank for lora_alpha 0), its factors cut to the ranks
    rank_pattern keeps, none in one module; GPT-2's in × out Conv1D weights (fan_in_fan_out). The adapter's audit is
    the merged model's; `fix --merge` with λ = 1 writes the model PEFT merges. The fix written as an adapter holds, in
    new factors with E = 1, the best approximation of their rank to the fix that `fix --merge` writes, as PEFT merges
    it. AdaLoRA had been refused."""
    pytest.importorskip("peft")
    folder, base, merged = adalora(tmp_path, family, targets, lora_alpha, allocated)
    ranks = {n: t.shape[0] for n, t in load_file(folder / "adapter_model.safetensors").items() if "lora_E" in n}
    assert (0 in ranks.values()) == allocated and (len(set(ranks.values())) > 1) == allocated
    report, merged_report, _ = audits_agree(folder, base, merged)
    adapter = report["model"]["adapter"]
    assert adapter["type"] == "adalora" and adapter["init_r"] == 6 and adapter["modules"] == sum(
        rank > 0 for rank in ranks.values())
    assert report["summary"]["intruder_dimensions"] > 0 and report["verdict"] == merged_report["verdict"]
    common = card_names_and_merge_writes(tmp_path, folder, base, merged, "AdaLoRA adapter, r = ")
    record = tmp_path / "fix.json"
    for out, options in (("fixed", ["--json", str(record)]), ("merged-fix", ["--merge"])):
        result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / out), "--lambda", "0", *options])
        assert result.exit_code in (0, 1), result.stderr
    changes = json.loads(record.read_text())["changes"]
    assert changes and all(len(change["tensors"]) == 3 for change in changes)  # A, B and E rewritten
    given, written = (load_file(f / "adapter_model.safetensors") for f in (folder, tmp_path / "fixed"))
    changed = {t for change in changes for t in change["tensors"]}
    assert all(torch.equal(written[n], given[n]) == (n not in changed) for n in given)
    assert all(torch.equal(written[n], torch.ones_like(given[n])) for n in changed if "lora_E" in n)
    import peft
    import transformers

    model = type(transformers.AutoModelForCausalLM.from_pretrained(base)).from_pretrained(base)
    as_merged = peft.PeftModel.from_pretrained(model, tmp_path / "fixed").merge_and_unload().state_dict()
    w0, fixed = load_file(base / "model.safetensors"), load_file(tmp_path / "merged-fix" / "model.safetensors")
    for change in changes:
        name = change["name"]
        update = fixed[name].double() - w0[name].double()
        error = torch.linalg.norm(as_merged[name].double() - w0[name].double() - update) / torch.linalg.norm(update)
        assert error.item() == pytest.approx(change["truncation_error"], abs=1e-5), name


def test_dora_on_an_embedding_is_refused_in_one_line(tmp_path):
    pytest.importorskip("peft")
    folder, base, _ = tied_head(tmp_path, "llama", tie=False, target_modules=["embed_tokens"], use_dora=True)
    result = CliRunner().invoke(main, ["check", str(folder), "--base", str(base)])
    assert result.exit_code == 2 and result.stderr == (
        f"ftaudit: error: {folder}: model.embed_tokens: DoRA on embeddings is not supported: merge the adapter into "
        "its base (PEFT's merge_and_unload) and audit the merged model\n")


@pytest.mark.parametrize(("family", "lora", "tied"), [
    ("llama", {"target_modules": ["lm_head", "q_proj"]}, True),
    ("gpt2", {"target_modules": ["lm_head", "c_attn"]}, True),
    ("llama", {"target_modules": ["embed_tokens"]}, False),
    ("gpt2", {"target_modules": ["wte"]}, False),
    ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": {"lm_head": [1, 2]}}, True),
    ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [3]}}, False),
])
def test_a_base_that_stores_its_tied_head_too_is_audited_as_peft_merges_the_adapter(tmp_path, family, lora, tied):
    """A base with tie_word_embeddings whose checkpoint holds lm_head.weight too, a copy of the embedding: transformers
    loads one parameter, which PEFT's merge of a LoRA or token rows on either layer changes, and saves it once, under
    the embedding's name. The head's adapter had been audited on lm_head alone; the embedding's had left the head
    listed as unchanged, and the merged model's audit had listed it as missing in the model."""
    pytest.importorskip("peft")
    import transformers

    folder, base, merged = tied_head(tmp_path, family, head="copy", **lora)
    embedding = EMBEDDINGS[family]
    assert "lm_head.weight" in load_file(base / "model.safetensors")
    assert "lm_head.weight" not in load_file(merged / "model.safetensors")
    report, _, _ = audits_agree(folder, base, merged)
    assert embedding in {m["name"] for m in report["matrices"]}
    assert "lm_head.weight" not in json.dumps(report["tensors"])
    assert report["model"]["adapter"].get("tied") == ({"lm_head": embedding} if tied else None)

    record, written = tmp_path / "fix.json", tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(folder), "--base", str(base), "--merge", "--out", str(written),
                                       "--lambda", "1", "--include", "head", "--include", "embedding", "--json",
                                       str(record), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    expected, weights = load_file(merged / "model.safetensors"), load_file(written / "model.safetensors")
    assert sorted(weights) == sorted([*expected, "lm_head.weight"])  # the base's files, with the copy kept a copy
    for name, tensor in [*expected.items(), ("lm_head.weight", expected[embedding])]:
        assert torch.allclose(weights[name], tensor, atol=1e-6), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(written)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    fixed = json.loads(record.read_text())
    assert [m["name"] for m in fixed["after"]["matrices"]] == [m["name"] for m in fixed["before"]["matrices"]]


@pytest.mark.parametrize(("head", "tie", "lora"), [
    ("copy", False, {"target_modules": ["lm_head", "q_proj"]}),
    ("other", True, {"target_modules": ["lm_head", "q_proj"]}),
    ("copy", True, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
])
def test_a_head_stored_apart_from_its_embedding_is_audited_apart(tmp_path, head, tie, lora):
    """A base whose config.json does not tie its lm_head (even to an embedding of the same values), or ties it but
    stores the two with different values, which transformers then loads as two parameters, saying so (it had not been
    said): PEFT's merge changes the head alone, and so does the audit. So does an adapter that saves the head whole
    (modules_to_save), whose merge unties it."""
    pytest.importorskip("peft")
    folder, base, merged = tied_head(tmp_path, "llama", head=head, tie=tie, **lora)
    report, _, said = audits_agree(folder, base, merged)
    assert "lm_head.weight" in {m["name"] for m in report["matrices"]}
    assert "model.embed_tokens.weight" in report["tensors"]["unchanged"]
    assert "tied" not in report["model"]["adapter"]
    warning = (f"ftaudit: WARNING: {base}: config.json ties lm_head.weight to model.embed_tokens.weight "
               "(tie_word_embeddings), but the two are stored with different values: they are audited as two "
               "matrices, as transformers loads them\n")
    assert said == (warning if head == "other" else ""), said


def test_a_pickled_tied_base_holding_both_names_is_audited_as_one_tensor(tmp_path):
    """transformers' pickles (pytorch_model.bin) hold a tied model's parameter under both names."""
    pytest.importorskip("peft")
    folder, base, merged = tied_head(tmp_path, "llama", target_modules=["lm_head", "q_proj"])
    weights = load_file(base / "model.safetensors")
    torch.save({**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    report, _, _ = audits_agree(folder, base, merged, "--allow-pickle")
    assert "model.embed_tokens.weight" in {m["name"] for m in report["matrices"]}
    assert report["model"]["adapter"]["tied"] == {"lm_head": "model.embed_tokens.weight"}


def test_a_model_that_stores_its_tied_head_too_is_audited_as_its_embedding(tmp_path):
    """A tied model saved with its parameter under both names, against a base that stores it once: the head is the
    embedding, not a matrix the base lacks (it had been listed as missing in the base)."""
    pytest.importorskip("peft")
    folder, base, merged = tied_head(tmp_path, "llama", target_modules=["lm_head", "q_proj"])
    both = tmp_path / "both"
    shutil.copytree(merged, both)
    weights = load_file(both / "model.safetensors")
    save_file({**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()},
              both / "model.safetensors", metadata={"format": "pt"})
    audits_agree(folder, base, both)
    record, written = tmp_path / "fix.json", tmp_path / "fixed"
    result = CliRunner().invoke(main, ["fix", str(both), "--base", str(base), "--out", str(written), "--lambda", "0.5",
                                       "--include", "embedding", "--json", str(record), "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    assert "model.embed_tokens.weight" in {c["name"] for c in json.loads(record.read_text())["changes"]}
    weights = load_file(written / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])  # as transformers ties them


def test_a_lora_on_both_towers_of_a_multimodal_model_is_audited_as_its_merged_model(tmp_path):
    """Recent transformers name Llava's towers `model.language_model` and `model.vision_tower`, as PEFT names their LoRAs,
    and save them as published: `language_model.model`, `vision_tower`, and the head as `language_model.lm_head`. No
    one prefix pair fits the three: a LoRA on both towers (PEFT's default q_proj and v_proj for Llava) had been refused
    as adapting a tensor the base lacks."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=80),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=8, patch_size=4),
        image_token_id=70))
    model.save_pretrained(tmp_path / "base")
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "base" / "model.safetensors")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    base = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "merged")
    found = {}
    for side in ("adapter", "merged"):
        result = CliRunner().invoke(main, ["check", str(tmp_path / side), "--base", str(tmp_path / "base"), "--format",
                                           "json", "--include", "head", "--no-cache"])
        assert result.exit_code in (0, 1), result.stderr
        found[side] = {m["name"]: m for m in json.loads(result.stdout)["matrices"]}
    assert sorted(found["adapter"]) == sorted(found["merged"])
    assert len(found["adapter"]) == 9  # q_proj and v_proj of 2 layers of each tower, and the head
    assert {"language_model.lm_head.weight", "vision_tower.encoder.layers.1.self_attn.v_proj.weight"} <= set(
        found["adapter"])
    for name, matrix in found["merged"].items():
        assert found["adapter"][name]["max_cos"] == pytest.approx(matrix["max_cos"], abs=1e-4), name
        assert found["adapter"][name]["indicators"]["relative_update_norm"] == pytest.approx(
            matrix["indicators"]["relative_update_norm"], rel=1e-5), name


def test_a_folder_of_adapters_in_subfolders_says_where_they_are(tmp_path):
    """PEFT saves an adapter not named `default` (`get_peft_model(..., adapter_name="sft")`), and every adapter but the
    default one, in a subfolder of its name. Such a folder had been refused as holding no weights, with no word of them."""
    peft = pytest.importorskip("peft")
    _, base = peft_variant(tmp_path)
    import transformers
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False), adapter_name="sft")
    model.add_adapter("dpo", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapters")
    assert not (tmp_path / "adapters" / "adapter_config.json").exists()
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapters"), "--base", str(base)])
    assert result.exit_code == 2 and result.stderr == (
        f"ftaudit: error: {tmp_path / 'adapters'}: no weights at its top level, but PEFT adapters in subfolders (dpo/, "
        "sft/): pass one of those folders (of a Hub repository, download it first: hf download REPO --include "
        "'FOLDER/*')\n"), result.stderr
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapters" / "sft"), "--base", str(base), "--format",
                                       "json"])
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(result.stdout)["model"]["adapter"]["modules"] == 2


def test_a_lora_on_a_tied_head_of_a_resized_vocabulary_is_refused_as_such(tmp_path):
    """A tied lm_head's LoRA on a vocabulary grown before training (new tokens) fits no embedding of the base by its
    rows; PEFT saves the grown head's base layer. It had been refused as adapting an lm_head the base does not have."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=50, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(58)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                         init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")])
    assert result.exit_code == 2 and result.stderr == (
        f"ftaudit: error: {tmp_path / 'adapter'}: base_model.model.lm_head.base_layer.weight [58, 64], the layer PEFT "
        "loads in place of the base's model.embed_tokens.weight [50, 64], is of another shape (a resized vocabulary): "
        "merge the adapter into its base (PEFT's merge_and_unload) and audit the merged model\n"), result.stderr


def test_a_lora_on_layers_transformers_names_otherwise_than_the_checkpoint_says_what_to_do(tmp_path):
    """transformers 5.25 names ViT's attention.attention.query `attention.q_proj` (and so PEFT's LoRA on it), and writes
    the checkpoint as published. Such an adapter had been refused as adapting a layer its base lacks, which read as
    the wrong base, with nothing to do about it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, image_size=8, patch_size=4))
    model.save_pretrained(tmp_path / "base")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in load_file(tmp_path / "base" / "model.safetensors")
    renamed = "vit.layers.0.attention.q_proj" in dict(model.named_modules())
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"] if renamed else ["query", "value"],
                                               modules_to_save=["classifier"], init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")])
    if not renamed:  # a transformers before 5 names the layers as the checkpoint stores them: the adapter is audited
        assert result.exit_code in (0, 1), result.stderr
        return
    assert result.exit_code == 2 and result.stderr == (
        f"ftaudit: error: {tmp_path / 'adapter'}: adapts vit.layers.0.attention.q_proj, which the base does not have: "
        "is this the adapter's base? (transformers names some layers otherwise than their checkpoints store them, as "
        "ViT's attention.attention.query, its attention.q_proj: if so, merge the adapter into its base (PEFT's "
        "merge_and_unload) and audit the merged model)\n"), result.stderr


def test_a_tied_head_an_adapter_saves_whole_is_compared_with_the_base_embedding(tmp_path):
    """PEFT's merge of a head saved whole (modules_to_save) on a base that ties it to its embedding and stores none
    unties the two: the saved head is compared with the embedding, the base's head, as the merged model's is. It had
    been missing in the base."""
    pytest.importorskip("peft")
    folder, base, merged = tied_head(tmp_path, "llama", target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    report, merged_report, said = audits_agree(folder, base, merged)
    assert "lm_head.weight" in {m["name"] for m in report["matrices"]}
    assert report["tensors"]["tied_heads"] == merged_report["tensors"]["tied_heads"] == [
        {"name": "lm_head.weight", "side": "base", "embedding": "model.embed_tokens.weight"}]
    assert "model.embed_tokens.weight" in report["tensors"]["unchanged"]


def test_the_fix_merged_of_an_embedding_saved_whole_is_refused_where_the_tied_head_has_no_name(tmp_path):
    """PEFT's merge of an embedding saved whole on a base that ties its head and stores none keeps the base's
    embedding as the head, stored under the head's name, which the base does not give: refused before anything is
    written; the fix written as an adapter is not."""
    pytest.importorskip("peft")
    folder, base, _ = tied_head(tmp_path, "llama", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    common = ["fix", str(folder), "--base", str(base), "--include", "embedding", "--no-cache", "--quiet"]
    merged = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "merged-fix"), "--merge"])
    assert merged.exit_code == 2 and merged.stderr == (
        "ftaudit: error: the adapter saves model.embed_tokens.weight whole, which the base ties to its output head "
        "(tie_word_embeddings) and stores once: PEFT's merge unties the two, the head keeping the base's values under a "
        "name the base does not store: write the adapter instead (without --merge)\n")
    assert not (tmp_path / "merged-fix").exists()
    fixed = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "fix")])
    assert fixed.exit_code in (0, 1), fixed.stderr


def test_a_config_is_untied_at_its_top_level_and_in_its_text_config():
    """transformers reads a multimodal model's tie from its top level or its text_config: both say false."""
    config = {"model_type": "llava", "text_config": {"model_type": "llama", "tie_word_embeddings": True}, "a": 1}
    assert untied_config(config) == {"model_type": "llava", "a": 1, "tie_word_embeddings": False,
                                     "text_config": {"model_type": "llama", "tie_word_embeddings": False}}
    assert config["text_config"]["tie_word_embeddings"] is True  # the input is left as it was


@pytest.mark.parametrize(("head", "saved", "sharded"), [
    (None, ["lm_head"], False), (None, ["lm_head"], True), (None, ["embed_tokens", "lm_head"], False),
    (None, ["embed_tokens", "lm_head"], True), ("copy", ["lm_head"], False), ("copy", ["embed_tokens"], False),
    ("copy", ["embed_tokens", "lm_head"], False)])
def test_the_fix_merged_of_an_adapter_saving_a_tied_head_or_embedding_whole_is_untied_as_peft_merges_it(
        tmp_path, head, saved, sharded):
    """Merged, an adapter that saves a tied head or its embedding whole (modules_to_save) gives a model untied in its
    config.json, as PEFT's merge saves it; a head the base does not store (`head` None) is stored after the embedding,
    in its file (and shard index). With λ = 1 it is the model PEFT merges, which transformers loads with a head of its
    own; with λ = 0 the head saved whole is patched as the fix written as an adapter patches it."""
    pytest.importorskip("peft")
    import transformers

    folder, base, peft_merged = tied_head(tmp_path, "llama", head, target_modules=["q_proj"], modules_to_save=saved)
    if sharded:  # the embedding in a shard of its own, beside others
        shutil.move(base, tmp_path / "single")
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "single").save_pretrained(base, max_shard_size="40KB")
        assert (base / "model.safetensors.index.json").exists()
    config = json.loads((base / "config.json").read_text())
    common = ["fix", str(folder), "--base", str(base), "--include", "head", "--no-cache", "--quiet"]
    same = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "same"), "--merge", "--lambda", "1"])
    assert same.exit_code in (0, 1), same.stderr
    expected = load_file(peft_merged / "model.safetensors")
    written = {}
    for file in (tmp_path / "same").glob("*.safetensors"):
        written.update(load_file(file))
    assert sorted(written) == sorted(expected)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(written[name], expected[name]), name
    assert all(torch.allclose(written[n], expected[n], rtol=0, atol=1e-6) for n in expected)
    assert json.loads((tmp_path / "same" / "config.json").read_text()) == untied_config(config)
    assert untied_config(config) == {**config, "tie_word_embeddings": False}
    if sharded:
        index = json.loads((tmp_path / "same" / "model.safetensors.index.json").read_text())
        shard = index["weight_map"]["model.embed_tokens.weight"]
        assert index["weight_map"]["lm_head.weight"] == shard
        assert "lm_head.weight" in load_file(tmp_path / "same" / shard)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "same")
    assert torch.equal(model.lm_head.weight, expected["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    if "lm_head" not in saved:
        return
    record = tmp_path / "fix.json"
    merged = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "merged-fix"), "--merge", "--lambda", "0",
                                       "--json", str(record)])
    assert merged.exit_code in (0, 1), merged.stderr
    assert "lm_head.weight" in {change["name"] for change in json.loads(record.read_text())["changes"]}
    fixed = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "fix"), "--lambda", "0"])
    assert fixed.exit_code in (0, 1), fixed.stderr
    patched = load_file(tmp_path / "fix" / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    assert not torch.equal(patched, expected["lm_head.weight"])
    merged_head = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged-fix").lm_head.weight
    assert torch.equal(merged_head, patched)


@pytest.mark.parametrize("head", [None, "copy"])
def test_the_base_of_an_adapter_saving_its_head_whole_ties_it_without_a_config_json(tmp_path, head):
    """The base of an adapter that saves lm_head whole (modules_to_save) has a head. Stored as bare weights (no
    config.json), it is read as where its config.json ties the head: the head saved whole is compared with the
    embedding, which a stored copy is too. Its merge, untied as PEFT's is, needs a config.json to say so, and is
    refused in one line. It had stopped on an internal error, or, where the base stores a copy, been written with
    nothing to say that the head is untied."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    folder, base, _ = tied_head(tmp_path, "llama", head, target_modules=["q_proj"], modules_to_save=["lm_head"])
    common = [str(folder), "--base", str(base), "--include", "head", "--no-cache"]
    configured = CliRunner().invoke(main, ["check", *common, "--format", "json"])
    (base / "config.json").unlink()
    bare = CliRunner().invoke(main, ["check", *common, "--format", "json"])
    assert bare.exit_code == configured.exit_code == 1, bare.stderr
    reports = [json.loads(result.stdout) for result in (configured, bare)]
    assert reports[1]["tensors"] == reports[0]["tensors"]
    assert reports[1]["tensors"]["tied_heads"] == ([{"name": "lm_head.weight", "side": "base",
                                                    "embedding": "model.embed_tokens.weight"}] if head is None else [])
    assert reports[1]["matrices"] == reports[0]["matrices"] and "lm_head.weight" in {
        m["name"] for m in reports[1]["matrices"]}
    out = tmp_path / "merged-fix"
    merged = CliRunner().invoke(main, ["fix", *common, "--merge", "--out", str(out)])
    assert merged.exit_code == 2 and merged.stderr == (
        f"ftaudit: error: {base}: has no config.json, in which the merged model must say that its head is untied from "
        "the input embedding (tie_word_embeddings: false), as PEFT's merge saves it: pass the base with its "
        "config.json, or write the adapter instead (without --merge)\n"), merged.stderr
    assert not out.exists()
    fixed = CliRunner().invoke(main, ["fix", *common, "--out", str(tmp_path / "fixed")])
    assert fixed.exit_code in (0, 1), fixed.stderr
    assert (tmp_path / "fixed" / "adapter_model.safetensors").exists()
