"""Where tensors come from: a local folder or a Hub repository, opened as one snapshot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftaudit.errors import NotFoundError, UnsupportedError, UsageError
from ftaudit.sources.checkpoint import Checkpoint, find_weight_files, refuse_lfs_pointer
from ftaudit.sources.local import LocalStorage, cannot_read
from ftaudit.sources.pickled import PickleCheckpoint
from ftaudit.sources.storage import Storage


@dataclass(frozen=True)
class Snapshot:
    """One model's files at one revision."""

    id: str
    revision: str | None
    storage: Storage


def open_snapshot(spec: str, revision: str | None, token: str | None, hub_only: bool = False) -> Snapshot:
    """Open `spec` as a local folder if one exists there (unless `hub_only`), else as a Hub model repo id: read from
    the Hub, or in offline mode (HF_HUB_OFFLINE) from the Hugging Face cache.

    The Hub client is imported only for a Hub id, which keeps a local audit's start-up short. An empty `spec` is
    refused: as a path it would name the current folder.
    """
    if not spec:
        raise UsageError("a model named by an empty string: pass a folder or a Hub repository id (org/name)")
    path = Path(spec).expanduser()
    if not hub_only and is_here(path):
        if revision:
            raise UsageError(f"{spec} is a local folder: a revision applies only to Hub repositories")
        return Snapshot(spec, None, LocalStorage(path))
    if not is_repo_id(spec):
        raise NotFoundError(f"{spec}: no such folder, and not a Hub repository id (org/name)")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        from ftaudit.sources.hub_cache import cached_snapshot

        sha, cached = cached_snapshot(spec, revision)
        return Snapshot(spec, sha, cached)
    from ftaudit.sources.hub import HubStorage

    storage = HubStorage(spec, revision, token)
    return Snapshot(spec, storage.sha, storage)


def opens(spec: str, hub_only: bool = False) -> bool:
    """Whether `open_snapshot` can take `spec`: an existing local path (unless `hub_only`) or a valid Hub repo id."""
    return (not hub_only and is_here(Path(spec).expanduser())) or is_repo_id(spec)


def is_here(path: Path) -> bool:
    """Whether `path` is on this machine. A path that a folder on the way does not let be looked at, or a link to
    nothing, is an error (AccessError, NotFoundError), not a Hub repo id; one that no file could have (a name too
    long) is not here."""
    try:
        path.stat()
    except PermissionError as e:
        raise cannot_read(str(path), e) from None
    except (OSError, ValueError):
        if os.path.islink(path):
            raise NotFoundError(f"{path}: a link to nothing (its target is missing, or links lead in a loop)") from None
        return False
    return True


def is_repo_id(spec: str) -> bool:
    """Whether `spec` is a valid Hub repo id (`org/name` or `name`; not a URL)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def open_weights(storage: Storage, stem: str = "model", allow_pickle: bool = False) -> Checkpoint | PickleCheckpoint:
    """The snapshot's weights: safetensors, or pickle files when `allow_pickle` says so."""
    found = find_weight_files(storage, stem)
    if found.format == "safetensors":
        return Checkpoint(storage, found.files, found.weight_map)
    if not allow_pickle:
        refuse_lfs_pointer(storage, found.files[0])  # no pickle to refuse: a file not fetched
        raise UnsupportedError(
            f"{storage.label}: weights are only in pickle files ({found.files[0]}), which can run code when "
            "loaded; pass --allow-pickle to load them with torch.load(weights_only=True)"
        )
    return PickleCheckpoint(storage, found.files)
