"""Publishing an audit: the model-card update on the audited Hub repo, and GitHub Actions outputs."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, GitRefs, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from ftaudit import pull_request
from ftaudit.cardfile import card_data_from_report, update_card
from ftaudit.errors import AccessError, FtauditError, NetworkError, NotFoundError, UsageError
from ftaudit.renderers.card import BADGE, BADGE_JSON, HEATMAP, render_card_section, repo_files
from ftaudit.renderers.markdown import render_job_summary, status_headline
from ftaudit.report import Report
from ftaudit.secrets import mask_shapes
from ftaudit.sources.hub import bound_session, check_env_token, endpoint, with_retries

T = TypeVar("T")
MODES = ("pr", "commit")
COMMIT_PATH = re.compile(r"/commit/[^/]+$")  # the request that makes the commit or pull request (not preupload)


@dataclass(frozen=True)
class Pushed:
    """What a push did on the Hub: `action` is "opened", "updated" or "unchanged" (a pull request, at `url`), or
    "committed" (the commit at `url`)."""

    url: str
    action: str
    left_open: pull_request.OpenPullRequest | None = None  # ftaudit's pull request for the commit, when committed

    def __str__(self) -> str:
        said = {
            "opened": "pull request opened",
            "updated": "pull request updated (the one open for this commit)",
            "unchanged": "pull request left as it is (the one open for this commit already holds this audit)",
            "committed": "committed",
        }
        line = f"{said[self.action]}: {self.url}"
        if self.left_open is not None:
            line += (f"; pull request #{self.left_open.num} for this commit is still open: close it unless it holds "
                     f"edits to keep: {self.left_open.url}")
        return line


@dataclass(frozen=True)
class _Change:
    """What a write makes, for the messages of its failures."""

    made: str  # what the Hub may have done when the answer was lost
    then: str  # what to do then
    moved: str  # what HTTP 412 means: the commit's parent is no longer the head of its ref
    create_pr: bool = False  # whether the write opens a pull request


def push_card(
    report: Report, *, token: str | None, mode: str = "pr", badge: bool = True, heatmap: bool = True
) -> Pushed:
    """Put the audit on the audited Hub repo: a pull request (mode "pr") or a commit ("commit").

    The change is README.md (the card section and front-matter key, through `update_card`; a new card if there is
    none) and the badge and heatmap files under `ftaudit/`, based on the audited commit, which must still be the head
    of a branch: the pull request targets that branch, or the commit goes onto it. A pull request that ftaudit opened
    for the same commit into that branch and that is still open (`pull_request.find`) is updated instead, or left as
    it is when it already holds the change; a commit leaves it open, and `Pushed.left_open` names it.
    """
    if mode not in MODES:
        raise UsageError(f"--push-mode must be one of {', '.join(MODES)}, not {mode!r}")
    repo, sha = report.model.id, report.model.revision
    if sha is None:
        raise UsageError("--push needs a Hub repository")
    api = HfApi(endpoint=endpoint(), token=token)
    check_env_token(token)
    bound_session()
    label = f"{repo}@{sha[:12]}"

    def read(fn: Callable[[], T], what: str) -> T:
        return _read(fn, repo, label, what)

    refs = read(lambda: api.list_repo_refs(repo, include_pull_requests=True), "branch list")
    branch = _branch_at(refs, repo, sha)
    files = repo_files(report, [*([BADGE, BADGE_JSON] if badge else []), *([HEATMAP] if heatmap else [])])
    section = render_card_section(
        report, badge_path=BADGE if badge else None, heatmap_path=HEATMAP if heatmap else None
    )
    data = card_data_from_report(report)
    heads = {pr.ref: pr.target_commit for pr in refs.pull_requests or []}
    own = pull_request.find(api, repo, sha, branch, heads, read)
    if mode == "commit" or own is None:
        files["README.md"] = update_card(read(lambda: _readme(api, repo, sha), "README.md"), section, data)
        info = _commit(api, report, files, branch, sha, _OPENING if mode == "pr" else _COMMITTING)
        if mode == "pr":
            return Pushed(info.pr_url or info.commit_url, "opened")
        return Pushed(info.commit_url, "committed", own)
    files["README.md"] = update_card(own.readme, section, data)  # edits made in the pull request stay
    if pull_request.holds(api, repo, own, files, report.created_at, read):
        return Pushed(own.url, "unchanged")
    _commit(api, report, files, own.ref, own.head, _Change(
        f"updated pull request #{own.num}", "push again, which leaves it as it is if it holds the change",
        f"pull request #{own.num} changed while the card was pushed: push again"))
    return Pushed(own.url, "updated")


_OPENING = _Change(
    "opened the pull request", "push again, which finds it rather than opening another",
    "the branch moved on while the card was pushed: audit the new revision, then push", create_pr=True)
_COMMITTING = _Change(
    "made it", "look at the repo's commits before pushing again (a second push could make a duplicate)",
    _OPENING.moved)


def _commit(api: HfApi, report: Report, files: dict[str, str], revision: str, parent: str, change: _Change) -> CommitInfo:
    """Commit `files` onto `revision` (a branch, or a pull request's ref) whose head is `parent`, or open a pull request
    against it (`change.create_pr`). The upload before it (the Hub says how each file goes, and any for Git LFS goes
    up) writes nothing to the repo: it is retried as the reads are."""
    repo = report.model.id
    operations = [CommitOperationAdd(path, text.encode()) for path, text in files.items()]

    def commit() -> CommitInfo:
        with_retries(
            lambda: api.preupload_lfs_files(repo, additions=operations, revision=revision, create_pr=change.create_pr),
            f"{repo}@{(report.model.revision or '')[:12]}", "upload of the card's files",
            lambda e: _error(e, repo, writing=True),
        )
        return api.create_commit(  # uploads nothing more: each file's way up is known
            repo,
            operations,
            commit_message=f"{pull_request.TITLE}{status_headline(report)}",
            commit_description=(
                f"Fine-tuning audit of {report.model.revision} against {mask_shapes(report.base.id)}, "
                f"by ftaudit {report.tool.get('version', '')}: "
                "the ftaudit section and metadata of the model card, its badge and heatmap."
            ),
            revision=revision,
            create_pr=change.create_pr,
            parent_commit=parent,
        )

    return _write(commit, repo, change)


def write_github_outputs(report: Report, report_path: Path | None, env: Mapping[str, str] = os.environ) -> None:
    """Append the step outputs (status, risk, intruders, report) to $GITHUB_OUTPUT and the job summary to
    $GITHUB_STEP_SUMMARY, each only when the variable is set."""
    if output := env.get("GITHUB_OUTPUT"):
        values = {
            "status": report.verdict.status,
            "risk": report.summary.risk,
            "intruders": str(report.summary.intruder_dimensions),
            "report": "" if report_path is None else str(report_path),
        }
        _append(output, "".join(_output_line(name, value) for name, value in values.items()))
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        _append(summary, render_job_summary(report).rstrip("\n") + "\n")


def _output_line(name: str, value: str) -> str:
    """`name=value`, or GitHub's delimited form for a value that spans lines (it could forge other outputs)."""
    if "\n" not in value and "\r" not in value:
        return f"{name}={value}\n"
    delimiter = f"ghadelimiter_{uuid.uuid4()}"
    return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def _append(path: str, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(mask_shapes(text))
    except OSError as e:
        raise UsageError(f"{path}: cannot write GitHub Actions output ({e.strerror})") from None


def _branch_at(refs: GitRefs, repo: str, sha: str) -> str:
    """The branch whose head is the audited commit (main if several are)."""
    heads = [b.name for b in refs.branches if b.target_commit == sha]
    if not heads:
        raise UsageError(
            f"{repo}: the audited commit {sha[:12]} is not the head of any branch (it has moved on since): "
            "audit the current revision, then push"
        )
    return "main" if "main" in heads else heads[0]


def _readme(api: HfApi, repo: str, sha: str) -> str:
    """README.md at the audited commit, line endings untouched (text mode would turn CRLF into LF on every line);
    empty when the repo has none."""
    data = pull_request.file_at(api, repo, "README.md", sha)
    try:
        return "" if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{repo}/README.md: the card is not UTF-8 text") from None


def _read(fn: Callable[[], T], repo: str, label: str, what: str) -> T:
    """Run one Hub read with the audit's retries (HTTP 429 and 5xx, dropped connections, timeouts), mapping its
    failures to ftaudit errors (whose messages never hold the token)."""
    return with_retries(fn, label, what, lambda e: _error(e, repo, writing=False))


def _write(fn: Callable[[], T], repo: str, change: _Change) -> T:
    """Make the commit or pull request, once: a retry after a lost answer could make a second one. A failure says
    whether anything was written, where that can be known."""
    try:
        return fn()
    except FtauditError:
        raise
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 412:
            raise NetworkError(f"{repo}: {change.moved}") from None
        if status is None or status < 500:
            raise _error(e, repo, writing=True) from None
        failure, sent = f"HTTP {status}", _sent_commit(e)
    except httpx2.RequestError as e:  # no answer, or one that cannot be used (a redirect loop, say)
        never_connected = isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout))
        failure, sent = f"{type(e).__name__} from {endpoint()}", not never_connected and _sent_commit(e)
    except ValueError as e:  # the Hub refused the card's metadata, before any commit
        raise UsageError(f"{repo}: {e}") from None
    if not sent:
        raise NetworkError(f"{repo}: the push failed ({failure}); nothing was written: run again later")
    raise NetworkError(
        f"{repo}: the push failed ({failure}) after the change was sent, so the Hub may have {change.made}: "
        f"{change.then}"
    )


def _sent_commit(e: HfHubHTTPError | httpx2.RequestError) -> bool:
    """Whether the failed request was the one that makes the commit (True when that cannot be told)."""
    try:
        request = e.response.request if isinstance(e, HfHubHTTPError) else e.request
    except (AttributeError, RuntimeError):  # no request recorded
        return True
    path = request.url.raw_path.split(b"?")[0].decode("ascii")  # as sent: a branch's "/" is still %2F there
    return COMMIT_PATH.search(path) is not None


def _error(e: HfHubHTTPError, repo: str, writing: bool) -> FtauditError:
    status = e.response.status_code if e.response is not None else None
    if writing and status in (401, 403):
        return AccessError(
            f"{repo}: the Hub refused the change (HTTP {status}): --push needs a token with WRITE access to {repo} "
            "(a fine-grained token with write permission on the repo, or a token with the write role)"
        )
    if isinstance(e, RevisionNotFoundError):
        return NotFoundError(f"{repo}: the audited revision was not found")
    if isinstance(e, RepositoryNotFoundError):
        return NotFoundError(f"{repo}: no such model repository on {endpoint()}, or the token cannot read it")
    if status in (401, 403):
        return AccessError(f"{repo}: the token may not read this repository (HTTP {status})")
    if writing:
        return NetworkError(f"{repo}: the Hub refused the change (HTTP {status}); nothing was written")
    return NetworkError(f"{repo}: the Hub answered HTTP {status}")
