"""ftaudit's own open pull request on a Hub model repo for an audited commit: found, so that a push run again (a CI
job re-run, a webhook delivered twice) updates it, or leaves it as it is, instead of opening another."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from huggingface_hub import Discussion, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError

from ftaudit import frontmatter
from ftaudit.cardfile import KEY

log = logging.getLogger("ftaudit")
T = TypeVar("T")
TITLE = "ftaudit: "
"""How the title of a pull request ftaudit opens begins (the title is the message of its commit)."""
TIMESTAMP = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
"""A report's `created_at`, as the files show it."""


class Read(Protocol):
    """Runs one Hub read, with retries; `what` names what it reads in its failure's message."""

    def __call__(self, fn: Callable[[], T], what: str) -> T: ...


@dataclass(frozen=True)
class OpenPullRequest:
    num: int
    url: str
    ref: str  # refs/pr/N, where commits to it go
    head: str  # the commit refs/pr/N points at
    readme: str  # README.md at `head`


def find(
    api: HfApi, repo: str, sha: str, branch: str, heads: Mapping[str, str], read: Read
) -> OpenPullRequest | None:
    """The newest open pull request on `repo` into `branch` that ftaudit opened for an audit of commit `sha`, with a
    token of the user of this one: its title is ftaudit's, its author this token's user, its card's `ftaudit` key
    records `sha` as the audited revision and its target is `branch`. `heads` maps the repo's pull-request refs to
    their commits. None without a token (no push can be made then), or when the Hub refuses to list the pull requests
    (a warning says so)."""
    listed = read(lambda: _pull_requests(api, repo), "pull requests")
    candidates = sorted(
        (pr for pr in listed if pr.is_pull_request and pr.status in ("open", "draft")
         and pr.title.startswith(TITLE) and pr.git_reference in heads),
        key=lambda pr: pr.num, reverse=True,
    )
    if not candidates or (api.token or get_token()) is None:
        return None
    user = read(lambda: api.whoami()["name"], "the token's user")
    for pr in candidates:
        ref = pr.git_reference
        if pr.author != user or ref is None:
            continue
        head = heads[ref]
        readme = _text(read(lambda: file_at(api, repo, "README.md", head), f"README.md of pull request #{pr.num}"))
        if readme is None or _audited_revision(readme) != sha:
            continue
        target = read(lambda: api.get_discussion_details(repo, pr.num).target_branch, f"pull request #{pr.num}")
        if (target or "").removeprefix("refs/heads/") == branch:
            return OpenPullRequest(pr.num, pr.url, ref, head, readme)
    return None


def _pull_requests(api: HfApi, repo: str) -> list[Discussion]:
    """The repo's pull requests, of every status (the Hub's filter `open` might leave out a draft, which a pull request
    can be); none, with a warning, when the Hub refuses to list them (a token that may push but not read the
    discussions, a repo whose discussions are turned off)."""
    try:
        return list(api.get_repo_discussions(repo, discussion_type="pull_request"))
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status not in (403, 404):
            raise
    log.warning("%s: the Hub refused to list its pull requests (HTTP %d): ftaudit's own pull request for this commit "
                "is not looked for", repo, status)
    return []


def holds(api: HfApi, repo: str, pr: OpenPullRequest, files: Mapping[str, str], created_at: str, read: Read) -> bool:
    """Whether `pr` already holds `files` as they are, but for the time of the audit (`created_at`), which every run
    changes."""
    for path, text in files.items():
        now = pr.readme if path == "README.md" else _text(
            read(lambda: file_at(api, repo, path, pr.head), f"{path} of pull request #{pr.num}"))
        if now is None or not _same(now, text, created_at):
            return False
    return True


def file_at(api: HfApi, repo: str, path: str, revision: str) -> bytes | None:
    """The file `path` of `repo` at `revision`, byte for byte; None when there is none. Read through a temporary folder,
    not the Hugging Face cache, which a push has no need to write (and a read-only home could not take)."""
    with tempfile.TemporaryDirectory(prefix="ftaudit-") as folder:
        try:
            local = api.hf_hub_download(repo, path, revision=revision, local_dir=folder)
        except RemoteEntryNotFoundError:
            return None
        return Path(local).read_bytes()


def _text(data: bytes | None) -> str | None:
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _audited_revision(readme: str) -> object:
    data = frontmatter.read(readme).get(KEY)
    return data.get("revision") if isinstance(data, dict) else None


def _same(old: str, new: str, created_at: str) -> bool:
    """`old` is `new` with any timestamp where `new` has `created_at`."""
    if not created_at or created_at not in new:
        return old == new
    return re.fullmatch(TIMESTAMP.join(map(re.escape, new.split(created_at))), old) is not None
