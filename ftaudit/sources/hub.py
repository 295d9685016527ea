"""Model files in a Hugging Face Hub repository, read by HTTP Range requests.

Everything goes through huggingface_hub: its session, URLs, auth headers and error classes. Each read is retried by
ftaudit's loop alone (`with_retries`): huggingface_hub's own retry loops are made to stop at their first failure.
The revision is resolved to a commit sha once, and every read is pinned to that sha. A file that the
Hugging Face cache already holds at that commit (fetched earlier by transformers, `hf download`, ...)
is read from there instead, without a request.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
    set_client_factory,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_token, hf_raise_for_status, parse_ratelimit_headers
from huggingface_hub.utils._http import default_client_factory  # not exported: the client it builds, to extend

from ftaudit.errors import AccessError, FtauditError, InvalidWeightsError, NetworkError, NotFoundError, UsageError
from ftaudit.secrets import clean_token, header_safe
from ftaudit.sources.local import inside, read_range, read_small_text
from ftaudit.sources.storage import MAX_TEXT_BYTES

log = logging.getLogger("ftaudit")

T = TypeVar("T")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
"""A full commit sha: the only name of a commit that may go into the Hugging Face cache's paths."""
CONSISTENCY_FAILED = "Consistency check failed"
"""How huggingface_hub's download begins the OSError it raises for a body that is not the size the Hub gave."""


class _ToFtaudit(logging.Handler):
    """Hands huggingface_hub's log lines to ftaudit's logger, whose handler masks secrets (its retries' warnings name
    the URL, with a password of HF_ENDPOINT in it) and writes `ftaudit: LEVEL: ...` lines; in place of the bare handler
    on stderr that huggingface_hub sets up."""

    def emit(self, record: logging.LogRecord) -> None:
        log.handle(record)


logging.getLogger("huggingface_hub").handlers[:] = [_ToFtaudit()]


def endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT as set now, else huggingface_hub's default."""
    url = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"HF_ENDPOINT must be an http:// or https:// URL, not {url!r}")
    return url


def check_env_token(token: str | None) -> None:
    """With no token given, UsageError when the HF_TOKEN (else HUGGING_FACE_HUB_TOKEN) that huggingface_hub would send
    holds a character no HTTP header can carry, as `--token` is refused; the value is never shown."""
    if token is not None:
        return
    name = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "HUGGING_FACE_HUB_TOKEN"
    if not header_safe(clean_token(os.environ.get(name, ""))):
        raise UsageError(f"{name} holds a control or non-ASCII character, which no HTTP header can carry: set it to "
                         "the token as the Hub shows it")


def _setting(name: str, default: float, parse: Callable[[str], float], valid: Callable[[float], bool], what: str) -> float:
    """The number in environment variable `name` (`default` when unset); UsageError unless `valid`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and valid(value)):
        raise UsageError(f"{name} must be {what}, not {text!r}")
    return value


def _retries() -> int:
    return int(_setting("FTAUDIT_HTTP_RETRIES", 5, int, lambda n: n >= 1, "a whole number of attempts, at least 1"))


def _backoff() -> float:
    return _setting("FTAUDIT_HTTP_BACKOFF", 0.5, float, lambda s: s >= 0, "a number of seconds, at least 0")


def _max_wait() -> float:
    return _setting("FTAUDIT_HTTP_MAX_WAIT", 30.0, float, lambda s: s >= 0, "a number of seconds, at least 0")


def _timeout() -> httpx2.Timeout:
    seconds = _setting("FTAUDIT_HTTP_TIMEOUT", 60.0, float, lambda s: s > 0, "a number of seconds above 0")
    return httpx2.Timeout(seconds, connect=min(seconds, 10.0))


_bounds: tuple[httpx2.Timeout, float] | None = None
"""The bounds huggingface_hub's client factory was last given."""


def bound_session() -> None:
    """Make huggingface_hub's shared HTTP client, and every client it builds again (it closes the shared one after a
    connection error), a `_Client`, with FTAUDIT_HTTP_TIMEOUT as its default timeout (its own have none, and a server
    that stalls would hold a request that takes no timeout of its own forever) and FTAUDIT_HTTP_MAX_WAIT as the longest
    wait a server's Retry-After or rate-limit reset can ask of the retries huggingface_hub still makes itself (requests
    outside ftaudit's reads: the push's LFS uploads in its worker threads, ...)."""
    bounds = (_timeout(), _max_wait())
    global _bounds
    if bounds != _bounds:  # setting a factory closes the shared client, which another storage may be reading with
        _bounds = bounds
        set_client_factory(lambda: _client(*bounds))


def _client(timeout: httpx2.Timeout, longest: float) -> _Client:
    """huggingface_hub's default client as a `_Client`, `timeout` its default and its answers' waits capped at
    `longest`."""
    default = default_client_factory()
    default.close()
    hooks = {**default.event_hooks, "response": [*default.event_hooks["response"], lambda r: _cap_waits(r, longest)]}
    return _Client(event_hooks=hooks, follow_redirects=default.follow_redirects, timeout=timeout)


RATELIMIT_RESET = re.compile(r"(;\s*t=)(\d+)")
"""The reset time, in seconds, of an IETF RateLimit header (`"api";r=0;t=55`), which huggingface_hub waits for."""


def _cap_waits(response: httpx2.Response, longest: float) -> None:
    """Lower the seconds a server asks a client to wait (Retry-After, RateLimit's reset) to at most `longest`."""
    cap = int(longest)
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit() and int(value) > cap:
        response.headers["Retry-After"] = str(cap)
    limit = response.headers.get("RateLimit")
    if limit:
        response.headers["RateLimit"] = RATELIMIT_RESET.sub(lambda m: f"{m[1]}{min(int(m[2]), cap)}", limit)


_ONCE: ContextVar[bool] = ContextVar("ftaudit_once", default=False)
"""Whether the requests made now are each to be made once, ftaudit's loop retrying them (see `_once`)."""


def _once(fn: Callable[[], T]) -> T:
    """fn(), each request it makes through huggingface_hub's client attempted once: a failure that huggingface_hub's
    own loops would retry (an answer with a status of RETRY_STATUS, a dropped connection, a timeout, a body cut short)
    raises `_Transient`, which none of them catches, so that ftaudit's loop alone counts the attempts."""
    entered = _ONCE.set(True)
    try:
        return fn()
    finally:
        _ONCE.reset(entered)


class _Client(httpx2.Client):
    """huggingface_hub's client, whose requests made within `_once` raise `_Transient` on a transient failure."""

    def send(self, request: httpx2.Request, *, stream: bool = False, **kwargs: Any) -> httpx2.Response:
        if not _ONCE.get():
            return super().send(request, stream=stream, **kwargs)
        try:
            response = super().send(request, stream=stream, **kwargs)
        except httpx2.TransportError as e:
            raise _Transient(type(e).__name__) from e
        if response.status_code in RETRY_STATUS:
            response.close()
            raise _Transient(f"HTTP {response.status_code}", _retry_after(response))
        if stream:
            response.stream = _Body(cast(httpx2.SyncByteStream, response.stream))  # a sync client's
        return response


class _Body(httpx2.SyncByteStream):
    """A response body read within `_once`: its transport errors raise `_Transient` (huggingface_hub's download would
    resume after them)."""

    def __init__(self, stream: httpx2.SyncByteStream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpx2.TransportError as e:
            raise _Transient(type(e).__name__) from e

    def close(self) -> None:
        self._stream.close()


class _Transient(Exception):
    """A failure worth retrying: a dropped connection, a short body, HTTP 429 or 5xx, an answer that cannot be used
    (a redirect loop, a body that does not decode)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _transient(e: BaseException | None) -> _Transient | None:
    """`e` as a failure worth retrying, or None: a request error (a transport error, too many redirects, a body that
    does not decode), HTTP 429 or 5xx, or either as the cause of huggingface_hub's LocalEntryNotFoundError (what
    `hf_hub_download` raises when the Hub did not answer)."""
    if isinstance(e, _Transient):
        return e
    if isinstance(e, httpx2.RequestError):
        return _Transient(type(e).__name__)
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        return _Transient(f"HTTP {status}", _retry_after(e.response)) if status in RETRY_STATUS else None
    if isinstance(e, LocalEntryNotFoundError):
        return _transient(e.__cause__)
    return None


def with_retries(
    fn: Callable[[], T],
    label: str,
    what: str,
    error: Callable[[HfHubHTTPError], FtauditError],
    *,
    attempts: int | None = None,
    backoff: float | None = None,
) -> T:
    """Run one read with bounded retries (FTAUDIT_HTTP_RETRIES attempts, exponential backoff from
    FTAUDIT_HTTP_BACKOFF, or the server's Retry-After or rate-limit reset) on transient failures, each request of which
    huggingface_hub makes once (`_once`); `error` maps any other HTTP error.

    Only for requests that are safe to repeat: never for a write, which a retry could apply twice.
    """
    attempts = _retries() if attempts is None else attempts
    backoff = _backoff() if backoff is None else backoff
    longest = _max_wait()
    attempt = 0
    while True:
        try:
            return _once(fn)
        except FtauditError:
            raise
        except (_Transient, httpx2.RequestError, HfHubHTTPError, LocalEntryNotFoundError) as e:
            failure = _transient(e)
            if failure is None:
                raise _lasting(e, label, what, error) from None
        attempt += 1
        if attempt == attempts:
            raise NetworkError(f"{label}: {what}: still failing after {attempts} attempts ({failure})") from None
        delay = min(failure.retry_after if failure.retry_after is not None else backoff * 2 ** (attempt - 1), longest)
        log.debug("%s: %s: %s; retrying in %.1fs", label, what, failure, delay)
        time.sleep(delay)


def _lasting(e: Exception, label: str, what: str, error: Callable[[HfHubHTTPError], FtauditError]) -> FtauditError:
    """The error for a failure that a retry would not mend: `error` of an HTTP error (which huggingface_hub's download
    raises as the cause of a LocalEntryNotFoundError too), else a download the Hub's answer lacked what it needs for."""
    cause = e.__cause__ if isinstance(e, LocalEntryNotFoundError) else e
    if isinstance(cause, HfHubHTTPError):
        return error(cause)
    return NetworkError(f"{label}: could not download {what} from {endpoint()} ({type(cause or e).__name__})")


class HubStorage:
    """One commit of a Hub model repository."""

    def __init__(self, repo_id: str, revision: str | None, token: str | None) -> None:
        self.repo_id = repo_id
        self.endpoint = endpoint()
        check_env_token(token)
        self._attempts, self._backoff, self._timeout = _retries(), _backoff(), _timeout()
        bound_session()
        self.token = token
        self._has_token = bool(token or get_token())
        self.label = repo_id
        api = HfApi(endpoint=self.endpoint, token=token)
        info = self._call(
            lambda: api.model_info(repo_id, revision=revision, timeout=self._timeout),  # type: ignore[arg-type]
            f"revision {revision or 'main'}",
        )
        if not info.sha:
            raise NetworkError(f"{repo_id}: the server did not say which commit {revision or 'main'} is")
        if not COMMIT_SHA.fullmatch(info.sha):
            raise NetworkError(
                f"{repo_id}: the server named commit {info.sha!r} for {revision or 'main'}, which is not a commit sha "
                "(40 hex digits)"
            )
        self.sha: str = info.sha
        self.label = f"{repo_id}@{self.sha[:12]}"
        self._files = sorted(s.rfilename for s in info.siblings or [])
        self._sizes: dict[str, int] = {}
        self._cached_files: dict[str, Path | None] = {}
        self._texts: dict[str, str | None] = {}
        self._warned_no_range = False

    def files(self) -> list[str]:
        return list(self._files)

    def _cached(self, name: str) -> Path | None:
        """The file in the Hugging Face cache at this commit, if an earlier download (by any tool) put it there."""
        if name not in self._cached_files:
            found = None
            if name in self._files:
                found = try_to_load_from_cache(self.repo_id, str(inside(name, self.label)), revision=self.sha)
            cached = Path(found) if isinstance(found, str) else None  # not a path: absent, or cached as missing
            if cached is not None:
                log.debug("%s/%s: read from the Hugging Face cache", self.label, name)
            self._cached_files[name] = cached
        return self._cached_files[name]

    def size(self, name: str) -> int:
        cached = self._cached(name)
        if cached is not None:
            return cached.stat().st_size
        if name not in self._sizes:
            url = self._url(name)
            meta = self._call(lambda: get_hf_file_metadata(  # FTAUDIT_HTTP_TIMEOUT, not huggingface_hub's 10 s
                url, token=self.token, timeout=self._timeout, endpoint=self.endpoint  # type: ignore[arg-type]
            ), name)
            if meta.size is None:
                raise NetworkError(f"{self.label}/{name}: the server did not give the file's size")
            self._sizes[name] = meta.size
        return self._sizes[name]

    def local_path(self, name: str) -> Path:
        """The file in the Hugging Face cache, downloaded whole first if it is not there (AccessError when the cache
        cannot take it)."""
        cached = self._cached(name)
        if cached is not None:
            return cached
        try:
            return Path(self._call(lambda: self._download(name), name))
        except OSError as e:
            if type(e).__module__ != "builtins":  # one of huggingface_hub's own errors, not the file system's
                raise
            raise AccessError(
                f"{self.label}/{name}: cannot download it into the Hugging Face cache ({constants.HF_HUB_CACHE}): "
                f"{e.strerror or type(e).__name__}; set HF_HUB_CACHE (or HF_HOME) to a folder this user can write"
            ) from None

    def _download(self, name: str) -> str:
        """hf_hub_download of file `name`; `_Transient` when the body ended short of the size the Hub gave for it."""
        try:
            return hf_hub_download(self.repo_id, name, revision=self.sha, token=self.token, endpoint=self.endpoint)
        except OSError as e:
            if type(e) is OSError and str(e).startswith(CONSISTENCY_FAILED):
                raise _Transient("the download ended short of the file's size") from None
            raise

    def read(self, name: str, start: int, length: int) -> bytes | bytearray:
        if length == 0:
            return b""
        cached = self._cached(name)
        if cached is not None:
            return read_range(cached, start, length, f"{self.label}/{name}")
        return self._call(lambda: self._read_range(name, start, length), name)

    def read_text(self, name: str) -> str | None:
        """A metadata file, fetched once: the commit is fixed, and several steps read the same configs."""
        if name not in self._texts:
            self._texts[name] = self._fetch_text(name)
        return self._texts[name]

    def _fetch_text(self, name: str) -> str | None:
        if name not in self._files:
            return None
        cached = self._cached(name)
        if cached is not None:
            return read_small_text(cached, f"{self.label}/{name}")
        data = self._call(lambda: self._read_whole(name), name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidWeightsError(f"{self.label}/{name}: not UTF-8 text") from None

    def _url(self, name: str) -> str:
        return hf_hub_url(self.repo_id, name, revision=self.sha, endpoint=self.endpoint)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return build_hf_headers(token=self.token, headers=extra)

    def _read_range(self, name: str, start: int, length: int) -> bytes:
        end = start + length - 1
        headers = self._headers({"Range": f"bytes={start}-{end}"})
        with get_session().stream("GET", self._url(name), headers=headers, timeout=self._timeout) as r:
            _raise_for_status(r)
            if r.status_code == 206:
                _check_content_range(r.headers.get("Content-Range"), start, end, f"{self.label}/{name}")
                data = _slice(r.iter_bytes(), 0, length + 1)  # one byte more tells an overlong body
                if len(data) > length:
                    raise NetworkError(
                        f"{self.label}/{name}: the server answered a Range request for bytes {start}-{end} with more "
                        f"than its {length} bytes"
                    )
            else:
                if not self._warned_no_range:
                    log.warning(
                        "%s: the server ignores HTTP Range requests; reading whole files to take slices (slow)",
                        self.endpoint,
                    )
                    self._warned_no_range = True
                data = _slice(r.iter_bytes(), start, length)
        if len(data) != length:
            raise _Transient(f"short read ({len(data)} of {length} bytes)")
        return data

    def _read_whole(self, name: str) -> bytes:
        with get_session().stream("GET", self._url(name), headers=self._headers(), timeout=self._timeout) as r:
            _raise_for_status(r)
            chunks, total = [], 0
            for chunk in r.iter_bytes():
                total += len(chunk)
                if total > MAX_TEXT_BYTES:
                    raise InvalidWeightsError(f"{self.label}/{name}: too large for a metadata file")
                chunks.append(chunk)
        return b"".join(chunks)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run one request with bounded retries, mapping failures to ftaudit errors."""
        return with_retries(
            fn, self.label, what, lambda e: self._error(e, what), attempts=self._attempts, backoff=self._backoff
        )

    def _error(self, e: HfHubHTTPError, what: str) -> FtauditError:
        """One actionable message per failure the Hub reports."""
        repo = self.repo_id
        if isinstance(e, GatedRepoError):
            return AccessError(
                f"{repo} is a gated repository: accept its conditions on the Hub, then pass a token "
                "of that account (--token or HF_TOKEN)"
            )
        if isinstance(e, RevisionNotFoundError):
            return NotFoundError(f"{repo}: {what} not found")
        if isinstance(e, RepositoryNotFoundError):
            hint = "or the token cannot read it" if self._has_token else "or it is private: pass --token or set HF_TOKEN"
            return NotFoundError(f"{repo}: no such model repository on {self.endpoint}, {hint}")
        if isinstance(e, EntryNotFoundError):
            return NotFoundError(f"{self.label}: no file {what}")
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            return AccessError(f"{repo}: the server rejected the token (HTTP 401): check --token or HF_TOKEN")
        if status == 403:
            return AccessError(f"{repo}: the token may not read this repository (HTTP 403)")
        return NetworkError(f"{self.label}: {what}: the server answered HTTP {status}")


def _raise_for_status(r: httpx2.Response) -> None:
    if r.status_code >= 400:  # not a transient one: `_Client` raised those
        r.read()
        hf_raise_for_status(r)


def _retry_after(r: httpx2.Response | None) -> float | None:
    """The seconds a server asks to wait before the next attempt: the reset of a rate limit that a 429 says is used up
    (as huggingface_hub's own retries wait for), else Retry-After."""
    if r is None:
        return None
    limit = parse_ratelimit_headers(r.headers) if r.status_code == 429 else None
    if limit is not None and limit.remaining == 0:
        return float(limit.reset_in_seconds)
    value = r.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _check_content_range(value: str | None, start: int, end: int, where: str) -> None:
    match = CONTENT_RANGE.fullmatch(value or "")
    if not match or int(match[1]) != start or int(match[2]) != end:
        raise NetworkError(f"{where}: the server answered a Range request for bytes {start}-{end} with range {value!r}")


def _slice(chunks: Iterator[bytes], start: int, length: int) -> bytes:
    """Bytes [start, start+length) of a streamed body, without keeping the rest."""
    out = bytearray()
    pos = 0
    for chunk in chunks:
        lo, hi = max(start - pos, 0), min(start + length - pos, len(chunk))
        if lo < hi:
            out += chunk[lo:hi]
        pos += len(chunk)
        if pos >= start + length:
            break
    return bytes(out)
