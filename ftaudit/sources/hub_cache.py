"""A Hub repository's snapshot in the local Hugging Face cache, opened in offline mode (HF_HUB_OFFLINE)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name

from ftaudit.errors import NotFoundError
from ftaudit.sources.checkpoint import PICKLE_SUFFIXES, MissingShardError, find_weight_files, is_training_state
from ftaudit.sources.hub import COMMIT_SHA
from ftaudit.sources.local import LocalStorage

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def cached_snapshot(repo_id: str, revision: str | None) -> tuple[str, LocalStorage]:
    """The commit sha of `repo_id` at `revision` (a branch, tag or sha; default main) as the cache last saw it, and
    its snapshot folder; NotFoundError when the cache does not hold it whole, or when its ref names no commit sha (a
    ref holds what a server's X-Repo-Commit said, and must not lead out of the repo's snapshots).

    A snapshot of files fetched one by one (a card, a config.json) has no file listing to tell what it lacks: one
    that holds no weights file, or whose shard index names a file it lacks, is taken as partial too."""
    wanted = f"{repo_id}@{revision or 'main'}"
    cache = Path(constants.HF_HUB_CACHE).expanduser().resolve()
    partial = NotFoundError(
        f"{wanted}: only part of it is in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
        "download it whole first, or unset HF_HUB_OFFLINE"
    )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache))
    except IncompleteSnapshotError:
        raise partial from None
    except LocalEntryNotFoundError:
        raise NotFoundError(
            f"{wanted}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: "
            "download it first, or unset HF_HUB_OFFLINE"
        ) from None
    commit = os.path.relpath(folder, cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots")
    if not COMMIT_SHA.fullmatch(commit):
        raise NotFoundError(
            f"{wanted}: the Hugging Face cache names commit {commit!r} for it, which is not a commit sha "
            "(40 hex digits): download it again, or unset HF_HUB_OFFLINE"
        )
    if not any(path.name.endswith(WEIGHT_SUFFIXES) and not is_training_state(path.name) for path in folder.rglob("*")):
        raise partial
    storage = LocalStorage(folder, label=f"{repo_id}@{folder.name[:12]} (Hugging Face cache)")
    try:
        find_weight_files(storage)
    except MissingShardError:  # the shard index was fetched, not every shard it names: a download cut short
        raise partial from None
    return folder.name, storage
