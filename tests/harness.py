"""What the tests and the benchmarks share: scratch DVC repositories of the project, output digests,
restore, the subprocess environment, free ports, a local HTTP server, and waiting for a readiness sign.

A plain module (no pytest in it): `tests/conftest.py` builds its fixtures on it and the scripts in
`benchmarks/` import it (`sys.path` gets the project root first).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: its python, dvc, ruff
CODE = ("stages", "pipeline", "commands")  # the packages a project copy needs to run its stages and commands


def copy_code(path: Path) -> None:
    """The stage and command code (no tests, no caches) into `path`, as a scratch project needs it."""
    for package in CODE:
        shutil.copytree(ROOT / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))


# Commands run with the venv first on PATH and a git identity (a fresh machine has none);
# DVC's analytics and TensorFlow's start-up chatter off.
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "PYTHONPATH": "",
    "GIT_AUTHOR_NAME": "pipeline tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "pipeline tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    "DVC_NO_ANALYTICS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
STAGES = ("check", "download", "normalize", "train", "evaluate")  # dvc.yaml's, in order
OUTPUTS = ("data/params.ok", "data/raw", "data/normalized", "models", "metrics")  # every DVC output
NOT_OUTPUTS = (".gitignore", "timings.json")  # timings differ every run and are not tracked


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command with ENV; on an unexpected exit raise AssertionError showing its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def tracked_files() -> list[str]:
    """The project as a fresh clone has it (tracked and not-ignored files), tests and benchmarks excluded."""
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith(("tests/", "benchmarks/", "reports/"))]


def write_params(project: Path, overrides: dict) -> dict:
    """params.yaml of the project with `overrides` merged in, section by section (one level deep)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                params[section][key] = {**params[section][key], **value}
            else:
                params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def git_project(path: Path, overrides: dict | None = None) -> Path:
    """A git + DVC copy of the project at `path` (params with `overrides`), committed, nothing run."""
    for name in tracked_files():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
    if overrides:  # else params.yaml stays as written, comments and flow style included
        write_params(path, overrides)
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path


_OWN: list[Path] = []


def shared_template(run_id: str) -> Path:
    """Where the workers of one xdist run (`PYTEST_XDIST_TESTRUNUID`) keep the templates they share."""
    return Path(tempfile.gettempdir()) / f"trained-template-{run_id}"


def _template(name: str) -> tuple[Path, str]:
    """The template `name` (TEMPLATES), built once per test run; its folder and what its build printed.

    The first caller builds it in a folder of its own that nothing else touches (the xdist workers of
    `make test` share it: one builds, the others wait on its lock; conftest removes it at the end);
    every caller then copies it, which takes a fraction of a second. A caller that would wait first
    builds another template the run will copy (WANTED) that no one builds yet.
    """
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id and not _OWN:  # without xdist: this process's own, removed when it ends
        _OWN.append(Path(tempfile.mkdtemp(prefix="trained-template-")))
        atexit.register(shutil.rmtree, _OWN[0], ignore_errors=True)
    folder = shared_template(run_id) if run_id else _OWN[0]
    folder.mkdir(exist_ok=True)
    with open(folder / f".{name}.lock", "w", encoding="utf-8") as lock:  # released when the file closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker builds it: meanwhile, one of the others
            for other in sorted(WANTED - {name}):
                with open(folder / f".{other}.lock", "w", encoding="utf-8") as other_lock:
                    try:
                        fcntl.flock(other_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    _build(folder, other)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _build(folder, name)
    return folder / name, (folder / f"{name}.out").read_text(encoding="utf-8")


def _build(folder: Path, name: str) -> None:
    """Build template `name` in `folder` unless it is there (its lock held)."""
    said = folder / f"{name}.out"
    if not said.exists():
        shutil.rmtree(folder / name, ignore_errors=True)  # a build that a killed run left half done
        said.write_text(TEMPLATES[name](folder / name), encoding="utf-8")


def _dvc_template(path: Path) -> str:
    git_project(path, {"train": {"epochs": 1}})
    proc = run(["dvc", "repro"], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "dvc repro, 1 epoch"], path)
    return proc.stdout


def dvc_project(path: Path) -> subprocess.CompletedProcess[str]:
    """A git + DVC copy of the project at `path`, `dvc repro` run once at 1 epoch and committed (git, DVC
    cache and all: the same fresh repository for every caller, built once per test run).

    Returns that `dvc repro`'s output.
    """
    template, said = _template("repo")
    shutil.copytree(template, path, symlinks=True, dirs_exist_ok=True)
    return subprocess.CompletedProcess(["dvc", "repro"], 0, said, "")


def _trained_template(path: Path) -> str:
    copy_code(path)
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    said = [run([str(BIN / "python"), "-m", f"stages.{stage}"], path).stdout for stage in STAGES[1:]]
    return "".join(said)


def trained_project(path: Path) -> Path:
    """A copy of the project (code, params.yaml) at `path` after download, normalize, train and evaluate
    with the committed params (10 epochs), run as plain stages (no git, no DVC); built once per test run."""
    template, _ = _template("trained")
    shutil.copytree(template, path, symlinks=True, dirs_exist_ok=True)
    return path


# The templates by name, with what builds them, and the call that copies each (conftest reads which the
# selected tests call, and puts those in WANTED: a worker waiting for one builds another meanwhile).
TEMPLATES: dict[str, Callable[[Path], str]] = {"repo": _dvc_template, "trained": _trained_template}
COPIED_BY = {"repo": "dvc_project(", "trained": "trained_project("}
WANTED: set[str] = set()


def reset_worktree(repo: Path) -> None:
    """Every tracked file as HEAD has it, and HEAD back on main.

    `git checkout -- .` is not enough after `dvc exp run`: DVC can leave a changed file whose
    index entry carries the new file's size and time but the old content, so git thinks it is
    unchanged and skips it. Dropping the index first makes git compare and rewrite every file.
    """
    run(["git", "rm", "-r", "-q", "-f", "--cached", "."], repo)
    run(["git", "reset", "-q", "--hard", "HEAD"], repo)
    run(["git", "checkout", "-q", "main"], repo)


def restore(repo: Path) -> None:
    """The committed state, outputs included, as the README tells a user after a stopped run;
    AssertionError unless `dvc status` is then clean."""
    reset_worktree(repo)
    run(["dvc", "checkout", "--force"], repo, check=False)
    status = run(["dvc", "status"], repo).stdout
    assert "Data and pipelines are up to date." in status, status


def digests(repo: Path, folders: tuple[str, ...] = OUTPUTS, *, lock: bool = False) -> dict[str, str]:
    """md5 of every output file under `folders`, by path; with `lock`, also dvc.lock's stages but
    `check` (a check that passed records its params: true, and harmless)."""
    paths = [path for d in folders for path in [repo / d, *sorted((repo / d).rglob("*"))]]
    files = [p for p in paths if p.is_file() and p.name not in NOT_OUTPUTS]
    out = {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}
    if lock:
        stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        stages.pop("check", None)
        out["dvc.lock"] = repr(stages)
    return out


def stored_object(db: Path, file: Path) -> Path:
    """The object under `db` (a DVC cache's or remote's `files/md5`) that holds a copy of `file`."""
    md5 = hashlib.md5(file.read_bytes()).hexdigest()
    return db / md5[:2] / md5[2:]


def flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of `path`, keeping its size, mode and times, as a failing disk would."""
    stat = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def free_ports(n: int = 1) -> list[int]:
    """`n` TCP ports on 127.0.0.1 that nothing listened on a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def listening(port: int) -> bool:
    """Whether a socket on this machine listens on TCP `port` (the kernel's tables: nothing connects to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        rows = path.read_text(encoding="ascii").splitlines()[1:] if path.exists() else []
        for fields in (row.split() for row in rows):
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def wait_for(ready: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `ready()` until it returns something true (returned); AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = ready()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"waited {timeout:g}s for {what}")


class FileServer:
    """Serves `files` (path -> bytes) over HTTP on 127.0.0.1, in a thread, as a context manager.

    Faults for the download tests: paths in `truncate` announce their length and send half;
    the first `failures` requests fail (`failure`: "503", or "drop": half the body, then the
    connection closes); with `drip` seconds set, the body comes one byte at a time, that far
    apart. `requests` counts the GET requests seen.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = dict(files or {})
        self.truncate: set[str] = set()
        self.failures, self.failure, self.requests, self.drip = 0, "503", 0, 0.0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                failing = outer.requests <= outer.failures
                body = outer.files.get(self.path)
                if body is None or (failing and outer.failure == "503"):
                    self.send_error(404 if body is None else 503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                half = failing or self.path in outer.truncate
                body = body[: len(body) // 2] if half else body
                for i in range(0, len(body), 1 if outer.drip else len(body) or 1):
                    self.wfile.write(body[i : i + 1] if outer.drip else body)
                    self.wfile.flush()
                    time.sleep(outer.drip)
                if failing:  # "drop"
                    self.wfile.flush()
                    self.connection.close()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        # polling every 20 ms, not 0.5 s: shutdown waits for one poll, at the end of every download test
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
