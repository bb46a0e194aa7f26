"""The model's four tools, confined to one sprint workspace.

Each tool is defined once (`Tool`): the JSON schema sent to the model and the argument checking
done before the call both come from that definition. A refused or failed call is an
`Observation(ok=False, output="error: ...")` for the model to read, never an exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import Observation, ToolCall
from .errors import ForgeError
from .forge import ForgeClient, split_repo

log = logging.getLogger(__name__)

_REQUIRED = object()


class ToolError(Exception):
    """A refusal or failure the model should read as a tool error."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str | None  # JSON schema type; None accepts any JSON value
    description: str
    default: Any = _REQUIRED

    def schema(self) -> dict:
        out: dict[str, Any] = {"description": self.description}
        if self.type:
            out["type"] = self.type
        if self.default is not _REQUIRED:
            out["default"] = self.default
        return out


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: tuple[Param, ...]
    fn: Callable[..., str | Observation]  # called as fn(workspace, **arguments)

    def schema(self) -> dict:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {p.name: p.schema() for p in self.params},
                    "required": [p.name for p in self.params if p.default is _REQUIRED],
                    "additionalProperties": False,
                },
            },
        }

    def bind(self, arguments: dict) -> dict:
        """Check arguments against the params and fill defaults; raises ToolError."""
        known = {p.name for p in self.params}
        extra = sorted(set(arguments) - known)
        if extra:
            raise ToolError(f"{self.name} takes no argument {', '.join(extra)}")
        out = {}
        for p in self.params:
            if p.name not in arguments:
                if p.default is _REQUIRED:
                    raise ToolError(f"{self.name} needs the argument {p.name!r}")
                out[p.name] = p.default
                continue
            out[p.name] = _coerce(self.name, p, arguments[p.name])
        return out


def _coerce(tool: str, p: Param, value: Any) -> Any:
    if p.type == "string" and isinstance(value, str):
        return value
    if p.type == "integer":
        # models often quote numbers; accept "60" but not True or 1.5
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    if p.type is None:
        return value
    raise ToolError(f"{tool}: {p.name} must be a {p.type}, got {type(value).__name__}")


# ---- output capping ------------------------------------------------------------------------


def cap(text: str, limit: int) -> str:
    """Keep the head and tail of `text` within about `limit` characters, marking the cut."""
    if len(text) <= limit:
        return text
    half = max(1, limit // 2)
    elided = len(text) - 2 * half
    return f"{text[:half]}\n[... {elided} characters elided ...]\n{text[-half:]}"


class _HeadTail:
    """Collects a byte stream in bounded memory: the first and last `limit` bytes and the total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            del self.tail[: max(0, len(self.tail) - self.limit)]

    def text(self, limit: int) -> str:
        if self.total <= len(self.head) + len(self.tail):
            return cap((self.head + self.tail).decode(errors="replace"), limit)
        half = max(1, limit // 2)
        head = self.head.decode(errors="replace")[:half]
        tail = self.tail.decode(errors="replace")[-half:]
        # counted in bytes of the dropped middle: exact for ASCII output, close otherwise
        elided = self.total - len(head.encode()) - len(tail.encode())
        return f"{head}\n[... {elided} characters elided ...]\n{tail}"


# ---- environment scrubbing -----------------------------------------------------------------

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL", re.I)
_PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL",
                 "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")  # fmt: skip


def scrubbed_env(source: Mapping[str, str], home: Path) -> dict[str, str]:
    """The environment for model-run commands: an allow-list, never a token or provider key."""
    env = {k: source[k] for k in _PASS_THROUGH if k in source and not _SECRET_NAME.search(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(
        HOME=str(home),
        TERM="dumb",
        PAGER="cat",
        GIT_PAGER="cat",
        GIT_TERMINAL_PROMPT="0",  # git must fail, not wait for a password nobody will type
    )
    return env


# ---- the sandbox ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """bubblewrap around model-run commands. The model's shell runs as the same user as dispatch,
    so without it `cat /proc/$PPID/environ` or the token file would hand it every secret: inside,
    /proc is its own (a new pid namespace), /tmp is empty, `hide` (the state dir, the config and
    token files, the operator's home) is masked, and only the workspace is writable."""

    hide: tuple[Path, ...] = ()
    network: bool = True  # tests often need a package index; set false to cut the network too
    binary: str = "bwrap"

    def wrap(self, argv: list[str], root: Path) -> list[str]:
        out = [self.binary, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--tmpfs", "/tmp", "--unshare-pid", "--die-with-parent", "--new-session"]
        if not self.network:
            out.append("--unshare-net")
        for path in sorted({p.resolve() for p in self.hide}, key=lambda p: len(p.parts)):
            if path.is_dir():
                out += ["--tmpfs", str(path)]
            elif path.exists():
                out += ["--ro-bind", "/dev/null", str(path)]
        return [*out, "--bind", str(root), str(root), "--chdir", str(root), *argv]


def find_sandbox(mode: str, hide: list[Path], *, network: bool = True,
                 which: Callable[[str], str | None] = shutil.which) -> Sandbox | None:
    """`mode` auto: bwrap when installed, else none (with a warning); bwrap: required; off: none."""
    if mode == "off":
        return None
    path = which("bwrap")
    if path is None:
        if mode == "bwrap":
            from .errors import ConfigError

            raise ConfigError("sprint.sandbox: bwrap is not installed (apt-get install bubblewrap), "
                              "or set sandbox: off")
        log.warning("bwrap not found: model commands run unsandboxed and could read this "
                    "user's secrets; install bubblewrap (or set sprint.sandbox: off to silence this)")
        return None
    return Sandbox(tuple(hide), network, path)


# ---- gitea_api policy ----------------------------------------------------------------------

_METHODS = {"GET", "POST", "PATCH", "PUT"}
# Repository sub-resources the model may not even read: access control, secrets, hooks.
_NEVER = {"hooks", "keys", "collaborators", "teams", "transfer", "branch_protections",
          "tag_protections", "push_mirrors", "mirror-sync", "actions", "secrets", "variables",
          "avatar", "signing-key.gpg"}  # fmt: skip
# Query parameters that change who the call acts as, or carry a credential.
_BAD_QUERY = re.compile(r"(^|&)(sudo|token|access_token)=", re.I)


def check_api_path(method: str, path: str, repo: str, issue: int | None = None) -> tuple[str, str]:
    """Normalise and police one gitea_api call; returns (METHOD, path) or raises ToolError.

    Reads: anything of the sprint's repository but its admin endpoints. Writes: only a comment
    on the sprint's own issue; everything else (labels, statuses, other comments, PRs, forks)
    is dispatch's to do, so an agent steered by issue text cannot fake CI, move claims or approve.
    """
    method = method.upper().strip()
    if method == "DELETE":
        raise ToolError("DELETE is refused: deleting needs the operator")
    if method not in _METHODS:
        raise ToolError(f"method {method!r} is not allowed; use GET, POST, PATCH or PUT")
    raw_path, sep, query = path.strip().partition("?")
    if raw_path.startswith("/api/v1/"):
        raw_path = raw_path[len("/api/v1") :]
    if "%" in raw_path or "\\" in raw_path or "#" in raw_path or not raw_path.isprintable():
        raise ToolError("path must be plain (no percent-encoding, backslashes or fragments)")
    if " " in raw_path or "#" in query or " " in query:
        raise ToolError("path must not contain spaces or fragments")
    if _BAD_QUERY.search(query):
        raise ToolError("sudo and token parameters are refused")
    parts = raw_path.strip("/").split("/")
    if any(seg in ("", ".", "..") for seg in parts):
        raise ToolError("path must not contain '.', '..' or empty segments")
    owner, name = split_repo(repo)
    target = [s.lower() for s in parts[1:3]]
    if len(parts) < 3 or parts[0] != "repos" or target != [owner.lower(), name.lower()]:
        raise ToolError(f"only /repos/{repo}/... is allowed in this sprint")
    parts[1:3] = [owner, name]  # Gitea matches names case-insensitively; send one spelling
    sub = [seg.lower() for seg in parts[3:]]
    if sub and sub[0] in _NEVER:
        raise ToolError(f"/repos/{repo}/{sub[0]} is refused: an admin endpoint")
    if method != "GET":
        own = ["issues", str(issue), "comments"] if issue is not None else None
        if not (method == "POST" and sub == own and not query):
            where = f"POST /repos/{repo}/issues/{issue}/comments" if issue is not None else "nothing"
            raise ToolError(f"{method} {raw_path} is refused: the agent may write only {where}; "
                            "dispatch pushes, opens the PR and labels")
    clean = "/" + "/".join(parts)
    return method, clean + (sep + query if query else "")


# ---- the workspace -------------------------------------------------------------------------


class Workspace:
    """The sprint's clone, as an Environment: runs tool calls confined to `root`."""

    def __init__(
        self,
        root: Path,
        *,
        forge: ForgeClient | None,
        repo: str,
        env: Mapping[str, str] | None = None,
        home: Path | None = None,
        max_output: int = 20_000,
        max_file_bytes: int = 1_000_000,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
        sandbox: Sandbox | None = None,
        issue: int | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.issue = issue  # the one issue the agent may comment on
        self.sandbox = sandbox
        self.forge = forge
        self.repo = repo
        self.max_output = max_output
        self.max_file_bytes = max_file_bytes
        self.popen = popen
        if home is None:
            # inside the workspace but never committed: git ignores its own directory
            git = self.root / ".git"
            home = git / "dispatch-home" if git.is_dir() else self.root
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # `git config --global` needs it
        self.home = home
        self.env = scrubbed_env(os.environ if env is None else env, home)

    def tool_schemas(self) -> list[dict]:
        return schemas()

    def execute(self, call: ToolCall) -> Observation:
        tool = TOOLS.get(call.name)
        if tool is None:
            return _error(f"unknown tool {call.name!r}; available: {', '.join(TOOLS)}")
        if call.error or call.arguments is None:
            return _error(call.error or "arguments are missing")
        try:
            result = tool.fn(self, **tool.bind(call.arguments))
        except ToolError as e:
            return _error(str(e))
        except OSError as e:
            return _error(f"{call.name} failed: {e.strerror or e}")
        except ValueError as e:  # e.g. a NUL in a command, a lone surrogate in content
            return _error(f"{call.name} failed: {e}")
        return result if isinstance(result, Observation) else Observation(result, True)

    # -- paths --

    def resolve(self, path: str) -> Path:
        """The real path for `path` inside the root, or ToolError if it (or a symlink) escapes."""
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise ToolError("path must be a non-empty string")
        given = Path(path)
        candidate = given if given.is_absolute() else self.root / given
        if not Path(os.path.normpath(candidate)).is_relative_to(self.root):
            raise ToolError(f"{path!r} is outside the workspace; use a path relative to its root")
        try:
            real = candidate.resolve()  # follows symlinks, dangling ones included
        except (OSError, RuntimeError) as e:
            raise ToolError(f"cannot resolve {path!r}: {e}") from None
        if not real.is_relative_to(self.root):
            raise ToolError(f"{path!r} leads outside the workspace through a symlink; refused")
        return real

    def _rel(self, real: Path) -> str:
        return str(real.relative_to(self.root)) or "."

    # -- the tools --

    def read_file(self, path: str) -> str:
        real = self.resolve(path)
        if not real.exists():
            raise ToolError(f"{path!r} does not exist")
        if real.is_dir():
            raise ToolError(f"{path!r} is a directory; list it with run_command")
        size = real.stat().st_size
        if size > self.max_file_bytes:
            raise ToolError(f"{path!r} is {size} bytes, over the {self.max_file_bytes} limit; "
                            "look at parts of it with run_command (head, sed -n)")  # fmt: skip
        data = real.read_bytes()
        if b"\x00" in data[:8192]:
            raise ToolError(f"{path!r} looks binary; refused")
        return cap(data.decode(errors="replace"), self.max_output)

    def write_file(self, path: str, content: str) -> str:
        real = self.resolve(path)
        rel = self._rel(real)
        if rel == ".git" or rel.startswith(".git/"):
            raise ToolError("writing inside .git is refused")
        data = content.encode()
        if len(data) > self.max_file_bytes:
            raise ToolError(f"content is {len(data)} bytes, over the {self.max_file_bytes} limit")
        if real.is_dir():
            raise ToolError(f"{path!r} is a directory")
        real.parent.mkdir(parents=True, exist_ok=True)
        # mkdir may have walked through a symlink created since resolve(): check again
        if not real.parent.resolve().is_relative_to(self.root):
            raise ToolError(f"{path!r} leads outside the workspace; refused")
        mode = real.stat().st_mode & 0o7777 if real.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, real)  # atomic: readers see the old file or the new, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return f"wrote {len(data)} bytes to {rel}"

    def run_command(self, command: str, timeout: int = 120) -> Observation:
        timeout = max(1, min(int(timeout), 3600))
        argv = ["bash", "-c", command]
        if self.sandbox is not None:
            argv = self.sandbox.wrap(argv, self.root)
        proc = self.popen(
            argv,
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills every child
        )
        out = _HeadTail(self.max_output)
        try:
            timed_out = not _drain(proc, out, time.monotonic() + timeout)
        finally:
            _kill_group(proc.pid)  # background children must not outlive the call
            code = proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        text = out.text(self.max_output)
        if timed_out:
            return Observation(f"error: timed out after {timeout} s (killed)\n{text}", False)
        return Observation(f"exit code: {code}\n{text}", code == 0)

    def gitea_api(self, method: str, path: str, body: object | None = None) -> str:
        if self.forge is None:
            raise ToolError("gitea_api is not available in this run")
        method, path = check_api_path(method, path, self.repo, self.issue)
        if method == "GET" and body is not None:
            raise ToolError("GET takes no body")
        try:
            resp = self.forge.request(method, path, json=body)
        except ForgeError as e:
            raise ToolError(str(e)) from None
        try:
            data = resp.json()
        except ValueError:
            return cap(getattr(resp, "text", "") or "(empty response)", self.max_output)
        return cap(json.dumps(data, ensure_ascii=False), self.max_output)


def _drain(proc: subprocess.Popen, out: _HeadTail, deadline: float) -> bool:
    """Read the child's output until EOF or the deadline; False when the deadline passed."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not sel.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out.add(chunk)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _error(message: str) -> Observation:
    return Observation(f"error: {message}", False)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "run_command",
            "Run a bash command in the repository root. Output (stdout and stderr) is capped.",
            (
                Param("command", "string", "the bash command line"),
                Param("timeout", "integer", "seconds before the command is killed", 120),
            ),
            Workspace.run_command,
        ),
        Tool(
            "read_file",
            "Read a text file; the path is relative to the repository root.",
            (Param("path", "string", "file path relative to the repository root"),),
            Workspace.read_file,
        ),
        Tool(
            "write_file",
            "Create or replace a text file with the given content; parent dirs are created.",
            (
                Param("path", "string", "file path relative to the repository root"),
                Param("content", "string", "the whole new content of the file"),
            ),
            Workspace.write_file,
        ),
        Tool(
            "gitea_api",
            "Call the Gitea REST API for this repository only. Returns the JSON response.",
            (
                Param("method", "string", "GET, POST, PATCH or PUT"),
                Param("path", "string", "relative to /api/v1, e.g. /repos/OWNER/REPO/issues/1"),
                Param("body", None, "JSON request body, or null", None),
            ),
            Workspace.gitea_api,
        ),
    )
}


def schemas() -> list[dict]:
    """The tool schemas in the OpenAI `tools=` format."""
    return [t.schema() for t in TOOLS.values()]
