"""A local stand-in for the Hugging Face Hub: what huggingface_hub asks of it to download a file.

Two HTTP servers, as on the real Hub: the Hub answers `HEAD /{repo}/resolve/{revision}/{file}` with
a redirect to its storage (another origin) and the file's metadata in headers: X-Repo-Commit,
X-Linked-Etag (an LFS file's SHA-256) and X-Linked-Size; unknown repositories and files get 404
with X-Error-Code. The storage serves `GET /blobs/{sha256}`, with `Range: bytes=N-` (206). Faults
on demand: advertise a different SHA-256, serve corrupted bytes, cut the connection after N bytes,
answer 503, run a test's code while a download is under way. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    content: bytes
    sha256: str = ""  # what the Hub advertises; default: the content's real SHA-256
    served: bytes | None = None  # what storage sends instead of `content` (corruption)

    def __post_init__(self) -> None:
        self.sha256 = self.sha256 or hashlib.sha256(self.content).hexdigest()


@dataclass
class Request:
    server: str  # "hub" or "storage"
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Faults:
    cut_after: int | None = None  # storage: close the connection once this offset is reached
    fail_gets: int = 0  # storage: answer this many GETs (after a cut) with 503
    cut_once: bool = True
    before_body: Callable[[], None] | None = None  # storage: run once, just before a GET's body


@dataclass
class FakeHub:
    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)  # (repo, file) -> file
    faults: Faults = field(default_factory=Faults)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self._storage = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "storage"))
        self._threads = [
            threading.Thread(target=s.serve_forever, name=f"fakehub-{n}", daemon=True)
            for n, s in (("hub", self._hub), ("storage", self._storage))
        ]
        for t in self._threads:
            t.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def storage(self) -> str:
        return f"http://127.0.0.1:{self._storage.server_address[1]}"

    def add(self, repo: str, name: str, hub_file: HubFile) -> HubFile:
        self.files[(repo, name)] = hub_file
        return hub_file

    def seen(self, server: str, method: str | None = None) -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.server == server and (method is None or r.method == method)
            ]

    def close(self) -> None:
        for s in (self._hub, self._storage):
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")


def _handler(hub: FakeHub, role: str) -> Any:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _record(self) -> None:
            with hub._lock:
                hub.requests.append(
                    Request(
                        role,
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                    )
                )

        def _empty(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._record()
            if role == "hub":
                self._resolve()
            else:
                self._empty(405, {})

        def do_GET(self) -> None:
            self._record()
            if role == "hub":
                self._resolve()
            else:
                self._blob()

        def _resolve(self) -> None:
            m = _RESOLVE.match(self.path)
            if not m:
                self._empty(404, {})
                return
            repos = {repo for repo, _ in hub.files}
            if m["repo"] not in repos:
                self._empty(404, {"X-Error-Code": "RepoNotFound"})
                return
            f = hub.files.get((m["repo"], m["file"]))
            if f is None:
                self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            self._empty(
                302,
                {
                    "Location": f"{hub.storage}/blobs/{f.sha256}",
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.content)),
                    "ETag": '"a-git-blob-sha1-not-a-sha256"',
                },
            )

        def _blob(self) -> None:
            sha = self.path.rsplit("/", 1)[-1]
            f = next((f for f in hub.files.values() if f.sha256 == sha), None)
            if f is None:
                self._empty(404, {})
                return
            with hub._lock:
                if hub.faults.fail_gets and hub.faults.cut_after is None:
                    hub.faults.fail_gets -= 1
                    fail = True
                else:
                    fail = False
            if fail:
                self._empty(503, {"Retry-After": "0"})
                return
            data = f.served if f.served is not None else f.content
            start = 0
            rng = _RANGE.match(self.headers.get("Range", ""))
            if rng:
                start = int(rng[1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            with hub._lock:
                cut = hub.faults.cut_after
                if cut is not None and hub.faults.cut_once:
                    hub.faults.cut_after = None
                hook, hub.faults.before_body = hub.faults.before_body, None
            if hook is not None:
                hook()
            end = len(data) if cut is None or cut <= start else cut
            for pos in range(start, end, 1 << 16):
                self.wfile.write(data[pos : min(end, pos + (1 << 16))])
            if end < len(data):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler
