"""A base stored in bitsandbytes' 4-bit or 8-bit format (QLoRA's base, as transformers saves a model loaded in 4 or 8
bits): read as the weights bitsandbytes dequantizes it to, value for value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ftaudit.cli import main
from ftaudit.sources import quantized_4bit
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.local import LocalStorage
from ftaudit.sources.quantized_4bit import dequantize_4bit
from ftaudit.sources.quantized_8bit import dequantize_8bit

bnb = pytest.importorskip("bitsandbytes.functional")
DOWN_PROJ = "model.layers.0.mlp.down_proj.weight"


def quantized(w: torch.Tensor, kind: str, nested: bool, blocksize: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Matrix `w` as bitsandbytes stores it in 4 bits under the name m.weight, and what bitsandbytes dequantizes it to."""
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=kind, compress_statistics=nested)
    stored = {"m.weight": packed, **{f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return stored, bnb.dequantize_4bit(packed, state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("kind", "nested"), [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize(("shape", "blocksize"), [((64, 128), 64), ((33, 7), 64), ((300, 301), 128)])
def test_a_4bit_matrix_reads_as_bitsandbytes_dequantizes_it(tmp_path, monkeypatch, dtype, kind, nested, shape,
                                                           blocksize):
    """Every value the same as bitsandbytes' own, odd sizes (a last block cut short, an odd number of codes) and
    several pieces (CHUNK, made small) included; the parts are no longer listed, the matrix is, as its dtype and shape.
    (Rows are whole blocks, or of odd length: on other rows bitsandbytes' CPU kernel, the reference here, is wrong,
    where its reference implementation agrees with ftaudit.)"""
    monkeypatch.setattr(quantized_4bit, "CHUNK", 256)
    torch.manual_seed(0)
    stored, expected = quantized(torch.randn(shape, dtype=dtype) / 20, kind, nested, blocksize)
    save_file({**stored, "other.weight": torch.ones(3, 2)}, tmp_path / "model.safetensors")
    weights = Checkpoint(LocalStorage(tmp_path), ["model.safetensors"])
    assert dequantize_4bit(weights, "m") == [kind]
    assert sorted(weights.infos) == ["m.weight", "other.weight"]
    info = weights.infos["m.weight"]
    assert info.shape == shape and info.dtype == {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")
    assert torch.equal(weights.load("m.weight"), expected)
    assert weights.stored_size("m.weight") == sum(t.numel() * t.element_size() for t in stored.values())


def test_a_4bit_stack_of_experts_matrices_reads_expert_by_expert(tmp_path):
    """A 4-bit matrix that holds experts' matrices one above the other (DBRX's), read as their stack: each expert's
    matrix is its rows of the dequantized matrix."""
    torch.manual_seed(0)
    stored, expected = quantized(torch.randn(96, 64, dtype=torch.bfloat16), "nf4", True, 64)
    save_file(stored, tmp_path / "model.safetensors")
    weights = Checkpoint(LocalStorage(tmp_path), ["model.safetensors"])
    dequantize_4bit(weights, "m")
    weights.restack("m.weight", (3, 32, 64))
    assert weights.infos["m.weight"].shape == (3, 32, 64)
    assert all(torch.equal(weights.load("m.weight", e), expected[32 * e : 32 * (e + 1)]) for e in range(3))
    assert torch.equal(weights.load("m.weight"), expected.view(3, 32, 64))


def in_8_bits(w: torch.Tensor, layout: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Matrix `w` as bitsandbytes stores it in 8 bits (LLM.int8) under m.weight, its `layout` (weight_format) beside
    it or not, and what bitsandbytes dequantizes it to."""
    values, scales, _ = bnb.int8_vectorwise_quant(w)
    stored = {"m.weight": values, "m.SCB": scales, **({"m.weight_format": layout} if layout is not None else {})}
    return stored, bnb.int8_vectorwise_dequant(values, scales)


@pytest.mark.parametrize("layout", [torch.tensor(0, dtype=torch.uint8), None])
@pytest.mark.parametrize("shape", [(64, 128), (33, 7)])
def test_an_8bit_matrix_reads_as_bitsandbytes_dequantizes_it(tmp_path, layout, shape):
    torch.manual_seed(0)
    stored, expected = in_8_bits(torch.randn(shape, dtype=torch.float16), layout)
    save_file({**stored, "other.weight": torch.ones(3, 2)}, tmp_path / "model.safetensors")
    weights = Checkpoint(LocalStorage(tmp_path), ["model.safetensors"])
    assert dequantize_8bit(weights, "m") and sorted(weights.infos) == ["m.weight", "other.weight"]
    assert weights.infos["m.weight"].shape == shape and weights.infos["m.weight"].dtype == "F32"
    assert torch.equal(weights.load("m.weight"), expected)


def model_in_bits(tmp_path: Path, bits: int) -> tuple[Path, Path]:
    """A small Llama in bfloat16, loaded by transformers in `bits` bits (4: NF4 with double quantization; 8:
    LLM.int8) and saved so, and the weights those bits stand for, dequantized by transformers (in bfloat16 from 4 bits,
    float32 from 8, the dtypes bitsandbytes dequantizes them to), saved: their folders."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=50)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "full")
    options = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
                                              ) if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", quantization_config=options,
                                                              device_map="cpu")
    model.save_pretrained(tmp_path / "quantized")
    model.dequantize(dtype=torch.bfloat16 if bits == 4 else torch.float32).save_pretrained(tmp_path / "dequantized")
    return tmp_path / "quantized", tmp_path / "dequantized"


def audit(*args: str) -> tuple[dict, str]:
    result = CliRunner().invoke(main, ["check", *args, "--format", "json", "--no-cache"])
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    report["base"].pop("id")
    report["base"].pop("fingerprint")
    return report, result.stderr


@pytest.mark.parametrize(("bits", "quantization", "stored"), [
    (4, "bitsandbytes 4-bit (nf4)", "q_proj.weight.quant_state.bitsandbytes__nf4"),
    (8, "bitsandbytes 8-bit (LLM.int8)", "q_proj.SCB")])
def test_a_qlora_adapter_and_a_merged_model_are_audited_against_the_quantized_base_they_were_made_of(
        tmp_path, bits, quantization, stored):
    """A LoRA adapter of the quantized base (as QLoRA trains one), and the model merged from it, are audited against
    the quantized base as against the weights it dequantizes to, with a warning and `base.quantization` saying so.
    Such a base had been refused. A merged model cannot be written in its files (refused in one line), an adapter
    can; the model itself quantized is still refused."""
    peft = pytest.importorskip("peft")
    import transformers

    quantized_base, dequantized = model_in_bits(tmp_path, bits)
    assert stored in " ".join(load_file(quantized_base / "model.safetensors"))
    base = transformers.AutoModelForCausalLM.from_pretrained(dequantized)
    adapter = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    adapter.merge_and_unload().save_pretrained(tmp_path / "merged")
    for tuned in ("adapter", "merged"):
        report, said = audit(str(tmp_path / tuned), "--base", str(quantized_base))
        reference, _ = audit(str(tmp_path / tuned), "--base", str(dequantized))
        assert report["base"]["quantization"] == quantization and reference["base"]["quantization"] is None
        assert report["matrices"] == reference["matrices"] and report["summary"] == reference["summary"]
        assert report["summary"]["intruder_dimensions"] > 0
        assert said == (f"ftaudit: WARNING: {quantized_base}: {quantization} weights, audited as the weights they "
                        "dequantize to (the W0 that an adapter trained on them, as QLoRA trains, adds to)\n")
    card = CliRunner().invoke(main, ["check", str(tmp_path / "adapter"), "--base", str(quantized_base), "--card",
                                     str(tmp_path / "card.md"), "--quiet"])
    assert card.exit_code in (0, 1) and f"| Base | `{quantized_base}` (declared by the audit command; {quantization}, read as " \
        "it dequantizes) |" in (tmp_path / "card.md").read_text()
    common = ["fix", str(tmp_path / "adapter"), "--base", str(quantized_base), "--no-cache", "--quiet"]
    merged = CliRunner().invoke(main, [*common, "--merge", "--out", str(tmp_path / "merged-fix")])
    assert merged.exit_code == 2 and merged.stderr.endswith(
        f"\nftaudit: error: {quantized_base}: {quantization} weights, which a merged model written in the base's "
        "files and dtypes cannot hold: pass the full-precision base with --base, or write the adapter instead (without "
        "--merge)\n"), merged.stderr
    fixed = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "fixed")])
    assert fixed.exit_code in (0, 1) and (tmp_path / "fixed" / "adapter_model.safetensors").exists(), fixed.stderr
    refused = CliRunner().invoke(main, ["check", str(quantized_base), "--base", str(dequantized)])
    assert refused.exit_code == 2 and refused.stderr.endswith(
        f"{quantized_base}: quantized weights ({DOWN_PROJ} is {'U8' if bits == 4 else 'I8'}); ftaudit audits "
        "full-precision weights: audit the model before quantization\n")


def broken_description(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(n for n in stored if ".quant_state." in n)
    return {**stored, name: torch.tensor(list(b'{"shape": [64]'), dtype=torch.uint8)}


def without_absmax(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in stored.items() if not n.endswith(".absmax")}


def with_short_codes(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**stored, "m.weight": stored["m.weight"][:-1]}


def in_tiles(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    values, scales, _ = bnb.int8_vectorwise_quant(torch.randn(64, 128))
    return {"m.weight": values, "m.SCB": scales, "m.weight_format": torch.tensor(1, dtype=torch.uint8)}


def with_short_scales(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    values, scales, _ = bnb.int8_vectorwise_quant(torch.randn(64, 128))
    return {"m.weight": values, "m.SCB": scales[:-1]}


@pytest.mark.parametrize(("broken", "message"), [
    (broken_description, "m.weight.quant_state.bitsandbytes__nf4 is not the JSON description of a 4-bit matrix"),
    (without_absmax, "m.weight: its 4-bit absmax is missing, not 128 values of U8 for a [64, 128] matrix in blocks of 64"),
    (with_short_codes, "m.weight: its 4-bit weight is U8 [4095, 1], not 4096 values of U8 for a [64, 128] matrix"),
    (in_tiles, "m.weight is stored in a GPU tile layout (weight_format 1), not row by row: pass the full-precision base"),
    (with_short_scales, "m.SCB F32 [63] scales no 8-bit matrix: m.weight is I8 [64, 128]"),
])
def test_a_4bit_base_whose_parts_do_not_fit_is_refused_in_one_line(tmp_path, broken, message):
    torch.manual_seed(0)
    stored, _ = quantized(torch.randn(64, 128, dtype=torch.bfloat16), "nf4", True, 64)
    for side in ("base", "tuned"):
        (tmp_path / side).mkdir()
    save_file(broken(stored), tmp_path / "base" / "model.safetensors")
    save_file({"m.weight": torch.randn(64, 128, dtype=torch.bfloat16)}, tmp_path / "tuned" / "model.safetensors")
    result = CliRunner().invoke(main, ["check", str(tmp_path / "tuned"), "--base", str(tmp_path / "base")])
    assert result.exit_code == 2 and result.stderr.startswith("ftaudit: error: ") and message in result.stderr, (
        result.stderr)
    assert len(result.stderr.splitlines()) == 1
