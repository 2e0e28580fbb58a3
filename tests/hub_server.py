"""A small, in-process, Hugging Face Hub-compatible HTTP server for tests.

It speaks enough of the Hub's HTTP API for the *real* ``huggingface_hub`` client
(and therefore ``transformers``) to work against it on 127.0.0.1: ``create_repo``,
``create_commit`` / ``upload_folder`` / ``upload_file`` (regular files and the
legacy LFS "basic" transfer), ``hf_hub_download``, ``snapshot_download``,
``model_info`` / ``repo_info``, ``list_repo_files`` / ``list_repo_tree``,
``get_paths_info``, ``create_branch``, ``delete_repo``, ``whoami`` and
``from_pretrained(repo_id)`` / ``push_to_hub(repo_id)``.  No Xet: the fixture sets
``HF_HUB_DISABLE_XET=1``.  Standard library only.

Usage
-----
In a conftest (either form works)::

    pytest_plugins = ["tests.hub_server"]          # registers the `hub_server` fixture
    # or
    from tests.hub_server import hub_server  # noqa: F401

Then in a test::

    def test_push(hub_server, tmp_path):
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()                                   # endpoint/token come from the fixture
        repo = api.create_repo("test-user/demo")        # -> RepoUrl(f"{hub_server.url}/test-user/demo")
        api.upload_folder(folder_path=tmp_path, repo_id="test-user/demo")
        assert hub_server.list_files("test-user/demo") == [".gitattributes", ...]
        hub_server.fail_next("/commit/", status=500)    # the next commit request fails with a 500
        ...

The ``hub_server`` fixture (function scoped):

* starts a :class:`HubServer` on ``127.0.0.1`` with a free port;
* sets, with ``monkeypatch``, ``HF_ENDPOINT``, ``HF_TOKEN=hf_dummy_test_token``,
  ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0``,
  ``HF_HUB_DISABLE_UPDATE_CHECK=1``, a fresh temporary ``HF_HOME`` (with
  ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH`` inside it),
  removes ``TRANSFORMERS_OFFLINE`` / ``HUGGING_FACE_HUB_TOKEN`` / proxy variables;
* because ``huggingface_hub`` reads those variables once at import time, it also
  patches the already-computed values: ``huggingface_hub.constants`` (``ENDPOINT``,
  ``HUGGINGFACE_CO_URL_TEMPLATE``, cache paths, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``,
  ...), module-level copies made with ``from ..constants import X`` (found by scanning
  ``sys.modules``), the ``endpoint`` of every module-level ``HfApi`` instance (e.g.
  ``huggingface_hub.hf_api.api``, which backs ``huggingface_hub.create_repo`` & co, or
  one created at import time by project code), and resets ``transformers``' cached
  ``HfApi`` (``transformers.utils.hub._hf_api``);
* closes ``huggingface_hub``'s shared HTTP client before and after the test, so
  it is rebuilt with the patched environment and no pooled connection outlives the server.

:func:`configure_hf_env` does the environment/constant patching on its own, if a
test needs to point the client at some other URL.

Server-side helpers for assertions / seeding: :meth:`HubServer.create_repo`,
:meth:`HubServer.repo_exists`, :meth:`HubServer.head`, :meth:`HubServer.list_files`,
:meth:`HubServer.read_file`, :meth:`HubServer.commits`, :attr:`HubServer.requests`
(every request seen: method, path, status).

Failure injection: ``hub_server.fail_next(path_substring, status=500, times=1,
method=None, error_code=None, message=None)`` makes the next ``times`` requests whose
path (raw or percent-decoded, query string included) contains ``path_substring`` fail
with ``status``, before any state change.  Beware that the client retries some
calls on 408/429/5xx with exponential back-off (1 s, 2 s, 4 s, ...): preupload, the LFS
batch/upload/verify calls, tree listing, and the download HEAD (re-sent at once after a 5xx when
the file is not cached, then with back-off).  The commit
call itself (``POST .../commit/...``) and ``create_repo`` are *not* retried.  For
an immediate failure on a retried endpoint use a non-retried status (e.g. 400/403).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import sys
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_dummy_test_token"
DEFAULT_USER = "test-user"
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's limit for "regular" (non-LFS) files

# Same patterns as the default `.gitattributes` the Hub creates in a new repo.
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
    "*.zst", "*tfevents*",
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = {"revision", "tree", "preupload", "commit", "branch", "refs", "paths-info"}
_HEX40 = re.compile(r"[0-9a-f]{40}")

__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "HubServer",
    "RecordedRequest",
    "configure_hf_env",
    "hub_server",
]


# --------------------------------------------------------------------------- storage


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class _FileEntry:
    sha256: str  # key into HubServer._blobs
    size: int
    lfs: bool
    regular_oid: str = ""  # git blob id of the content (regular files only; set by HubServer._store_blob)

    @property
    def git_oid(self) -> str:
        """The git blob id: of the content for regular files, of the LFS pointer for LFS files."""
        return _git_blob_oid(_lfs_pointer(self.sha256, self.size)) if self.lfs else self.regular_oid

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: sha256 for LFS files, git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    sha: str
    parent: str | None
    summary: str
    description: str
    date: str
    files: dict[str, _FileEntry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch name / refs/pr/N -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)
    n_prs: int = 0


@dataclass
class _Failure:
    substring: str
    status: int
    remaining: int
    method: str | None
    error_code: str | None
    message: str | None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


# --------------------------------------------------------------------------- server


class HubServer:
    """In-memory Hub. Start with :meth:`start` (or use as a context manager)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        require_auth_for_write: bool = True,
        lfs_redirect: bool = False,
    ) -> None:
        """
        Args:
            token: the only token accepted (as ``Authorization: Bearer <token>``).
            user: the user name returned by whoami; namespace of repos created without one.
            lfs_threshold: files at least this big are "lfs" in preupload (besides ``lfs_patterns``).
            lfs_patterns: gitattributes-style patterns of files always uploaded as LFS.
            require_auth_for_write: writes without the right token get a 401.
            lfs_redirect: if True, downloads of LFS files answer a 302 to
                ``http://localhost:PORT/_lfs/objects/<sha256>`` (another host name, like the
                Hub's CDN) with ``X-Linked-Etag`` / ``X-Linked-Size``; otherwise they are served directly.
        """
        self.host = host
        self.token = token
        self.user = user
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns = tuple(lfs_patterns)
        self.require_auth_for_write = require_auth_for_write
        self.lfs_redirect = lfs_redirect
        self.requests: list[RecordedRequest] = []

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content (regular files and LFS objects)
        self._lfs_objects: set[str] = set()  # sha256 of LFS objects uploaded through the LFS API
        self._failures: list[_Failure] = []

        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ failure injection
    def fail_next(
        self,
        path_substring: str,
        status: int = 500,
        times: int = 1,
        *,
        method: str | None = None,
        error_code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Make the next `times` requests whose path contains `path_substring` fail with `status`.

        The path is matched both raw and percent-decoded, query string included
        (e.g. ``"/commit/"``, ``"/preupload/"``, ``"/resolve/main/config.json"``,
        ``"info/lfs/objects/batch"``, ``"/_lfs/upload/"``, ``"/api/repos/create"``).
        `method` restricts the match to one HTTP method (``"HEAD"``, ``"GET"``, ``"POST"``, ...).
        `error_code` is sent as ``X-Error-Code`` (e.g. ``"RepoNotFound"``, ``"EntryNotFound"``)
        and `message` as ``X-Error-Message`` and in the JSON body. The failing request has
        no effect on the server's state. Rules are consumed in the order they were added.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._failures.append(
                _Failure(path_substring, status, times, method.upper() if method else None, error_code, message)
            )

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    @property
    def pending_failures(self) -> int:
        with self._lock:
            return sum(f.remaining for f in self._failures)

    def _take_failure(self, method: str, raw_path: str) -> _Failure | None:
        decoded = unquote(raw_path)
        with self._lock:
            for failure in self._failures:
                if failure.method is not None and failure.method != method:
                    continue
                if failure.substring in raw_path or failure.substring in decoded:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    return failure
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, status))

    # ------------------------------------------------------------------ server-side helpers
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo directly (no HTTP). Returns its URL. Existing repos are left as is."""
        if "/" not in repo_id:
            repo_id = f"{self.user}/{repo_id}"
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self._create_repo(repo_type, repo_id, private)
        return self.repo_url(repo_id, repo_type)

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that `revision` points to."""
        with self._lock:
            repo = self._get_repo_or_raise(repo_type, repo_id)
            return self._resolve_or_raise(repo, revision)

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._get_repo_or_raise(repo_type, repo_id)
            return sorted(repo.commits[self._resolve_or_raise(repo, revision)].files)

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._get_repo_or_raise(repo_type, repo_id)
            entry = repo.commits[self._resolve_or_raise(repo, revision)].files.get(path)
            if entry is None:
                raise KeyError(path)
            return self._blobs[entry.sha256]

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[tuple[str, str]]:
        """(sha, summary) of the history of `revision`, newest first."""
        with self._lock:
            repo = self._get_repo_or_raise(repo_type, repo_id)
            sha: str | None = self._resolve_or_raise(repo, revision)
            out = []
            while sha is not None:
                commit = repo.commits[sha]
                out.append((commit.sha, commit.summary))
                sha = commit.parent
            return out

    # ------------------------------------------------------------------ internals: state
    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()
        files = {".gitattributes": self._store_blob(gitattributes, lfs=False)}
        self._add_commit(repo, "main", None, "initial commit", "", files)
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _store_blob(self, data: bytes, lfs: bool) -> _FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        self._blobs.setdefault(sha256, data)
        if lfs:
            return _FileEntry(sha256=sha256, size=len(data), lfs=True)
        return _FileEntry(sha256=sha256, size=len(data), lfs=False, regular_oid=_git_blob_oid(data))

    def _add_commit(
        self, repo: _Repo, ref: str, parent: str | None, summary: str, description: str, files: dict[str, _FileEntry]
    ) -> _Commit:
        seed = json.dumps([parent, summary, sorted((p, e.sha256) for p, e in files.items()), uuid.uuid4().hex])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(sha=sha, parent=parent, summary=summary, description=description, date=_now(), files=files)
        repo.commits[sha] = commit
        repo.refs[ref] = sha
        return commit

    def _get_repo_or_raise(self, repo_type: str, repo_id: str, token_ok: bool = True) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not token_ok):
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str | None:
        if revision in repo.refs:
            return repo.refs[revision]
        rev = revision.lower()
        if _HEX40.fullmatch(rev):
            return rev if rev in repo.commits else None
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            matches = [sha for sha in repo.commits if sha.startswith(rev)]
            return matches[0] if len(matches) == 1 else None
        return None

    def _resolve_or_raise(self, repo: _Repo, revision: str) -> str:
        sha = self._resolve(repo, revision)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _is_lfs_path(self, path: str, size: int) -> bool:
        if size == 0:
            return False
        if size >= self.lfs_threshold:
            return True
        name = path.rsplit("/", 1)[-1]
        for pattern in self.lfs_patterns:
            if "/" in pattern:
                if fnmatch.fnmatchcase(path, pattern.replace("**/", "*")):
                    return True
            elif fnmatch.fnmatchcase(name, pattern):
                return True
        return False

    def _file_json(self, path: str, entry: _FileEntry) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            pointer_size = len(_lfs_pointer(entry.sha256, entry.size))
            out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer_size}
        return out

    @staticmethod
    def _folder_json(path: str, files: dict[str, _FileEntry]) -> dict:
        prefix = path + "/"
        seed = json.dumps(sorted((p, e.sha256) for p, e in files.items() if p.startswith(prefix)))
        return {"type": "directory", "oid": hashlib.sha1(seed.encode()).hexdigest(), "path": path}


# --------------------------------------------------------------------------- request handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this many seconds

    # -- plumbing -------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):].strip() == self.hub.token

    def _require_write_auth(self) -> None:
        if self.hub.require_auth_for_write and not self._token_ok():
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        head_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", str(len(body) if head_length is None else head_length))
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self._status = status

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, err: _HTTPError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:500], **err.headers}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._send_json(err.status, {"error": err.message}, headers)

    def _dispatch(self, method: str) -> None:
        self._status = 0
        raw_path = self.path
        try:
            body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            failure = self.hub._take_failure(method, raw_path)
            if failure is not None:
                message = failure.message or f"Injected failure ({failure.status}) for {method} {raw_path}"
                raise _HTTPError(failure.status, message, failure.error_code)
            self._route(method, body)
        except _HTTPError as err:
            self._send_error(err)
        except Exception as exc:  # a bug in the fake server: report it to the client as a 500
            import traceback

            traceback.print_exc()
            self._send_error(_HTTPError(500, f"Fake hub internal error: {exc!r}"))
        finally:
            self.hub._record(method, raw_path, self._status)

    # -- routing ----------------------------------------------------------------
    def _route(self, method: str, body: bytes) -> None:
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query)
        segments = [s for s in path.split("/") if s != ""]  # still percent-encoded

        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(body)
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(body)
        if path == "/api/validate-yaml" and method == "POST":
            return self._send_json(200, {"errors": [], "warnings": []})
        if len(segments) >= 3 and segments[0] == "api" and segments[1] in _REPO_TYPES:
            return self._api_repo(method, _REPO_TYPES[segments[1]], segments[2:], query, body)
        if len(segments) == 3 and segments[:2] == ["_lfs", "upload"] and method == "PUT":
            return self._lfs_upload(unquote(segments[2]), body)
        if len(segments) == 2 and segments == ["_lfs", "verify"] and method == "POST":
            return self._lfs_verify(body)
        if len(segments) == 3 and segments[:2] == ["_lfs", "objects"] and method in ("GET", "HEAD"):
            return self._lfs_download(unquote(segments[2]))
        match = re.fullmatch(r"/(?:(datasets|spaces)/)?(.+)\.git/info/lfs/objects/batch", path)
        if match and method == "POST":
            repo_type = _REPO_TYPES[match.group(1)] if match.group(1) else "model"
            return self._lfs_batch(repo_type, unquote(match.group(2)), body)
        match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+(?:/[^/]+)?)/resolve/([^/]+)/(.+)", path)
        if match and method in ("GET", "HEAD"):
            repo_type = _REPO_TYPES[match.group(1)] if match.group(1) else "model"
            repo_id, revision, filename = (unquote(match.group(i)) for i in (2, 3, 4))
            return self._resolve_file(repo_type, repo_id, revision, filename)
        raise _HTTPError(404, f"Fake hub: no route for {method} {path}")

    def _api_repo(self, method: str, repo_type: str, rest: list[str], query: dict, body: bytes) -> None:
        # /api/{type}s/{ns}/{name}[/{action}/...] or legacy /api/{type}s/{name}[/{action}/...]
        if len(rest) >= 3 and rest[2] in _API_ACTIONS:
            repo_id, action, args = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2], rest[3:]
        elif len(rest) == 2:
            repo_id, action, args = f"{unquote(rest[0])}/{unquote(rest[1])}", None, []
        elif len(rest) >= 2 and rest[1] in _API_ACTIONS:
            repo_id, action, args = unquote(rest[0]), rest[1], rest[2:]
        elif len(rest) == 1:
            repo_id, action, args = unquote(rest[0]), None, []
        else:
            raise _HTTPError(404, f"Fake hub: no route for {method} {self.path}")

        hub = self.hub
        with hub._lock:
            repo = hub._get_repo_or_raise(repo_type, repo_id, token_ok=self._token_ok())
            if action is None and method == "GET":
                return self._repo_info(repo, "main", query)
            if action == "revision" and method == "GET" and args:
                return self._repo_info(repo, unquote("/".join(args)), query)
            if action == "tree" and method == "GET" and args:
                sub = "/".join(unquote(a) for a in args[1:])
                return self._tree(repo, unquote(args[0]), sub, query)
            if action == "refs" and method == "GET":
                return self._refs(repo)
            if action == "paths-info" and method == "POST" and args:
                return self._paths_info(repo, unquote(args[0]), body)
            if action == "preupload" and method == "POST" and args:
                self._require_write_auth()
                return self._preupload(repo, unquote(args[0]), body)
            if action == "commit" and method == "POST" and args:
                self._require_write_auth()
                create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
                return self._commit(repo, unquote(args[0]), body, create_pr)
            if action == "branch" and args and method in ("POST", "DELETE"):
                self._require_write_auth()
                return self._branch(repo, method, unquote("/".join(args)), body)
        raise _HTTPError(404, f"Fake hub: no route for {method} {self.path}")

    # -- endpoints --------------------------------------------------------------
    def _whoami(self) -> None:
        if not self._token_ok():
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        hub = self.hub
        self._send_json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": hub.user,
                "fullname": "Test User",
                "email": f"{hub.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def _create_repo(self, body: bytes) -> None:
        self._require_write_auth()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name:
            raise _HTTPError(400, "Missing repo name")
        hub = self.hub
        repo_id = f"{payload.get('organization') or hub.user}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HTTPError(400, f"Unsupported repo type {repo_type!r}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        url = hub.repo_url(repo_id, repo_type)
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # The client reads "url" from the 409 body too (create_repo(exist_ok=True)).
                return self._send_json(409, {"error": "You already created this model repo", "url": url})
            hub._create_repo(repo_type, repo_id, private)
        self._send_json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _delete_repo(self, body: bytes) -> None:
        self._require_write_auth()
        payload = json.loads(body or b"{}")
        hub = self.hub
        repo_id = f"{payload.get('organization') or hub.user}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        with hub._lock:
            if hub._repos.pop((repo_type, repo_id), None) is None:
                raise _HTTPError(404, "Repository not found", "RepoNotFound")
        self._send_json(200, {})

    def _repo_info(self, repo: _Repo, revision: str, query: dict) -> None:
        hub = self.hub
        sha = hub._resolve_or_raise(repo, revision)
        commit = repo.commits[sha]
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update({"size": entry.size, "blobId": entry.git_oid})
                if entry.lfs:
                    pointer_size = len(_lfs_pointer(entry.sha256, entry.size))
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": pointer_size}
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo.repo_type == "space":
            info["sdk"] = "static"
        self._send_json(200, info)

    def _tree(self, repo: _Repo, revision: str, sub: str, query: dict) -> None:
        hub = self.hub
        files = repo.commits[hub._resolve_or_raise(repo, revision)].files
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        sub = sub.strip("/")
        prefix = sub + "/" if sub else ""
        if sub and sub in files:  # the Hub answers 404 for a file path
            raise _HTTPError(404, f"{sub} is a file, not a folder", "EntryNotFound")
        if sub and not any(p.startswith(prefix) for p in files):
            raise _HTTPError(404, f"Path {sub} does not exist", "EntryNotFound")
        out: list[dict] = []
        folders: set[str] = set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            # folders between `sub` and the file
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                out.append(hub._file_json(path, files[path]))
        out = [hub._folder_json(f, files) for f in sorted(folders)] + out
        self._send_json(200, out)

    def _paths_info(self, repo: _Repo, revision: str, body: bytes) -> None:
        hub = self.hub
        files = repo.commits[hub._resolve_or_raise(repo, revision)].files
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(hub._file_json(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(hub._folder_json(path, files))
        self._send_json(200, out)

    def _refs(self, repo: _Repo) -> None:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in repo.refs.items()
            if not name.startswith("refs/")
        ]
        self._send_json(200, {"branches": branches, "tags": [], "converts": []})

    def _branch(self, repo: _Repo, method: str, branch: str, body: bytes) -> None:
        hub = self.hub
        if method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise _HTTPError(404, f"Branch {branch} not found", "RevisionNotFound")
            del repo.refs[branch]
            return self._send_json(200, {})
        if branch in repo.refs:
            raise _HTTPError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.refs[branch] = hub._resolve_or_raise(repo, starting_point)
        self._send_json(200, {})

    def _preupload(self, repo: _Repo, revision: str, body: bytes) -> None:
        hub = self.hub
        sha = hub._resolve_or_raise(repo, revision)
        files = repo.commits[sha].files
        payload = json.loads(body or b"{}")
        out = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            existing = files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if hub._is_lfs_path(path, size) else "regular",
                    "shouldIgnore": False,
                    "oid": (existing.sha256 if existing.lfs else existing.git_oid) if existing else None,
                }
            )
        self._send_json(200, {"files": out, "commitOid": sha})

    def _commit(self, repo: _Repo, revision: str, body: bytes, create_pr: bool) -> None:
        hub = self.hub
        if revision not in repo.refs:
            raise _HTTPError(404, f"Invalid rev id: {revision} (commits must target a branch)", "RevisionNotFound")
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as exc:
            raise _HTTPError(400, f"Invalid NDJSON payload: {exc}") from exc
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise _HTTPError(400, "Missing commit header / summary")

        base_sha = repo.refs[revision]
        parent_commit = header.get("parentCommit")
        if parent_commit and not base_sha.startswith(parent_commit.lower()):
            raise _HTTPError(412, f"A commit has happened since. Parent commit {parent_commit} is not {base_sha}")
        files = dict(repo.commits[base_sha].files)

        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "header":
                continue
            path = str(value.get("path", "")).lstrip("/")
            if key == "file":
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError) as exc:
                        raise _HTTPError(400, f"Invalid base64 content for {path}") from exc
                else:
                    data = content.encode()
                files[path] = hub._store_blob(data, lfs=False)
            elif key == "lfsFile":
                oid = value.get("oid", "")
                if oid not in hub._lfs_objects:
                    raise _HTTPError(400, f"LFS object {oid} for {path} was not uploaded")
                data = hub._blobs[oid]
                if value.get("size") is not None and int(value["size"]) != len(data):
                    raise _HTTPError(400, f"Size mismatch for LFS file {path}")
                files[path] = _FileEntry(sha256=oid, size=len(data), lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _HTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HTTPError(400, f"Unsupported commit operation {key!r}")

        summary, description = header["summary"], header.get("description", "")
        prefix = f"{hub.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"
        pr_url = None
        if create_pr:
            repo.n_prs += 1
            ref = f"refs/pr/{repo.n_prs}"
            pr_url = f"{prefix}/discussions/{repo.n_prs}"
        else:
            ref = revision
        commit = hub._add_commit(repo, ref, base_sha, summary, description, files)
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{prefix}/commit/{commit.sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        hub = self.hub
        self._require_write_auth()
        with hub._lock:
            hub._get_repo_or_raise(repo_type, repo_id, token_ok=self._token_ok())
            known = set(hub._lfs_objects)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise _HTTPError(400, "Fake hub only supports LFS uploads through the batch API")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in known:
                item["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{hub.url}/_lfs/verify", "header": {}},
                }
            objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str, body: bytes) -> None:
        hub = self.hub
        actual = hashlib.sha256(body).hexdigest()
        if actual != oid:
            raise _HTTPError(400, f"sha256 mismatch: expected {oid}, got {actual} ({len(body)} bytes)")
        with hub._lock:
            hub._blobs.setdefault(oid, body)
            hub._lfs_objects.add(oid)
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        hub = self.hub
        with hub._lock:
            oid = payload.get("oid")
            ok = oid in hub._lfs_objects and len(hub._blobs[oid]) == int(payload.get("size", -1))
        if not ok:
            raise _HTTPError(404, f"LFS object {payload.get('oid')} not found or size mismatch")
        self._send_json(200, {})

    def _lfs_download(self, oid: str) -> None:
        hub = self.hub
        with hub._lock:
            data = hub._blobs.get(oid) if oid in hub._lfs_objects else None
        if data is None:
            raise _HTTPError(404, "Not found")
        self._send_bytes(data, {"ETag": f'"{oid}"'})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo_or_raise(repo_type, repo_id, token_ok=self._token_ok())
            sha = hub._resolve_or_raise(repo, revision)
            entry = repo.commits[sha].files.get(filename)
            if entry is None:
                raise _HTTPError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": sha})
            data = hub._blobs[entry.sha256]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
            if hub.lfs_redirect:
                location = f"http://localhost:{hub.port}/_lfs/objects/{entry.sha256}"
                return self._send(302, b"", {**headers, "Location": location}, content_type="text/plain")
        self._send_bytes(data, headers)

    def _send_bytes(self, data: bytes, headers: dict[str, str]) -> None:
        headers = {**headers, "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)) and self.command == "GET":
            total = len(data)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            else:  # suffix range: last N bytes
                start, end = max(total - int(match.group(2)), 0), total - 1
            if start >= total or start > end:
                raise _HTTPError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{total}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            return self._send(206, data[start:end + 1], headers, content_type="application/octet-stream")
        self._send(200, data, headers, content_type="application/octet-stream")


# --------------------------------------------------------------------------- client configuration

# huggingface_hub.constants attribute -> value factory (given endpoint, hf_home)
def _constant_values(endpoint: str, hf_home: str) -> dict[str, Any]:
    hub_cache = os.path.join(hf_home, "hub")
    assets = os.path.join(hf_home, "assets")
    token_path = os.path.join(hf_home, "token")
    return {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": hf_home,
        "default_cache_path": hub_cache,
        "default_assets_cache_path": assets,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets,
        "HF_ASSETS_CACHE": assets,
        "default_xet_cache_path": os.path.join(hf_home, "xet"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": token_path,
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }


# Names that other modules copy with `from huggingface_hub.constants import NAME`.
_COPIED_NAMES = (
    "ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET",
)


# Values configure_hf_env() has set before, per name: a module imported *during* an earlier test copied
# them (e.g. `from huggingface_hub.constants import ENDPOINT`, or `api = HfApi()` at import time) and
# still holds the URL / cache path of a server that is gone; those are re-pointed too.
_PREVIOUSLY_SET: dict[str, set] = {}


def _iter_modules() -> Iterator[Any]:
    for name, module in list(sys.modules.items()):
        if module is None or name == "huggingface_hub.constants" or name == __name__:
            continue
        yield module


def configure_hf_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike, token: str = DEFAULT_TOKEN
) -> None:
    """Point ``huggingface_hub`` / ``transformers`` at `endpoint`, with `hf_home` as HF_HOME, using `monkeypatch`.

    Works whether or not ``huggingface_hub`` was imported already: environment variables are set
    for modules imported later, and values computed at import time are patched in place.
    """
    hf_home = os.fspath(hf_home)
    endpoint = endpoint.rstrip("/")
    os.makedirs(hf_home, exist_ok=True)
    values = _constant_values(endpoint, hf_home)

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": values["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": values["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": values["HF_XET_CACHE"],
        "HF_TOKEN_PATH": values["HF_TOKEN_PATH"],
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE",
        "HF_OIDC_RESOURCE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    ):
        monkeypatch.delenv(key, raising=False)

    import huggingface_hub.constants as hf_constants
    from huggingface_hub import HfApi

    stale = {
        name: {getattr(hf_constants, name), *_PREVIOUSLY_SET.get(name, ())}
        for name in _COPIED_NAMES
        if hasattr(hf_constants, name)
    }
    stale_endpoints = stale["ENDPOINT"] | {hf_constants._HF_DEFAULT_ENDPOINT}
    for name, value in values.items():
        if hasattr(hf_constants, name):
            monkeypatch.setattr(hf_constants, name, value)

    # Copies made by `from ..constants import X` (e.g. utils._cache_manager.HF_HUB_CACHE,
    # utils._git_credential.ENDPOINT) and module-level HfApi instances (hf_api.api, ...).
    for module in _iter_modules():
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for name, value in list(namespace.items()):
            if name in stale and type(value) is type(values[name]) and value in stale[name]:
                monkeypatch.setattr(module, name, values[name])
            elif issubclass(type(value), HfApi) and value.endpoint in stale_endpoints:  # type(): no __class__ lookup
                monkeypatch.setattr(value, "endpoint", endpoint)
                if getattr(value, "_whoami_cache", None):
                    monkeypatch.setattr(value, "_whoami_cache", {})

    for name in stale:
        _PREVIOUSLY_SET.setdefault(name, set()).add(values[name])

    # transformers caches one HfApi (created lazily with the endpoint of that time).
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)

    # `datasets` keeps its own copy of the endpoint / offline flag (best effort: only the config is patched).
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        for name, value in (
            ("HF_ENDPOINT", endpoint),
            ("HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
            ("HF_HUB_OFFLINE", False),
            ("HF_DATASETS_OFFLINE", False),
        ):
            monkeypatch.setattr(datasets_config, name, value, raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    _close_hf_session()


def _close_hf_session() -> None:
    """Drop huggingface_hub's shared httpx client (it is rebuilt on next use)."""
    try:
        from huggingface_hub.utils import close_session
    except ImportError:  # pragma: no cover - very old huggingface_hub
        return
    close_session()


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running :class:`HubServer`, with huggingface_hub/transformers pointed at it (see module docstring)."""
    server = HubServer().start()
    try:
        configure_hf_env(monkeypatch, server.url, tmp_path_factory.mktemp("hf_home"), token=server.token)
        yield server
    finally:
        _close_hf_session()
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            # an HfApi created during the test holds this server's URL; don't leak it to later tests
            transformers_hub._hf_api = None
        server.stop()
