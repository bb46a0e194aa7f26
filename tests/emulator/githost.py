"""Real git hosting for the Gitea emulator: bare repositories on disk, served over smart HTTP by
`git http-backend` (CGI), plus the few plumbing operations the API needs (branches, merge).
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path

# A fixed identity, so commits the emulator makes never pick up the user's git config.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "Gitea Emulator",
    "GIT_AUTHOR_EMAIL": "emulator@gitea.invalid",
    "GIT_COMMITTER_NAME": "Gitea Emulator",
    "GIT_COMMITTER_EMAIL": "emulator@gitea.invalid",
}


class GitError(Exception):
    """A git command failed; carries its stderr."""


class MergeConflict(GitError):
    """The head branch does not merge cleanly into the base."""


class GitHost:
    """Bare repositories under `root`, laid out as `{owner}/{name}.git` like Gitea's."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            **_IDENTITY,
        }

    def path(self, owner: str, name: str) -> Path:
        return self.root / owner / f"{name}.git"

    def git(self, owner: str, name: str, *args: str, input: str | None = None,
            env: Mapping[str, str] | None = None) -> str:
        """Run git in the bare repo and return stdout; raise GitError on failure."""
        proc = subprocess.run(
            ["git", "--git-dir", str(self.path(owner, name)), *args],
            capture_output=True, text=True, input=input, env={**self.env, **(env or {})},
            timeout=60,
        )
        if proc.returncode != 0:
            raise GitError(f"git {args[0]}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def create(self, owner: str, name: str, default_branch: str, readme: str) -> str:
        """A bare repo whose default branch holds one commit adding README.md; returns its sha."""
        path = self.path(owner, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "init", "-q", "--bare", "-b", default_branch, str(path)],
            check=True, env=self.env, capture_output=True,
        )
        self.git(owner, name, "config", "http.receivepack", "true")
        return self.commit(owner, name, default_branch, {"README.md": readme}, "Initial commit")

    def commit(self, owner: str, name: str, branch: str, files: Mapping[str, str], message: str,
               *, start: str | None = None) -> str:
        """Commit `files` (path -> text) on top of `branch` (or `start` if the branch is new)."""
        parent = self.rev(owner, name, branch) or (self.rev(owner, name, start) if start else None)
        index = {"GIT_INDEX_FILE": str(self.path(owner, name) / "emulator-index")}
        try:
            if parent:
                self.git(owner, name, "read-tree", parent, env=index)
            else:
                self.git(owner, name, "read-tree", "--empty", env=index)
            for rel, text in files.items():
                blob = self.git(owner, name, "hash-object", "-w", "--stdin", input=text)
                self.git(owner, name, "update-index", "--add", "--cacheinfo", f"100644,{blob},{rel}",
                         env=index)
            tree = self.git(owner, name, "write-tree", env=index)
        finally:
            Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        sha = self.git(owner, name, *args)
        self.git(owner, name, "update-ref", f"refs/heads/{branch}", sha)
        return sha

    def rev(self, owner: str, name: str, ref: str) -> str | None:
        """The commit sha of a branch name or sha, or None if there is no such commit."""
        for candidate in (f"refs/heads/{ref}", ref):
            try:
                return self.git(owner, name, "rev-parse", "--verify", "--quiet",
                                f"{candidate}^{{commit}}")
            except GitError:
                continue
        return None

    def branches(self, owner: str, name: str) -> dict[str, str]:
        out = self.git(owner, name, "for-each-ref", "--format=%(refname:short) %(objectname)",
                       "refs/heads/")
        return dict(line.split(" ", 1) for line in out.splitlines() if line)

    def log(self, owner: str, name: str, ref: str) -> list[tuple[str, str]]:
        """(sha, subject) of each commit reachable from `ref`, newest first."""
        out = self.git(owner, name, "log", "--format=%H %s", ref)
        return [tuple(line.split(" ", 1)) for line in out.splitlines()]  # type: ignore[misc]

    def commit_info(self, owner: str, name: str, sha: str) -> dict[str, str]:
        fields = self.git(owner, name, "show", "-s", "--format=%H%x00%an%x00%ae%x00%cn%x00%ce%x00%cI%x00%B", sha)
        keys = ["sha", "author_name", "author_email", "committer_name", "committer_email", "date", "message"]
        return dict(zip(keys, fields.split("\x00", 6), strict=True))

    def merge_base(self, owner: str, name: str, a: str, b: str) -> str:
        try:
            return self.git(owner, name, "merge-base", a, b)
        except GitError:
            return ""

    def merge(self, owner: str, name: str, head: str, base: str, message: str) -> str:
        """Merge `head` into `base` with a merge commit (Gitea's default style); returns its sha."""
        head_sha, base_sha = self.rev(owner, name, head), self.rev(owner, name, base)
        if not head_sha or not base_sha:
            raise GitError(f"missing branch {head if not head_sha else base}")
        proc = subprocess.run(
            ["git", "--git-dir", str(self.path(owner, name)), "merge-tree", "--write-tree",
             base_sha, head_sha],
            capture_output=True, text=True, env=self.env, timeout=60,
        )
        if proc.returncode == 1:
            raise MergeConflict(proc.stdout.strip())
        if proc.returncode != 0:
            raise GitError(f"git merge-tree: {proc.stderr.strip()}")
        tree = proc.stdout.split("\n", 1)[0].strip()
        sha = self.git(owner, name, "commit-tree", tree, "-p", base_sha, "-p", head_sha, "-m", message)
        self.git(owner, name, "update-ref", f"refs/heads/{base}", sha, base_sha)
        return sha

    def delete_branch(self, owner: str, name: str, branch: str) -> None:
        self.git(owner, name, "update-ref", "-d", f"refs/heads/{branch}")

    # -- smart HTTP --------------------------------------------------------------------------

    def serve(self, handler: BaseHTTPRequestHandler, path: str, query: str, user: str,
              on_status: Callable[[int], None] = lambda status: None) -> int:
        """Answer one smart-HTTP request by running `git http-backend`; returns the status sent.

        `on_status` hears the status before the response starts (the emulator records it).
        """
        env = {
            **self.env,
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "REQUEST_METHOD": handler.command,
            "CONTENT_TYPE": handler.headers.get("Content-Type", ""),
            "REMOTE_USER": user,
            "REMOTE_ADDR": handler.client_address[0],
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        # git sends large pushes gzipped and chunked; http-backend inflates gzip itself and, with
        # no CONTENT_LENGTH, reads the body to EOF, so chunked bodies are de-chunked on the way in.
        if handler.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = handler.headers["Content-Encoding"]
        if handler.headers.get("Git-Protocol"):
            env["HTTP_GIT_PROTOCOL"] = handler.headers["Git-Protocol"]
        chunked = "chunked" in handler.headers.get("Transfer-Encoding", "").lower()
        length = int(handler.headers.get("Content-Length") or 0)
        if not chunked and length:
            env["CONTENT_LENGTH"] = str(length)
        proc = subprocess.Popen(
            ["git", "http-backend"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        feeder = threading.Thread(
            target=_feed, args=(handler, proc, chunked, length), daemon=True
        )
        feeder.start()
        assert proc.stdout is not None
        status, headers = _read_cgi_headers(proc.stdout)
        on_status(status)
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Connection", "close")  # no length known: the body ends at close
        handler.end_headers()
        handler.close_connection = True
        while chunk := proc.stdout.read(65536):
            handler.wfile.write(chunk)
        proc.wait(timeout=60)
        feeder.join(timeout=5)
        return status


def _feed(handler: BaseHTTPRequestHandler, proc: subprocess.Popen, chunked: bool, length: int) -> None:
    assert proc.stdin is not None
    try:
        if chunked:
            while True:
                size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    handler.rfile.readline()
                    break
                proc.stdin.write(handler.rfile.read(size))
                handler.rfile.readline()
        else:
            remaining = length
            while remaining > 0:
                chunk = handler.rfile.read(min(65536, remaining))
                if not chunk:
                    break
                proc.stdin.write(chunk)
                remaining -= len(chunk)
    except (BrokenPipeError, ConnectionError, ValueError):
        pass
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def _read_cgi_headers(stream) -> tuple[int, list[tuple[str, str]]]:
    status, headers = 200, []
    while True:
        line = stream.readline()
        if not line or line in (b"\r\n", b"\n"):
            break
        key, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
        if key.lower() == "status":
            status = int(value.strip().split(" ", 1)[0])
        else:
            headers.append((key.strip(), value.strip()))
    return status, headers
