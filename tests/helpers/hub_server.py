"""A Hugging Face Hub look-alike on 127.0.0.1 for the tests: enough of the API for upload and download round trips.

huggingface_hub uses these endpoints for `create_repo`, `upload_folder`/`create_commit`, `hf_hub_download` and
`file_exists`; they are implemented here, with files kept in memory and every file uploaded as a regular (non-LFS)
blob. Anything else answers 404 and is recorded in `HubServer.unknown`, so a test can see what was missing.

Run standalone (``python tests/helpers/hub_server.py PORT``) to serve a fresh process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


class Repo:
    """One model repo: its files (path -> bytes) on a single branch, and the commits made to it."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = [hashlib.sha1(b"initial").hexdigest()]

    @property
    def head(self) -> str:
        return self.commits[-1]


class HubServer:
    """The server: `start()` serves on a background thread, `url` is the value for `HF_ENDPOINT`.

    Args:
        port: Port on 127.0.0.1; 0 picks a free one.
    """

    def __init__(self, port: int = 0) -> None:
        self.repos: dict[str, Repo] = {}
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass  # keep test output clean

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        # No keep-alive: a client's pooled connection would otherwise outlive this server and reach a stopped
        # server's handler thread (and its repos) in the next test.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, what: str, head: bool = False) -> None:
        self.hub.unknown.append(f"{self.command} {self.path}")
        self._send(
            404,
            json.dumps({"error": what}).encode(),
            {"Content-Type": "application/json", "X-Error-Code": what, "X-Error-Message": what},
            head=head,
        )

    def _repo(self, repo_id: str) -> Repo | None:
        return self.hub.repos.get(repo_id)

    # ------------------------------------------------------------------ routes

    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            info = json.loads(body or b"{}")
            repo_id = f"{info.get('organization') or 'user'}/{info['name']}"
            with self.hub.lock:
                exists = repo_id in self.hub.repos
                self.hub.repos.setdefault(repo_id, Repo())
            if exists:
                self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            else:
                self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
            return
        if path == "/api/validate-yaml":  # checks README.md's metadata block, as the Hub does before a commit
            self._validate_yaml(json.loads(body)["content"])
            return
        if m := re.fullmatch(rf"/api/models/{_REPO}/preupload/{_REV}", path):
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            self._json(200, {"files": modes})
            return
        if m := re.fullmatch(rf"/api/models/{_REPO}/commit/{_REV}", path):
            self._commit(m["repo"], body)
            return
        self._not_found("EntryNotFound")

    def _validate_yaml(self, content: str) -> None:
        import yaml

        parts = content.split("---")
        if not content.startswith("---") or len(parts) < 3:
            self._json(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
            return
        try:
            meta = yaml.safe_load(parts[1])
        except yaml.YAMLError as exc:
            self._json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            return
        if not isinstance(meta, dict):
            self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
            return
        self._json(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            self._not_found("RepoNotFound")
            return
        with self.hub.lock:
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    repo.files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    repo.files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for name in [n for n in repo.files if n.startswith(prefix)]:
                        del repo.files[name]
                elif key != "header":
                    self._json(400, {"error": f"unsupported commit operation {key!r} (only regular files)"})
                    return
            digest = hashlib.sha1(repr((repo.head, sorted(repo.files.items()))).encode()).hexdigest()
            repo.commits.append(digest)
        self._json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{digest}", "commitOid": digest, "pullRequestUrl": None},
        )

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry: an empty one
            self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return
        if m := re.fullmatch(rf"/{_REPO}/resolve/{_REV}/(?P<file>.+)", path):
            repo = self._repo(m["repo"])
            if repo is None:
                self._not_found("RepoNotFound", head)
                return
            data = repo.files.get(m["file"])
            if data is None:
                headers = {"X-Repo-Commit": repo.head, "X-Error-Code": "EntryNotFound"}
                self._send(404, b"", headers, head=head)
                return
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            headers = {"X-Repo-Commit": repo.head, "ETag": etag, "Content-Type": "application/octet-stream"}
            self._send(200, data, headers, head=head)
            return
        if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/{_REV})?", path):
            repo = self._repo(m["repo"])
            if repo is None:
                self._not_found("RepoNotFound", head)
                return
            siblings = [{"rfilename": name} for name in sorted(repo.files)]
            self._json(200, {"id": m["repo"], "modelId": m["repo"], "sha": repo.head, "siblings": siblings})
            return
        if m := re.fullmatch(rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.*))?", path):
            repo = self._repo(m["repo"])
            if repo is None:
                self._not_found("RepoNotFound", head)
                return
            prefix = (m["sub"] or "").strip("/")
            prefix = prefix + "/" if prefix else ""
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(repo.files.items())
                if name.startswith(prefix)
            ]
            self._json(200, entries)
            return
        self._not_found("EntryNotFound", head)


if __name__ == "__main__":
    server = HubServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.url, flush=True)
    server.httpd.serve_forever()
