"""Output heads tied to the input embedding (config.json's tie_word_embeddings), on real checkpoints written here: a
GPT-2 that transformers makes and saves, whose head and config.json are then stored as other tools store them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.invoke import json_report, run
from tests.models import low_rank_update, small_update

WTE = "transformer.wte.weight"


def gpt2(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The weights and config.json of a small GPT-2 as transformers saves it (tie_word_embeddings: true, lm_head
    stored as its embedding alone)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=1, n_head=4, vocab_size=50, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    weights = load_file(tmp_path / "gpt2" / "model.safetensors")
    assert "lm_head.weight" not in weights
    return weights, json.loads((tmp_path / "gpt2" / "config.json").read_text())


def tuned(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` fine-tuned: intruders in the attention's matrices, a small change everywhere else."""
    return low_rank_update(small_update(weights), only="c_attn.weight")


def saved(folder: Path, weights: dict[str, torch.Tensor], config: dict[str, object], head: str | None = None,
          tie: bool | None = True) -> Path:
    """`weights` and `config` written to `folder`, with an lm_head.weight that is a `copy` of the embedding, `other`
    values, or none, and config.json's tie_word_embeddings `tie` (None: left out, as transformers 4 saves it where
    it is true)."""
    folder.mkdir()
    weights = dict(weights)
    if head is not None:
        embedding = weights[WTE]
        weights["lm_head.weight"] = embedding.clone() if head == "copy" else torch.randn_like(embedding)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in config.items() if k != "tie_word_embeddings"}
    (folder / "config.json").write_text(json.dumps({**config, **({} if tie is None else {"tie_word_embeddings": tie})}))
    return folder


def audit(model: Path, base: Path, *options: str) -> dict:
    """The JSON report of `model` audited against `base`, its ids left out."""
    report = json_report("check", model, "--base", base, "--format", "json", "--no-cache", *options)
    for side in ("model", "base"):
        report[side].pop("id")
        report[side].pop("fingerprint")
    report.pop("audited_at", None)
    return report


@pytest.mark.parametrize("side", ["model", "base"])
def test_a_head_stored_as_a_copy_without_tie_word_embeddings_is_its_embedding(tmp_path, side):
    """transformers 4 leaves tie_word_embeddings out of config.json where it is true, PretrainedConfig's default, and
    its pickles store a tied head under both names: such a copy is the embedding, as where config.json says true. It
    had been a matrix of its own, missing on the other side."""
    weights, config = gpt2(tmp_path)
    sides = {"model": tuned(weights), "base": weights}
    stored = {"model": tmp_path / "model", "base": tmp_path / "base"}
    for name, tensors in sides.items():
        saved(stored[name], tensors, config, *(("copy", None) if name == side else ()))
    report = audit(stored["model"], stored["base"], "--include", "embedding")
    assert "lm_head.weight" not in json.dumps(report["tensors"]) + json.dumps(report["summary"]["heads"])
    assert WTE in {m["name"] for m in report["matrices"]}
    said_true = saved(tmp_path / "said", sides[side], config, "copy", True)
    other = {**stored, side: said_true}
    assert report == audit(other["model"], other["base"], "--include", "embedding")


def test_a_head_of_its_own_without_tie_word_embeddings_is_a_matrix_unsaid(tmp_path):
    """A head stored with other values than the embedding, config.json not saying whether they are tied: two
    matrices, and no warning (one said tied is warned about)."""
    weights, config = gpt2(tmp_path)
    base = saved(tmp_path / "base", weights, config, "other", None)
    model = saved(tmp_path / "model", tuned(load_file(base / "model.safetensors")), config, tie=None)
    code, out, err = run("check", model, "--base", base, "--format", "json", "--include", "head", "--no-cache")
    assert code in (0, 1) and err == "", err
    assert "lm_head.weight" in {m["name"] for m in json.loads(out)["matrices"]}


def test_a_copy_of_the_embedding_said_untied_is_a_matrix_of_its_own(tmp_path):
    """tie_word_embeddings: false keeps a head of the embedding's values apart, as transformers loads it."""
    weights, config = gpt2(tmp_path)
    base = saved(tmp_path / "base", weights, config, "copy", False)
    model = saved(tmp_path / "model", tuned(load_file(base / "model.safetensors")), config, tie=False)
    report = audit(model, base, "--include", "head")
    assert "lm_head.weight" in {m["name"] for m in report["matrices"]}
