"""Repository layouts found on the Hub: the audit reads the weights transformers loads, or says in one line what to
do."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from tests.hubserver import HubServer
from tests.invoke import run
from tests.models import llama_like, low_rank_update, write_model


def variants(folder: Path, tensors: dict[str, torch.Tensor], *names: str) -> Path:
    """`folder` holding `tensors` as each of `names` (variant files as transformers saves them with `variant=`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_file(tensors, folder / name)
    return folder


def test_the_variant_of_a_model_without_its_default_weights_is_read_with_a_warning(tmp_path):
    base = llama_like()
    tuned = {name: t.half() for name, t in low_rank_update(base).items()}
    write_model(tmp_path / "base", base)
    folder = variants(tmp_path / "tuned", tuned, "model.fp16.safetensors", "consolidated.safetensors")
    code, stdout, stderr = run("check", folder, "--base", tmp_path / "base", "--quiet")
    assert code == 1
    assert stderr == (f"ftaudit: WARNING: {folder}: no model.safetensors, only its fp16 variant "
                      "(model.fp16.safetensors), which transformers loads with variant='fp16': reading that\n")


def test_sharded_variants_of_two_dtypes_without_the_default_weights_are_refused_in_one_line(tmp_path):
    tensors = llama_like()
    folder = tmp_path / "tuned"
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        names = sorted(tensors)
        weight_map = {}
        for i in range(2):
            shard = f"model.{variant}-{i + 1:05d}-of-00002.safetensors"
            variants(folder, {n: tensors[n].to(dtype) for n in names[i::2]}, shard)
            weight_map.update(dict.fromkeys(names[i::2], shard))
        (folder / f"model.safetensors.index.{variant}.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, stderr = run("check", folder, "--base", folder)
    assert (code, stderr) == (2, f"ftaudit: error: {folder}: no model.safetensors, only its variants bf16, fp16 "
                                 "(model.bf16-00001-of-00002.safetensors ...), which transformers loads with variant=: "
                                 "keep one variant's files in a folder of their own and pass that\n")


def test_the_shards_of_a_single_variant_are_read_by_its_index_and_a_default_beside_them_wins(tmp_path):
    tensors = llama_like()
    folder = tmp_path / "tuned"
    names = sorted(tensors)
    variants(folder, {n: tensors[n].half() for n in names[::2]}, "model.fp16-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": dict.fromkeys(
        names, "model.fp16-00001-of-00002.safetensors")}))
    code, _, stderr = run("check", folder, "--base", folder)
    assert code == 2 and stderr.endswith(f"ftaudit: error: {folder}: the shard index puts {names[1]!r} in "
                                         "model.fp16-00001-of-00002.safetensors, which lacks it\n")
    write_model(folder, tensors)
    code, _, stderr = run("check", folder, "--base", folder, "--quiet")
    assert code == 0 and "variant" not in stderr


def test_a_diffusers_pipeline_on_the_hub_is_refused_saying_which_folder_to_download_and_pass(hub_env: HubServer):
    weights = save(llama_like())
    hub_env.add_repo("org/pipe", {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": weights,
                                  "text_encoder/model.safetensors": weights, "text_encoder/config.json": b"{}"})
    code, _, stderr = run("check", "org/pipe", "--base", "org/pipe")
    assert code == 2
    assert stderr.startswith("ftaudit: error: org/pipe@") and stderr.endswith(
        ": a diffusers pipeline (model_index.json), whose models are in subfolders (text_encoder/, unet/): pass one "
        "model's folder (of a Hub repository, download it first: hf download REPO --include 'FOLDER/*')\n")


def test_a_repo_of_gguf_or_onnx_weights_only_is_refused_naming_them(tmp_path):
    for name, files in (("gguf", ["model-Q4_K_M.gguf", "model-Q8_0.gguf"]), ("onnx", ["onnx/model.onnx"])):
        folder = tmp_path / name
        for file in files:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_bytes(b"\0" * 64)
        (folder / "config.json").write_text("{}")
        more = " and 1 more" if len(files) > 1 else ""
        assert run("check", folder, "--base", folder)[::2] == (
            2, f"ftaudit: error: {folder}: no weights found (no .safetensors or pickle files, but {files[0]}{more}, "
               "a format ftaudit does not read): audit the safetensors weights it was made from\n")


def test_weights_in_mistrals_own_format_are_named_so_when_nothing_pairs(tmp_path):
    """consolidated.safetensors with params.json and no config.json (Mistral's own release format): its tensor names
    are not transformers', which the warning says before the audit finds nothing to compare; with config.json beside
    it, no warning."""
    base = llama_like()
    write_model(tmp_path / "base", base)
    folder = variants(tmp_path / "native", {"layers.0.attention.wq.weight": base["model.layers.0.self_attn.q_proj.weight"],
                                            "tok_embeddings.weight": torch.randn(16, 8)}, "consolidated.safetensors")
    (folder / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1}))
    code, _, stderr = run("check", folder, "--base", tmp_path / "base")
    assert code == 2 and stderr == (
        f"ftaudit: WARNING: {folder}: weights in Mistral's own format (consolidated.safetensors with params.json, no "
        "config.json), whose tensor names (layers.0.attention.wq.weight) are not transformers' "
        "(model.layers.0.self_attn.q_proj.weight): they pair only with weights in that format\n"
        f"ftaudit: error: the model and {tmp_path / 'base'} share no analysable weight matrices: is it really the base?\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    code, _, stderr = run("check", folder, "--base", tmp_path / "base")
    assert code == 2 and "Mistral's own format" not in stderr
