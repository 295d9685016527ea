"""A fake of the Hugging Face Hub HTTP API, served on 127.0.0.1 from background threads, for tests.

It answers the calls huggingface_hub makes for model repos: `GET /api/models/{repo}[/revision/{rev}]`,
`GET /api/models/{repo}/refs` and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with single byte ranges), signalling
errors with the status codes and `X-Error-Code` headers the Hub uses, so the client raises the same exception classes.

`HfApi.create_commit` works too: `POST /api/validate-yaml`, `POST /api/models/{repo}/preupload/{rev}` (every file is
told to go as a "regular" upload, inline in the commit, so no LFS or Xet transfer is needed) and
`POST /api/models/{repo}/commit/{rev}[?create_pr=1]` (NDJSON: a header, then `file` / `deletedFile` /
`deletedFolder` lines). A commit moves the branch, or a pull request's `refs/pr/N` (412 if `parentCommit` is not
its head); with `create_pr` it opens pull request N, titled by the commit's summary and authored by the token's user,
on a new `refs/pr/N` from `parentCommit` (or the branch head), and answers a `pullRequestUrl`. Both need a token
added with `write=True` for the repo: no token gets 401, any other token 403.

Discussions and pull requests share one numbering per repo: `GET /api/models/{repo}/discussions` lists them newest
first, a page at a time (`type`, `status` and `author` filter them, `p` is the page), `GET .../discussions/{num}`
answers one (a pull request's target branch too), `POST .../discussions/{num}/status`
closes or reopens one (the repo's writers and its author may) and `POST .../discussions/{num}/merge` merges a pull
request into its branch (writers only). `GET /api/whoami-v2` names the token's user. Every request is logged,
and faults (ignored ranges, error statuses, connections dropped mid-body, delays) can be injected at runtime.

With `redirect_lfs` set, LFS files (weights) are answered like the Hub does: a 302 carrying the file's metadata
(`X-Linked-Size`, `X-Linked-Etag`) to a signed-URL "CDN", a second listener on another port (another origin).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Files stored with Git LFS, as in the Hub's default `.gitattributes`.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")

_API_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/revision/(?P<rev>[^/]+))?")
_RESOLVE_PATH = re.compile(r"/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_REFS_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/refs")
_WRITE_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<action>preupload|commit)/(?P<rev>[^/]+)")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_DISCUSSIONS_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/discussions")
_DETAILS_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/discussions/(?P<num>\d+)")
_DISCUSSION_PATH = re.compile(r"/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/discussions/(?P<num>\d+)/(?P<action>status|merge)")
_CDN_PATH = re.compile(r"/lfs/(?P<sha256>[0-9a-f]{64})")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$", re.DOTALL | re.MULTILINE)
_CHUNK = 1 << 16


@dataclass
class LoggedRequest:
    """One request the server answered."""

    method: str
    path: str  # the request target as sent: percent-encoded, with its query string
    range: str | None  # the Range header
    has_auth: bool  # whether an Authorization header was sent
    status: int
    bytes_sent: int  # body bytes written (0 for HEAD)
    dropped: bool = False  # the connection was closed before the response was complete


@dataclass(frozen=True)
class _Blob:
    data: bytes
    oid: str  # git blob id of what git stores: the content, or the LFS pointer
    sha256: str
    pointer: bytes | None  # the LFS pointer, for LFS files


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _Blob]
    card_data: dict[str, Any] | None
    date: str


@dataclass
class _Discussion:
    num: int
    title: str
    author: str
    created: str
    target: str | None  # the branch a pull request is against; None for a discussion
    status: str = "open"  # open, closed, or (a pull request) merged

    @property
    def is_pull_request(self) -> bool:
        return self.target is not None


@dataclass
class _Repo:
    private: bool
    gated: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)  # pull requests' refs/pr/N too
    commits: dict[str, _Commit] = field(default_factory=dict)
    discussions: dict[int, _Discussion] = field(default_factory=dict)

    def next_number(self) -> int:
        """The number of the next discussion or pull request."""
        prs = (int(m[1]) for name in self.branches if (m := _PR_REF.fullmatch(name)))
        return 1 + max([*self.discussions, *prs], default=0)


@dataclass(frozen=True)
class _Grant:
    repos: frozenset[str]  # private and gated repos the token may read (and, with `write`, commit to)
    write: bool
    user: str


@dataclass
class _Fault:
    remaining: int
    path_contains: str | None
    status: int | None  # None: drop the connection
    method: str | None = None  # None: any method
    headers: dict[str, str] = field(default_factory=dict)  # added to the injected answer
    stall: float = 0.0  # seconds to wait before answering as usual, instead of failing
    cut: bool = False  # answer with half the body, its Content-Length saying so: complete, but short


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Unsatisfiable(Exception):
    """A Range that selects no byte of the file."""


class HubServer:
    """A fake Hugging Face Hub: add repos and tokens, point huggingface_hub at `url` (`endpoint=server.url`).

    Runtime knobs (thread-safe): `ignore_range` (answer Range GETs with 200 and the whole body), `delay`
    (seconds slept before answering each request), `redirect_lfs` (see the module docstring), `page_size`
    (discussions listed a page), `fail_next`, `drop_next`, `cut_next` and `stall_next`.
    """

    def __init__(self) -> None:
        self.requests: list[LoggedRequest] = []
        self.ignore_range = False
        self.delay = 0.0
        self.redirect_lfs = False
        self.page_size = 50
        self.proxy_auth: str | None = None
        """An Authorization header (such as HTTP Basic credentials) that a proxy in front would take: sent with no
        token, it reads as anonymous."""
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._tokens: dict[str, _Grant] = {}
        self._lfs: dict[str, bytes] = {}
        self._faults: list[_Fault] = []
        self._listeners = (_Listener(self, cdn=False), _Listener(self, cdn=True))
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """The Hub endpoint, like `http://127.0.0.1:PORT`."""
        return _url(self._listeners[0])

    @property
    def cdn_url(self) -> str:
        """Where LFS files are redirected to when `redirect_lfs` is set."""
        return _url(self._listeners[1])

    def start(self) -> None:
        """Serve from background threads."""
        for listener in self._listeners:
            thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and close every connection."""
        for listener in self._listeners:
            if self._threads:
                listener.shutdown()
            listener.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        revision_name: str = "main",
        private: bool = False,
        gated: bool = False,
        card_data: dict[str, Any] | None = None,
    ) -> str:
        """Commit `files` (the whole snapshot) to branch `revision_name` of model repo `repo_id`; return the sha.

        The sha is derived from the repo, the parent commit and the files. Earlier commits stay resolvable by sha.
        `card_data` defaults to the YAML front matter of `files["README.md"]` (none when it does not parse, as the Hub
        serves such a card). `private` and `gated` apply to the whole repo, replacing earlier values.
        """
        blobs = {path: _blob(path, data) for path, data in files.items()}
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(private, gated, created=_now()))
            repo.private, repo.gated = private, gated
            return self._store(repo_id, repo, revision_name, blobs, repo.branches.get(revision_name), card_data)

    def add_token(self, token: str, repos: Iterable[str] = (), *, write: bool = False, user: str = "user") -> None:
        """Make `token` valid (`Authorization: Bearer <token>`), granting it the private and gated `repos`.

        With `write`, the token may also commit to `repos` and open pull requests on them. `user` owns the token: it
        is the author of the pull requests the token opens.
        """
        with self._lock:
            self._tokens[token] = _Grant(frozenset(repos), write, user)

    def add_discussion(self, repo_id: str, title: str, *, author: str = "user") -> int:
        """Open a discussion (not a pull request) on `repo_id`; return its number."""
        with self._lock:
            repo = self._repos[repo_id]
            num = repo.next_number()
            repo.discussions[num] = _Discussion(num, title, author, _now(), None)
            return num

    def _store(
        self,
        repo_id: str,
        repo: _Repo,
        ref: str,
        blobs: dict[str, _Blob],
        parent: str | None,
        card_data: dict[str, Any] | None = None,
        message: str = "",
    ) -> str:
        """Record a commit of `blobs` on `ref` (caller holds the lock); return its sha."""
        if card_data is None and "README.md" in blobs:
            try:
                card_data = _front_matter(blobs["README.md"].data.decode())
            except (yaml.YAMLError, ValueError):  # the Hub takes such a card (by git), and serves no metadata for it
                card_data = None
        digest = hashlib.sha1(f"{repo_id}\0{parent}\0".encode())
        for path in sorted(blobs):
            digest.update(f"{path}\0{blobs[path].oid}\0".encode())
        digest.update(message.encode())
        sha = digest.hexdigest()
        repo.commits[sha] = _Commit(sha, blobs, card_data, _now())
        repo.branches[ref] = sha
        self._lfs.update((blob.sha256, blob.data) for blob in blobs.values() if blob.pointer is not None)
        return sha

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        method: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `n` requests whose target contains `path_contains` (and whose method is `method`, when
        given) with `status` (429: `Retry-After: 0`) and `headers` (a `Location`, say)."""
        with self._lock:
            self._faults.append(_Fault(n, path_contains, status, method, dict(headers or {})))

    def stall_next(
        self, n: int = 1, seconds: float = 1.0, path_contains: str | None = None, method: str | None = None
    ) -> None:
        """Wait `seconds` before answering the next `n` matching requests as usual."""
        with self._lock:
            self._faults.append(_Fault(n, path_contains, None, method, stall=seconds))

    def drop_next(self, n: int = 1, path_contains: str | None = None, method: str | None = None) -> None:
        """Close the connection of the next `n` matching requests early.

        A GET gets its headers (full `Content-Length`) and half its body; a HEAD gets nothing.
        """
        with self._lock:
            self._faults.append(_Fault(n, path_contains, None, method))

    def cut_next(self, n: int = 1, path_contains: str | None = None, method: str | None = None) -> None:
        """Answer the next `n` matching GETs with the first half of their body, as a complete answer of that length
        (a proxy that cut the file short)."""
        with self._lock:
            self._faults.append(_Fault(n, path_contains, None, method, cut=True))

    def _take_fault(self, method: str, target: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method is not None and fault.method != method:
                    continue
                if fault.path_contains is None or fault.path_contains in target:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    def _route(self, method: str, target: str, headers: Message, body: bytes, *, cdn: bool) -> _Response:
        url = urlsplit(target)
        auth = headers.get("Authorization")
        with self._lock:
            if method == "POST":
                return self._post(url.path, parse_qs(url.query), auth, body)
            if cdn:
                match = _CDN_PATH.fullmatch(url.path)
                data = self._lfs.get(match["sha256"]) if match else None
                if match is None or data is None:
                    return _error(404, "Not Found")
                return self._content(data, headers.get("Range"), {"ETag": f'"{match["sha256"]}"'})
            if url.path == "/api/whoami-v2":
                return self._whoami(auth)
            if match := _DETAILS_PATH.fullmatch(url.path):
                repo_id = unquote(match["repo"])
                repo = self._access(repo_id, auth, files=False)
                if isinstance(repo, _Response):
                    return repo
                discussion = repo.discussions.get(int(match["num"]))
                if discussion is None:
                    return _error(404, f"Discussion {match['num']} not found")
                return _json(_details(repo_id, discussion))
            if match := _DISCUSSIONS_PATH.fullmatch(url.path):
                repo_id = unquote(match["repo"])
                repo = self._access(repo_id, auth, files=False)
                if isinstance(repo, _Response):
                    return repo
                return self._discussions(repo_id, repo, parse_qs(url.query))
            if match := _REFS_PATH.fullmatch(url.path):
                repo_id = unquote(match["repo"])
                repo = self._access(repo_id, auth, files=False)
                if isinstance(repo, _Response):
                    return repo
                return _json(_refs(repo, include_prs="include_prs" in parse_qs(url.query)))
            if match := _API_PATH.fullmatch(url.path):
                repo_id, revision = unquote(match["repo"]), unquote(match["rev"] or "main")
                found = self._lookup(repo_id, revision, headers.get("Authorization"), files=False)
                if isinstance(found, _Response):
                    return found
                info = _model_info(repo_id, *found, blobs="blobs" in parse_qs(url.query))
                return _Response(200, {"Content-Type": "application/json"}, json.dumps(info).encode())
            if match := _RESOLVE_PATH.fullmatch(url.path):
                found = self._lookup(
                    unquote(match["repo"]), unquote(match["rev"]), headers.get("Authorization"), files=True
                )
                if isinstance(found, _Response):
                    return found
                return self._resolve(found[1], unquote(match["file"]), headers.get("Range"))
            return _error(404, "Not Found")

    def _lookup(
        self, repo_id: str, revision: str, authorization: str | None, *, files: bool, write: bool = False
    ) -> tuple[_Repo, _Commit] | _Response:
        """The repo and the commit `revision` names, or the error the Hub answers (gating applies to `files`)."""
        repo = self._access(repo_id, authorization, files=files, write=write)
        if isinstance(repo, _Response):
            return repo
        commit = repo.commits.get(repo.branches.get(revision, revision))
        if commit is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo, commit

    def _access(
        self, repo_id: str, authorization: str | None, *, files: bool, write: bool = False
    ) -> _Repo | _Response:
        """The repo if the credentials may read it (its files, with `files`; commit to it, with `write`)."""
        grant = self._grant(authorization)
        if isinstance(grant, _Response):
            return grant
        granted = grant is not None and repo_id in grant.repos
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not granted):
            return _error(401 if grant is None else 404, "Repository not found", "RepoNotFound")
        if files and repo.gated and not granted:
            if grant is None:
                return _error(401, f"Access to model {repo_id} is restricted. Please log in.", "GatedRepo")
            return _error(403, f"Access to model {repo_id} is restricted: not in the authorized list.", "GatedRepo")
        if write and not (granted and grant is not None and grant.write):
            if grant is None:
                return _error(401, "You must be authenticated to write to a repository")
            return _error(403, f"You don't have the rights to write to {repo_id}: it needs a token with write access")
        return repo

    def _grant(self, authorization: str | None) -> _Grant | None | _Response:
        """What the credentials' token may do: None for no token (or the proxy's credentials), 401 for an unknown one."""
        if authorization is None or authorization == self.proxy_auth:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if not authorization.startswith("Bearer ") or token not in self._tokens:
            return _error(401, "Invalid credentials in Authorization header")
        return self._tokens[token]

    def _whoami(self, authorization: str | None) -> _Response:
        grant = self._grant(authorization)
        if not isinstance(grant, _Grant):
            return _error(401, "Invalid credentials in Authorization header")
        role = "write" if grant.write else "read"
        return _json({"type": "user", "name": grant.user,
                      "auth": {"type": "access_token", "accessToken": {"role": role}}})

    def _discussions(self, repo_id: str, repo: _Repo, query: dict[str, list[str]]) -> _Response:
        """A page of the repo's discussions and pull requests, newest first, as `GET .../discussions` answers."""
        kind, status = query.get("type", ["all"])[0], query.get("status", ["all"])[0]
        author, page = query.get("author", [None])[0], query.get("p", ["0"])[0]
        if kind not in ("all", "discussion", "pull_request") or status not in ("all", "open", "closed"):
            return _error(400, f"Invalid filter: type={kind}, status={status}")
        if not page.isdigit():
            return _error(400, f"Invalid page: {page}")
        chosen = [
            d for d in sorted(repo.discussions.values(), key=lambda d: d.num, reverse=True)
            if (kind == "all" or (kind == "pull_request") == d.is_pull_request)
            and (status == "all" or (status == "open") == (d.status == "open"))
            and (author is None or d.author == author)
        ]
        start = int(page) * self.page_size
        return _json({
            "discussions": [_discussion(repo_id, d) for d in chosen[start : start + self.page_size]],
            "count": len(chosen),
            "start": start,
            "numClosedDiscussions": sum(d.status != "open" for d in repo.discussions.values()),
        })

    def _change(self, repo_id: str, num: int, action: str, authorization: str | None, body: bytes) -> _Response:
        """Close or reopen discussion `num` (`action` "status"), or merge pull request `num` into its branch."""
        repo = self._access(repo_id, authorization, files=False)
        if isinstance(repo, _Response):
            return repo
        discussion = repo.discussions.get(num)
        if discussion is None:
            return _error(404, f"Discussion {num} not found")
        grant = self._grant(authorization)
        user = grant.user if isinstance(grant, _Grant) else None
        writer = isinstance(grant, _Grant) and grant.write and repo_id in grant.repos
        if not writer and not (action == "status" and user == discussion.author):
            return _error(401 if user is None else 403, f"You don't have the rights to change discussion {num}")
        if action == "status":
            new = json.loads(body or b"{}").get("status")
            if new not in ("open", "closed") or discussion.status == "merged":
                return _error(400, f"Cannot set the status of discussion {num} ({discussion.status}) to {new}")
            discussion.status = new
            event = {"id": f"{num}-{len(self.requests)}", "type": "status-change", "createdAt": _now(),
                     "author": {"name": user}, "data": {"status": new}}
            return _json({"newStatus": event})
        if discussion.target is None or discussion.status != "open":
            return _error(400, f"Discussion {num} is not an open pull request")
        head = repo.commits[repo.branches[f"refs/pr/{num}"]]
        self._store(repo_id, repo, discussion.target, dict(head.files), repo.branches[discussion.target],
                    message=f"Merge pull request #{num}")
        discussion.status = "merged"
        return _json({})

    def _post(self, path: str, query: dict[str, list[str]], authorization: str | None, body: bytes) -> _Response:
        if path == "/api/validate-yaml":
            try:
                _front_matter(json.loads(body)["content"])
            except yaml.YAMLError as e:
                return _json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, status=400)
            return _json({"errors": [], "warnings": []})
        if match := _DISCUSSION_PATH.fullmatch(path):
            return self._change(unquote(match["repo"]), int(match["num"]), match["action"], authorization, body)
        match = _WRITE_PATH.fullmatch(path)
        if match is None:
            return _error(404, "Not Found")
        repo_id, revision = unquote(match["repo"]), unquote(match["rev"])
        found = self._lookup(repo_id, revision, authorization, files=True, write=True)
        if isinstance(found, _Response):
            return found
        repo, head = found
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            return _json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": head.files[f["path"]].oid if f["path"] in head.files else None}
                for f in files
            ]})
        if revision not in repo.branches:
            return _error(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        grant = self._grant(authorization)
        author = grant.user if isinstance(grant, _Grant) else "user"
        return self._commit(repo_id, repo, revision, body, create_pr="create_pr" in query, author=author)

    def _commit(
        self, repo_id: str, repo: _Repo, branch: str, body: bytes, *, create_pr: bool, author: str
    ) -> _Response:
        """Apply an NDJSON commit to `branch` (or a pull request's `refs/pr/N`), or to a new pull request by `author`
        against it."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return _error(400, "The commit must start with a header")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[branch]]
        parent = head
        if header.get("parentCommit"):
            found = [c for sha, c in repo.commits.items() if sha.startswith(header["parentCommit"])]
            if len(found) != 1:
                return _error(404, f"Invalid rev id: {header['parentCommit']}", "RevisionNotFound")
            parent = found[0]
            if not create_pr and parent.sha != head.sha:
                return _error(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                files[value["path"]] = _blob(value["path"], base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return _error(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: blob for path, blob in files.items() if not path.startswith(prefix)}
            else:
                return _error(400, f"Unsupported commit operation {key} on {value.get('path')}")
        ref = branch
        if create_pr:
            number = repo.next_number()
            ref = f"refs/pr/{number}"
            repo.discussions[number] = _Discussion(number, header.get("summary", ""), author, _now(), branch)
        sha = self._store(repo_id, repo, ref, files, parent.sha, message=header.get("summary", ""))
        answer = {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}"
        return _json(answer)

    def _resolve(self, commit: _Commit, path: str, range_header: str | None) -> _Response:
        blob = commit.files.get(path)
        if blob is None:
            response = _error(404, "Entry not found", "EntryNotFound")
            response.headers["X-Repo-Commit"] = commit.sha
            return response
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"'}
        if blob.pointer is not None:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))}
            if self.redirect_lfs:
                location = f"{self.cdn_url}/lfs/{blob.sha256}"
                headers["Location"] = location
                return _Response(302, headers, f"Found. Redirecting to {location}".encode())
        return self._content(blob.data, range_header, headers)

    def _content(self, data: bytes, range_header: str | None, headers: dict[str, str]) -> _Response:
        """`data` as a 200, or the 206/416 that `range_header` calls for."""
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        try:
            byte_range = None if self.ignore_range else _byte_range(range_header, len(data))
        except _Unsatisfiable:
            return _Response(416, headers | {"Content-Range": f"bytes */{len(data)}"})
        if byte_range is None:
            return _Response(200, headers, data)
        start, stop = byte_range
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        return _Response(206, headers, data[start:stop])


class _Listener(ThreadingHTTPServer):
    """A listening socket on 127.0.0.1 (random port) that tracks its open connections."""

    daemon_threads = True

    def __init__(self, hub: HubServer, *, cdn: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.cdn = cdn
        self.connections: set[socket.socket] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report a failed request, except a client that went away (one that timed out, say): that is no error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Listener

    def do_GET(self) -> None:
        hub = self.server.hub
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(hub.delay)
        fault = hub._take_fault(self.command, self.path)
        if fault is not None and fault.stall:
            time.sleep(fault.stall)
            fault = None
        cut = fault is not None and fault.cut
        if cut:
            fault = None
        if fault is not None and fault.status is not None:
            response = _error(fault.status, "Injected failure")
            if fault.status == 429:
                response.headers["Retry-After"] = "0"
            response.headers |= fault.headers
        else:
            response = hub._route(self.command, self.path, self.headers, body, cdn=self.server.cdn)
        dropped = fault is not None and fault.status is None
        if cut:
            response.body = response.body[: len(response.body) // 2]
        body = b"" if self.command == "HEAD" else response.body
        if dropped:
            body = body[: len(body) // 2]
        entry = LoggedRequest(
            method=self.command,
            path=self.path,
            range=self.headers.get("Range"),
            has_auth="Authorization" in self.headers,
            status=response.status,
            bytes_sent=len(body),
            dropped=dropped,
        )
        hub._log(entry)  # before answering, so that the entry is there when the client has its response
        if dropped:
            self.close_connection = True
            if self.command == "HEAD":
                return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        for sent in range(0, len(body), _CHUNK):
            try:
                self.wfile.write(body[sent : sent + _CHUNK])
            except OSError:  # the client went away
                entry.bytes_sent = sent
                self.close_connection = True
                return

    do_HEAD = do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


def _url(listener: _Listener) -> str:
    return f"http://127.0.0.1:{listener.server_port}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _json(data: object, status: int = 200) -> _Response:
    return _Response(status, {"Content-Type": "application/json"}, json.dumps(data).encode())


def _refs(repo: _Repo, *, include_prs: bool) -> dict[str, Any]:
    """The JSON of `GET /api/models/{repo_id}/refs` (`?include_prs=1` adds the pull requests)."""
    refs: dict[str, Any] = {"branches": [], "converts": [], "tags": []}
    if include_prs:
        refs["pullRequests"] = []
    for name, sha in sorted(repo.branches.items()):
        if _PR_REF.fullmatch(name):
            if include_prs:
                refs["pullRequests"].append({"name": name, "ref": name, "targetCommit": sha})
        else:
            refs["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha})
    return refs


def _discussion(repo_id: str, d: _Discussion) -> dict[str, Any]:
    """A discussion or pull request as `GET /api/models/{repo_id}/discussions` lists it."""
    return {
        "num": d.num,
        "title": d.title,
        "status": d.status,
        "isPullRequest": d.is_pull_request,
        "createdAt": d.created,
        "author": {"name": d.author, "type": "user"},
        "repo": {"name": repo_id, "type": "model"},
        "pinned": False,
        "numComments": 1,
    }


def _details(repo_id: str, d: _Discussion) -> dict[str, Any]:
    """A discussion or pull request as `GET /api/models/{repo_id}/discussions/{num}` answers it (no events, no diff)."""
    details: dict[str, Any] = {**_discussion(repo_id, d), "events": []}
    if d.is_pull_request:
        details.update(changes={"base": f"refs/heads/{d.target}"}, filesWithConflicts=[])
    return details


def _error(status: int, message: str, code: str | None = None) -> _Response:
    """An error the way the Hub sends it: `X-Error-Code`, `X-Error-Message` and `{"error": message}`."""
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code is not None:
        headers["X-Error-Code"] = code
    return _Response(status, headers, json.dumps({"error": message}).encode())


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`(start, stop)` of a single-range `Range` header; None for no header or one to ignore (invalid, multi-range)."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first:  # suffix: the last n bytes
        if not last:
            return None
        if int(last) == 0 or size == 0:
            raise _Unsatisfiable
        return max(size - int(last), 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    return start, min(int(last) + 1, size) if last else size


def _blob(path: str, data: bytes) -> _Blob:
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = None
    if path.endswith(LFS_SUFFIXES):
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    stored = data if pointer is None else pointer
    return _Blob(data, hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest(), sha256, pointer)


def _front_matter(readme: str) -> dict[str, Any] | None:
    match = _FRONT_MATTER.match(readme)
    card = yaml.safe_load(match[1]) if match else None
    return card if isinstance(card, dict) else None


def _model_info(repo_id: str, repo: _Repo, commit: _Commit, *, blobs: bool) -> dict[str, Any]:
    """The JSON of `GET /api/models/{repo_id}[/revision/{rev}]` (`?blobs=true` adds sizes and LFS info)."""
    siblings: list[dict[str, Any]] = []
    for path, blob in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling |= {"size": len(blob.data), "blobId": blob.oid}
            if blob.pointer is not None:
                sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
        siblings.append(sibling)
    card = commit.card_data or {}
    tags = card.get("tags") or []
    info = {
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0] if "/" in repo_id else None,
        "sha": commit.sha,
        "lastModified": commit.date,
        "createdAt": repo.created,
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "library_name": card.get("library_name"),
        "pipeline_tag": card.get("pipeline_tag"),
        "tags": [tags] if isinstance(tags, str) else list(tags),
        "cardData": commit.card_data,
        "siblings": siblings,
    }
    return {key: value for key, value in info.items() if value is not None}
