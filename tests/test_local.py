"""Local folders whose files cannot be read give a one-line error naming the file, never an internal error."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.invoke import run, run_unprivileged
from tests.models import card, llama_like, low_rank_update, trainer_run, write_model, write_trainer_state


def check_unprivileged(*args: object) -> subprocess.CompletedProcess[str]:
    """`ftaudit check` in a process that file permissions apply to (root without its override capabilities)."""
    return run_unprivileged("check", *args, "--no-cache")


@pytest.mark.parametrize("pickle", [False, True])
def test_an_unreadable_weights_file_is_a_one_line_error(tmp_path, pickle):
    base = llama_like()
    write_model(tmp_path / "base", base)
    tuned = tmp_path / "tuned"
    if pickle:
        tuned.mkdir()
        torch.save(low_rank_update(base), tuned / "pytorch_model.bin")
        weights = tuned / "pytorch_model.bin"
    else:
        weights = write_model(tuned, low_rank_update(base)) / "model.safetensors"
    weights.chmod(0)
    try:
        result = check_unprivileged(tuned, "--base", tmp_path / "base", "--allow-pickle")
    finally:
        weights.chmod(0o644)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"ftaudit: error: {tuned}/{weights.name}: cannot read (Permission denied)"


def test_an_unreadable_folder_is_a_one_line_error(tmp_path):
    write_model(tmp_path / "base", llama_like())
    tuned = write_model(tmp_path / "tuned", low_rank_update(llama_like()))
    tuned.chmod(0)
    try:
        result = check_unprivileged(tuned, "--base", tmp_path / "base")
    finally:
        tuned.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read (Permission denied)" in result.stderr


def test_a_folder_whose_list_of_files_may_not_be_read_says_so(tmp_path):
    """Its files can be opened by name (config.json, README.md) but not listed: not a folder without weights."""
    base = write_model(tmp_path / "base", llama_like())
    tuned = write_model(tmp_path / "tuned", low_rank_update(llama_like()), readme=card(str(base)))
    tuned.chmod(0o311)
    try:
        result = check_unprivileged(tuned)
    finally:
        tuned.chmod(0o755)
    assert (result.returncode, result.stderr) == (2, f"ftaudit: error: {tuned}: cannot read (Permission denied)\n")


def test_a_link_into_a_folder_that_may_not_be_searched_is_read_only_when_needed(tmp_path):
    """A file of the model folder that cannot be looked at (a tokenizer linked from a locked folder): no matter to an
    audit, which does not read it; `fix`, which copies it, says it cannot read it, rather than leave it out."""
    base = write_model(tmp_path / "base", llama_like())
    tuned = write_model(tmp_path / "tuned", low_rank_update(llama_like()), readme=card(str(base)))
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "tokenizer.json").write_text("{}")
    (tuned / "tokenizer.json").symlink_to(locked / "tokenizer.json")
    locked.chmod(0)
    try:
        audited = check_unprivileged(tuned)
        fixed = run_unprivileged("fix", tuned, "--out", tmp_path / "fixed")
    finally:
        locked.chmod(0o755)
    assert (audited.returncode, audited.stderr) == (1, "")
    assert (fixed.returncode, fixed.stderr) == (2, f"ftaudit: error: {tuned}/tokenizer.json: cannot read (Permission "
                                                   "denied)\n")
    assert not (tmp_path / "fixed").exists()


def test_a_path_through_a_folder_that_may_not_be_searched_is_a_one_line_error(tmp_path):
    """Not taken for a Hub repo id, nor an internal error: the folder on the way says why."""
    base = write_model(tmp_path / "base", llama_like())
    locked = tmp_path / "locked"
    tuned = write_model(locked / "tuned", low_rank_update(llama_like()), readme=card(str(base)))
    locked.chmod(0o600)
    try:
        as_model = check_unprivileged(tuned)
        as_base = check_unprivileged(base, "--base", tuned)
        as_output = check_unprivileged(write_model(tmp_path / "open", low_rank_update(llama_like()),
                                                   readme=card(str(base))), "--json", locked / "r.json")
    finally:
        locked.chmod(0o755)
    for result in (as_model, as_base):
        assert (result.returncode, result.stderr) == (2, f"ftaudit: error: {tuned}: cannot read (Permission denied)\n")
    assert (as_output.returncode, as_output.stderr) == (
        2, f"ftaudit: error: {locked / 'r.json'}: cannot write (Permission denied)\n")


def test_a_file_that_shrinks_while_it_is_read_is_a_one_line_error_naming_it_once(tmp_path):
    from ftaudit.errors import InvalidWeightsError
    from ftaudit.sources.checkpoint import Checkpoint
    from ftaudit.sources.local import LocalStorage

    weights = write_model(tmp_path / "model", llama_like()) / "model.safetensors"
    checkpoint = Checkpoint(LocalStorage(tmp_path / "model"), ["model.safetensors"])
    last = max(checkpoint.tensors.values(), key=lambda ref: ref.info.end).info
    os.truncate(weights, last.end - 4)  # rewritten meanwhile, say by a training run saving a checkpoint
    with pytest.raises(InvalidWeightsError) as raised:
        checkpoint.load(last.name)
    assert str(raised.value) == (f"{weights}: file ends before byte {last.end}: it has changed since its header was "
                                 "read; run again once nothing writes it")


def test_a_training_runs_state_is_not_taken_for_pickled_weights(tmp_path):
    """A checkpoint folder whose weights are elsewhere (FSDP's shards, say): its optimizer.pt and training_args.bin
    are not the model's weights, with or without --allow-pickle."""
    write_model(tmp_path / "base", llama_like(layers=1))
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    (folder / "README.md").write_text(card(str(tmp_path / "base")))
    write_trainer_state(folder)
    for extra in ([], ["--allow-pickle"]):
        code, _, stderr = run("check", folder, *extra)
        assert (code, stderr) == (2, f"ftaudit: error: {folder}: no weights found (no .safetensors or pickle files)\n")


def test_weights_only_in_subfolders_are_named_when_none_are_at_the_top_level(tmp_path):
    """A Trainer's output folder before its final save: the weights are in its checkpoint folders, which an audit of
    the folder does not read."""
    run_dir = trainer_run(tmp_path / "run", llama_like(layers=1), save_model=False)
    code, _, stderr = run("check", run_dir, "--base", run_dir / "checkpoint-1")
    assert (code, stderr) == (2, f"ftaudit: error: {run_dir}: no weights found (no .safetensors or pickle files at "
                                 "its top level; subfolders are not read: checkpoint-1/model.safetensors and 1 more)\n")
