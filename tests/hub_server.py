"""A Hugging Face Hub on 127.0.0.1: the API and file endpoints huggingface_hub 2.x calls, served from memory.

Used through ``HF_ENDPOINT`` (subprocesses) or huggingface_hub's endpoint constant (in process), so tests run the
real huggingface_hub client against real HTTP, never a mock of the client.  What it answers (read from
huggingface_hub's own code: ``hf_api.py``, ``file_download.py``, ``_commit_api.py``, ``utils/_http.py``):

* ``GET /api/{models,datasets}/{repo}`` and ``.../revision/{rev}``: repo info with ``sha`` and ``siblings``;
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (datasets: ``/datasets/{repo}/resolve/...``): ``X-Repo-Commit``,
  ``ETag`` (sha256 of the bytes), ``Content-Length``; ``Range: bytes=N-`` or ``bytes=N-M`` gives 206 with
  ``Content-Range`` (resumed downloads; safetensors headers read without the data);
* ``POST /api/validate-yaml``, ``POST /api/{type}s/{repo}/preupload/{rev}`` (every file "regular", so contents
  travel inline), ``POST /api/{type}s/{repo}/commit/{rev}[?create_pr=1]`` (NDJSON: header + base64 files),
  ``POST /api/repos/create``;
* errors as the Hub sends them: 401 for a private repo without a reader's token (huggingface_hub maps it to
  ``RepositoryNotFoundError``), 403 ``GatedRepo`` for a gated one, 403 for a commit without write access, 404 with
  ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.

Fault injection (downloads only, not closed-range header reads): ``drop_after[(repo, path)] = n`` sends ``n`` body
bytes of the next GET of that file and closes the connection (once); ``stall_after[(repo, path)] = n`` sends ``n`` bytes and then blocks until the test releases
``stall_release`` (a process killed meanwhile leaves a half-downloaded file); a file in ``missing_downloads``
(``(repo, path)``) answers 404 ``EntryNotFound`` to downloads while its header reads still succeed (a file gone from
the Hub mid-stream).  ``log`` records every request.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    readers: frozenset = frozenset()  # tokens that may read a private / gated repo
    writers: frozenset = frozenset()  # tokens that may commit to its branches
    commits: dict = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict = field(default_factory=dict)  # branch / tag / refs/pr/N -> sha
    prs: int = 0


def commit_sha(files: dict[str, bytes], parent: str = "") -> str:
    digest = hashlib.sha1(parent.encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()


@dataclass
class Received:
    """One commit the server received: where, how, and the exact bytes of every file."""

    repo_id: str
    repo_type: str
    revision: str
    create_pr: bool
    summary: str
    files: dict
    sha: str
    pr_url: Optional[str]


class HubServer:
    """In-memory Hub; ``url`` is its endpoint.  Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, dict]] = []  # (method, path, selected headers)
        self.received: list[Received] = []
        self.drop_after: dict[tuple[str, str], int] = {}
        self.stall_after: dict[tuple[str, str], int] = {}
        self.missing_downloads: set[tuple[str, str]] = set()
        self.stalled = threading.Event()
        self.stall_release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------------------------- state
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", private: bool = False,
                 gated: bool = False, readers=(), writers=(), branch: str = "main") -> str:
        """Create (or extend) a repo with one commit holding ``files`` on ``branch``; returns the commit sha."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type, private, gated,
                                                                  frozenset(readers), frozenset(writers)))
        parent = repo.refs.get(branch, "")
        sha = commit_sha(files, parent)
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def gets(self, path_suffix: str) -> list[dict]:
        """Headers of every GET whose path ends with ``path_suffix``."""
        return [h for m, p, h in self.log if m == "GET" and p.endswith(path_suffix)]

    def start(self) -> "HubServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stall_release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------------------------------------- HTTP
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server.handle(self, "HEAD")

            def do_GET(self) -> None:
                server.handle(self, "GET")

            def do_POST(self) -> None:
                server.handle(self, "POST")

        return Handler

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(req.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        with self.lock:
            self.log.append((method, path, {k: req.headers[k] for k in ("Range", "Authorization")
                                            if req.headers.get(k)}))
        body = b""
        if method == "POST":
            body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        try:
            self.route(req, method, path, query, body)
        except OSError:  # the client went away (a killed download)
            pass

    def token(self, req) -> Optional[str]:
        auth = req.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def send(self, req, status: int, payload=None, headers: Optional[dict] = None, *, head: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload if payload is not None else {}).encode()
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        if "Content-Type" not in (headers or {}):
            req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if not head:
            req.wfile.write(data)

    def error(self, req, status: int, code: Optional[str], message: str, head: bool = False, extra=None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self.send(req, status, {"error": message}, headers, head=head)

    def find(self, repo_type: str, repo_id: str) -> Optional[Repo]:
        return self.repos.get((repo_type, repo_id))

    def check_read(self, req, repo: Optional[Repo], head: bool = False) -> bool:
        """False (and the Hub's error sent) when the repo is missing or the token may not read it."""
        token = self.token(req)
        if repo is None:
            self.error(req, 404, "RepoNotFound", "Repository not found", head)
            return False
        if repo.private and token not in repo.readers:
            self.error(req, 401, None, "Invalid username or password.", head)  # the Hub's answer, private repos
            return False
        if repo.gated and token not in repo.readers:
            self.error(req, 403, "GatedRepo", "Access to this model is restricted", head)
            return False
        return True

    def revision(self, req, repo: Repo, rev: str, head: bool = False) -> Optional[str]:
        rev = unquote(rev)
        sha = repo.refs.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self.error(req, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def route(self, req, method: str, path: str, query: dict, body: bytes) -> None:
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m and method == "GET":
            return self.repo_info(req, m.group(1)[:-1], m.group(2), m.group(3) or "main",
                                  blobs=query.get("blobs", ["false"])[0].lower() == "true")
        m = re.fullmatch(r"/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self.resolve(req, method, m.group(1)[:-1] if m.group(1) else "model", m.group(2), m.group(3),
                                m.group(4))
        if path == "/api/validate-yaml" and method == "POST":
            return self.send(req, 200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self.create_repo(req, json.loads(body))
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/preupload/(.+)", path)
        if m and method == "POST":
            files = json.loads(body).get("files", [])
            return self.send(req, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/commit/(.+)", path)
        if m and method == "POST":
            return self.commit(req, m.group(1)[:-1], m.group(2), unquote(m.group(3)),
                               query.get("create_pr", ["0"])[0] == "1", body)
        self.error(req, 404, None, f"no route for {method} {path}")

    def repo_info(self, req, repo_type: str, repo_id: str, rev: str, *, blobs: bool = False) -> None:
        """As the Hub: file sizes only when asked (``?blobs=true``, huggingface_hub's ``files_metadata=True``)."""
        repo = self.find(repo_type, repo_id)
        if not self.check_read(req, repo):
            return
        sha = self.revision(req, repo, rev)
        if sha is None:
            return
        files = repo.commits[sha]
        self.send(req, 200, {"id": repo_id, "sha": sha, "private": repo.private, "gated": repo.gated,
                             "siblings": [{"rfilename": p, **({"size": len(b)} if blobs else {})}
                                          for p, b in sorted(files.items())]})

    def resolve(self, req, method: str, repo_type: str, repo_id: str, rev: str, file: str) -> None:
        head = method == "HEAD"
        repo = self.find(repo_type, repo_id)
        if not self.check_read(req, repo, head):
            return
        sha = self.revision(req, repo, rev, head)
        if sha is None:
            return
        data = repo.commits[sha].get(file)
        closed_range = bool(re.fullmatch(r"bytes=\d+-\d+", req.headers.get("Range") or ""))
        if data is None or ((repo_id, file) in self.missing_downloads and not closed_range):
            return self.error(req, 404, "EntryNotFound", f"{file} does not exist", head, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, stop = 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range") or "")
        if match and not head:
            start = int(match.group(1))
            stop = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        if head:
            return self.send(req, 200, data, headers, head=True)
        key = (repo_id, file)
        drop = stall = None
        if not (match and match.group(2)):  # faults hit downloads, not header reads (closed ranges)
            drop, stall = self.drop_after.pop(key, None), self.stall_after.pop(key, None)
        req.send_response(206 if match else 200)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(stop - start))
        req.end_headers()
        cut = drop if drop is not None else stall
        if cut is None:
            req.wfile.write(data[start:stop])
            return
        req.wfile.write(data[start:start + cut])
        req.wfile.flush()
        if stall is not None:
            self.stalled.set()
            self.stall_release.wait(60)
        req.close_connection = True
        req.connection.shutdown(2)  # the connection drops half way through the body

    def create_repo(self, req, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        token = self.token(req)
        if token is None:
            return self.error(req, 401, None, "Invalid credentials in Authorization header")
        if self.find(repo_type, repo_id) is not None:
            return self.error(req, 409, None, "You already created this repo")
        self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, writers=frozenset({token}),
                                                readers=frozenset({token}))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self.send(req, 200, {"url": f"{self.url}/{prefix}{repo_id}"})

    def commit(self, req, repo_type: str, repo_id: str, rev: str, create_pr: bool, body: bytes) -> None:
        repo = self.find(repo_type, repo_id)
        if not self.check_read(req, repo):
            return
        token = self.token(req)
        if not create_pr and token not in repo.writers:
            return self.error(req, 403, None, "You don't have the rights to create a commit on this repo; "
                                              "open a pull request instead")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                 for item in lines if item["key"] == "file"}
        parent = repo.refs.get(rev, "") if repo.commits else ""
        files = {**repo.commits.get(parent, {}), **added}
        sha = commit_sha(files, parent + header["summary"])
        repo.commits[sha] = files
        pr_url = None
        if create_pr:
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = sha
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            pr_url = f"{self.url}/{prefix}{repo_id}/discussions/{repo.prs}"
        else:
            repo.refs[rev] = sha
        self.received.append(Received(repo_id, repo_type, rev, create_pr, header["summary"], added, sha, pr_url))
        self.send(req, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": pr_url})
