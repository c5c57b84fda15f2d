"""A local HTTP server speaking the few GitLab API v4 endpoints farm uses, recording every request.

Endpoints: project lookup (GET /projects/:path), merge requests of a project (GET list with
source_branch/state filters, POST create, PUT update). Requests without the expected PRIVATE-TOKEN
get 401. ``GitLabStub.requests`` holds (method, path, query, json body) of each call.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: dict | None
    token: str | None


@dataclass
class GitLabStub:
    token: str
    project: str = "farm/libvirt"
    project_id: int = 42
    requests: list[Request] = field(default_factory=list)
    merge_requests: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                token = self.headers.get("PRIVATE-TOKEN")
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                with stub._lock:
                    stub.requests.append(Request(method, unquote(parts.path), query, body, token))
                    status, answer = stub._route(method, parts.path, query, body, token)
                self._reply(status, answer)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GitLabStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _project_json(self) -> dict:
        return {"id": self.project_id, "path_with_namespace": self.project,
                "web_url": f"{self.url}/{self.project}"}

    def _route(self, method: str, path: str, query: dict, body: dict | None, token: str | None):
        if token != self.token:
            return 401, {"message": "401 Unauthorized"}
        prefix = "/api/v4/projects/"
        if not path.startswith(prefix):
            return 404, {"message": "404 Not Found"}
        rest = path[len(prefix):]
        ident, _, tail = rest.partition("/")
        if unquote(ident) not in (self.project, str(self.project_id)):
            return 404, {"message": "404 Project Not Found"}
        if method == "GET" and tail == "":
            return 200, self._project_json()
        if tail == "merge_requests" and method == "GET":
            found = [mr for mr in self.merge_requests
                     if all(str(mr.get(k)) == v for k, v in query.items() if k in ("source_branch", "state"))]
            return 200, found
        if tail == "merge_requests" and method == "POST":
            body = body or {}
            if any(mr["source_branch"] == body.get("source_branch") and mr["state"] == "opened"
                   for mr in self.merge_requests):
                return 409, {"message": ["Another open merge request already exists for this source branch"]}
            iid = len(self.merge_requests) + 1
            mr = {**body, "id": 1000 + iid, "iid": iid, "project_id": self.project_id, "state": "opened",
                  "web_url": f"{self.url}/{self.project}/-/merge_requests/{iid}"}
            self.merge_requests.append(mr)
            return 201, mr
        if tail.startswith("merge_requests/") and method == "PUT":
            iid = int(tail.split("/")[1])
            for mr in self.merge_requests:
                if mr["iid"] == iid:
                    mr.update(body or {})
                    return 200, mr
            return 404, {"message": "404 Not found"}
        return 404, {"message": "404 Not Found"}
