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
    report.pop("created_at")  # the time of the audit
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


def untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` fine-tuned with the head untied from the embedding: a head of its own, the embedding's values with
    intruders (as `tuned`, the attention's matrices too)."""
    head = low_rank_update({"lm_head.weight": weights[WTE].clone()}, seed=3, only="lm_head")
    return {**tuned(weights), **head}


@pytest.mark.parametrize("stores_none", ["base", "model"])
def test_a_head_that_one_side_ties_and_stores_not_is_its_embedding(tmp_path, stores_none):
    """A model untied from its tied base (tie_word_embeddings true, no lm_head stored, as transformers saves it), or
    the reverse: what transformers loads as the head of the side that stores none is its embedding, which the other's
    head is compared with. The head had been missing on that side, and not measured at all unless selected."""
    weights, config = gpt2(tmp_path)
    own = saved(tmp_path / "own", untied(weights), config, tie=False)
    tied = saved(tmp_path / "tied", weights if stores_none == "base" else tuned(weights), config)
    model, base = (own, tied) if stores_none == "base" else (tied, own)
    report = audit(model, base, "--include", "head")
    assert report["tensors"]["tied_heads"] == [{"name": "lm_head.weight", "side": stores_none, "embedding": WTE}]
    assert report["tensors"]["missing_in_base"] == report["tensors"]["missing_in_model"] == []
    head = next(m for m in report["matrices"] if m["name"] == "lm_head.weight")
    assert head["indicators"]["relative_update_norm"] > 0.5  # the head's own update, not the embedding's
    # the same numbers as where that side stores its embedding's values as a head of its own
    copy = saved(tmp_path / "copy", load_file(tied / "model.safetensors"), config, "copy", False)
    other = audit(*((model, copy) if stores_none == "base" else (copy, base)), "--include", "head")
    assert other["tensors"]["tied_heads"] == []
    assert other["matrices"] == report["matrices"] and other["summary"] == report["summary"]
    assert "lm_head.weight" in audit(model, base)["summary"]["heads"]  # measured for its row norms by default
    code, out, _ = run("check", model, "--base", base, "--no-cache")
    assert code in (0, 1)
    assert f"  tied heads: the {stores_none} stores no lm_head.weight: its input embedding {WTE}, tied to it " \
           "(tie_word_embeddings), is compared in its place\n" in out


def test_fix_scales_the_intruders_of_a_head_untied_from_its_base(tmp_path):
    """The head of a model untied from its tied base is patched against the base's embedding, and written as its
    own; a model that ties its head (stores none) against an untied base keeps it tied, the embedding's, saying so."""
    weights, config = gpt2(tmp_path)
    own = saved(tmp_path / "own", untied(weights), config, tie=False)
    tied = saved(tmp_path / "tied", weights, config)
    code, _, err = run("fix", own, "--base", tied, "--include", "head", "--out", tmp_path / "fixed", "--json",
                       tmp_path / "fix.json", "--no-cache")
    assert code in (0, 1), err
    record = json.loads((tmp_path / "fix.json").read_text())
    assert {"name": "lm_head.weight", "side": "base", "embedding": WTE} in record["after"]["tensors"]["tied_heads"]
    assert "lm_head.weight" in {c["name"] for c in record["changes"]}
    before, after = load_file(own / "model.safetensors"), load_file(tmp_path / "fixed" / "model.safetensors")
    assert sorted(after) == sorted(before) and not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after[WTE], before[WTE])
    norms = [{m["name"]: m["indicators"]["relative_update_norm"] for m in record[side]["matrices"]}["lm_head.weight"]
             for side in ("before", "after")]
    assert norms[1] < norms[0]

    code, _, err = run("fix", tied, "--base", own, "--include", "head", "--epsilon", "0.9", "--out", tmp_path / "kept",
                       "--json", tmp_path / "kept.json", "--no-cache")
    assert code in (0, 1), err
    record = json.loads((tmp_path / "kept.json").read_text())
    assert {m["name"]: m["intruders"] for m in record["before"]["matrices"]}["lm_head.weight"] > 0
    assert "lm_head.weight" not in {c["name"] for c in record["changes"]}
    assert "lm_head.weight" not in load_file(tmp_path / "kept" / "model.safetensors")
    assert err == f"ftaudit: WARNING: lm_head.weight, which the model stores as its input embedding {WTE} " \
        "(tie_word_embeddings), is left as it is: scaling its intruders would change the embedding too\n"


def test_merge_joins_the_shards_tied_heads_and_refuses_shards_that_disagree(tmp_path):
    """Every shard of an audit records the heads compared with a tied embedding; merge keeps them, and refuses a shard
    that records others."""
    weights, config = gpt2(tmp_path)
    own = saved(tmp_path / "own", untied(weights), config, tie=False)
    tied = saved(tmp_path / "tied", weights, config)
    shards = [tmp_path / f"r{i}.json" for i in (1, 2)]
    for i, shard in enumerate(shards, 1):
        code, _, err = run("check", own, "--base", tied, "--include", "head", "--no-cache", "--shard", f"{i}/2",
                           "--json", shard)
        assert code in (0, 1), err
    code, out, err = run("merge", *shards, "--format", "json")
    assert code in (0, 1), err
    expected = [{"name": "lm_head.weight", "side": "base", "embedding": WTE}]
    assert json.loads(out)["tensors"]["tied_heads"] == expected
    edited = json.loads(shards[1].read_text())
    edited["tensors"]["tied_heads"] = []
    shards[1].write_text(json.dumps(edited))
    code, _, err = run("merge", *shards)
    assert code == 2 and err == f"ftaudit: error: shards 1/2 ({shards[0]}) and 2/2 ({shards[1]}) differ in their " \
        "tensors: they are not shards of one audit\n", err


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(("top", "text"), [(False, True), (True, False), (None, True), (False, None), (True, None),
                                           (None, False), (False, False)])
def test_tie_word_embeddings_of_a_multimodal_config_is_read_as_transformers_reads_it(tmp_path, model_type, top, text):
    """Top level and text_config: transformers 4 saved a multimodal model's in its text_config only, transformers 5
    at the top level, and reads the model as tied where either says so."""
    transformers = pytest.importorskip("transformers")
    from ftaudit.base import architecture_of
    from ftaudit.sources.local import LocalStorage

    text_config = {"model_type": "llama" if model_type == "llava" else "qwen2_vl_text",
                   **({} if text is None else {"tie_word_embeddings": text})}
    config = {"model_type": model_type, "text_config": text_config, **({} if top is None else {"tie_word_embeddings": top})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = transformers.AutoConfig.from_pretrained(tmp_path).tie_word_embeddings
    assert architecture_of(LocalStorage(tmp_path)).tied_embeddings is expected


@pytest.mark.parametrize(("changed", "pieces"), [(None, [800, 1600, 3200, 3200, 3200, 800]),
                                                 (-1, [800, 1600, 3200, 3200, 3200, 800]), (0, [800])])
def test_a_stored_head_is_compared_with_its_embedding_a_piece_at_a_time(tmp_path, monkeypatch, changed, pieces):
    """A copy of the embedding, one that differs in its last value, or in its first (the pieces after it unread):
    pieces twice the last, up to a cap."""
    from ftaudit.sources import open_weights
    from ftaudit.sources import tied
    from ftaudit.sources.local import LocalStorage

    weights, config = gpt2(tmp_path)  # an embedding of 50 × 64 float32: 12,800 bytes
    head = weights[WTE].clone()
    if changed is not None:
        head.view(-1)[changed] += 1
    save_file({**weights, "lm_head.weight": head}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = open_weights(LocalStorage(tmp_path))
    monkeypatch.setattr(tied, "FIRST_COMPARED", 800)
    monkeypatch.setattr(tied, "COMPARED_BYTES", 3200)
    read = checkpoint.read_stored
    calls: list[int] = []
    monkeypatch.setattr(checkpoint, "read_stored", lambda name, start, length: calls.append(length) or read(
        name, start, length))
    copies = tied.stored_copies(checkpoint, None, "m")
    assert copies == ({"lm_head.weight": WTE} if changed is None else {})
    assert calls == [length for piece in pieces for length in (piece, piece)]  # the head's, then the embedding's


def test_a_side_with_no_config_json_stores_no_head_its_embedding_is_not_compared_in_its_place(tmp_path):
    """Bare weights without a head say nothing of a tie: their model may have no head at all (a body saved alone),
    so the other side's head is missing there, not compared with an embedding it may not be tied to."""
    weights, config = gpt2(tmp_path)
    own = saved(tmp_path / "own", untied(weights), config, tie=False)
    bare = saved(tmp_path / "bare", weights, config)
    (bare / "config.json").unlink()
    report = audit(own, bare, "--include", "head")
    assert report["tensors"]["tied_heads"] == [] and report["tensors"]["missing_in_base"] == ["lm_head.weight"]
    (bare / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tie_word_embeddings"}))
    assert audit(own, bare, "--include", "head")["tensors"]["tied_heads"] == [  # unsaid in a config.json: tied
        {"name": "lm_head.weight", "side": "base", "embedding": WTE}]
