"""A stage runs the same wherever pipelines run: as a container's PID 1, from a shell whose parent
is outside the PID namespace (docker/kubectl exec), under a `dvc repro` that is PID 1, detached
with nohup after its terminal is gone. Real processes in real PID namespaces (`unshare`, as root).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import BIN, ENV, git_project, run, wait_for

PYTHON = str(BIN / "python")

pytestmark = pytest.mark.slow  # subprocesses: stages and dvc


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], check=False).returncode == 0
    except OSError:
        return False


needs_pid_namespace = pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare --pid` (root, or user namespaces), as CI has"
)
IN_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def assert_one_clean_success(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert expected in output and "error" not in output.lower() and "terminated" not in output, output


@needs_pid_namespace
def test_a_stage_that_is_pid_1_runs(project: Path) -> None:
    """`docker run IMAGE python -m stages.download`, a Kubernetes container's command."""
    proc = run([*IN_NAMESPACE, PYTHON, "-c", "import os; assert os.getpid() == 1"], project)
    proc = run([*IN_NAMESPACE, PYTHON, "-m", "stages.download"], project, check=False)
    assert_one_clean_success(proc, "-> data/raw/dataset.npz")


@pytest.fixture
def namespace() -> Iterator[int]:
    """A PID namespace kept open by a sleeping PID 1; `nsenter` into it starts a process with PPID 0."""
    holder = subprocess.Popen([*IN_NAMESPACE, "sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text(encoding="utf-8").split()
            if children:
                yield int(children[0])
                return
            time.sleep(0.05)
        pytest.fail("the namespace's PID 1 never started")
    finally:
        holder.kill()
        holder.wait()


@needs_pid_namespace
@pytest.mark.parametrize("under_dvc", [False, True], ids=["by-hand", "DVC_STAGE-set"])
def test_a_stage_started_from_a_shell_whose_parent_is_outside_the_namespace_runs(
    project: Path, namespace: int, under_dvc: bool
) -> None:
    """`docker exec` / `kubectl exec` into a container, then the stage from that shell (PPID 0)."""
    env = {**ENV, **({"DVC_STAGE": "download"} if under_dvc else {})}
    script = f'test "$PPID" = 0 || exit 99; cd {project} && {PYTHON} -m stages.download'
    proc = subprocess.run(
        ["nsenter", "-t", str(namespace), "-p", "-m", "bash", "-c", script],
        cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert_one_clean_success(proc, "-> data/raw/dataset.npz")


@needs_pid_namespace
def test_dvc_repro_as_pid_1_runs_its_stages(tmp_path: Path) -> None:
    """`dvc repro` as a CI job's or a Kubernetes pod's entrypoint: each stage's dvc is PID 1."""
    repo = git_project(tmp_path)
    proc = run([*IN_NAMESPACE, str(BIN / "dvc"), "repro", "normalize"], repo, check=False)
    assert_one_clean_success(proc, "Running stage 'normalize'")
    assert "Data and pipelines are up to date." in run(["dvc", "status", "normalize"], repo).stdout
    assert (repo / "data/normalized/dataset.npz").is_file()


def test_a_detached_stage_outlives_the_shell_that_started_it(project: Path) -> None:
    """`nohup python -m stages.download &`, then the terminal closes: the stage carries on to the end."""
    shell = subprocess.run(
        ["bash", "-c", f"nohup {PYTHON} -m stages.download > log.txt 2>&1 & echo $!"],
        cwd=project, env=ENV, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    pid = int(shell.stdout.split()[-1])  # the shell has exited; the stage goes on, reparented
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 120, "the detached stage to end")
    log = (project / "log.txt").read_text()
    assert "-> data/raw/dataset.npz" in log and "terminated" not in log, log
    assert (project / "data/raw/dataset.npz").is_file()


def test_a_detached_dvc_repro_finishes_after_its_shell_exits(tmp_path: Path) -> None:
    """`nohup dvc repro &` (or setsid) from a terminal that then closes."""
    repo = git_project(tmp_path)
    subprocess.run(
        ["bash", "-c", "setsid nohup sh -c 'dvc repro normalize; echo $? > rc' > log.txt 2>&1 &"],
        cwd=repo, env=ENV, timeout=60, check=True,
    )  # fmt: skip
    wait_for((repo / "rc").exists, 300, "the detached dvc repro to end")
    log = (repo / "log.txt").read_text()
    assert (repo / "rc").read_text().strip() == "0" and "terminated" not in log, log
    assert "Data and pipelines are up to date." in run(["dvc", "status", "normalize"], repo).stdout


def importing(project: Path) -> list[str]:
    """`python -m stages.importing`: a stage whose imports take as long as the test needs (TensorFlow's
    take seconds); it says when they are under way (`importing`, its pid), so a test waits for what it
    observes, not a guessed number of seconds, and starts no TensorFlow."""
    (project / "stages/importing.py").write_text(
        "import os, time\nfrom pathlib import Path\nPath('importing').write_text(str(os.getpid()))\ntime.sleep(60)\n"
    )
    return [PYTHON, "-m", "stages.importing"]


def started(project: Path) -> int:
    """The pid of `stages.importing`, once its imports are under way."""
    said = project / "importing"
    return int(wait_for(lambda: said.is_file() and said.read_text(), 60, "the stage's imports to start"))


def test_a_signal_during_a_stages_imports_is_one_line(project: Path) -> None:
    """Ctrl-C in the first seconds of `python -m stages.train`, while TensorFlow is still importing:
    `stages/__init__.py` has set the runner's guard up before the stage's own imports."""
    stage = subprocess.Popen(importing(project), cwd=project, env=ENV, stderr=subprocess.PIPE, text=True)
    started(project)
    stage.send_signal(signal.SIGINT)
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode == 130, stderr
    assert stderr.strip() == "interrupted (Ctrl-C): the previous outputs are kept; run it again to recover"


def test_a_stage_whose_dvc_dies_during_its_imports_ends_too(project: Path, tmp_path: Path) -> None:
    """`kill -9` of dvc in the first seconds of a stage: the stage ends with one line, it does not go on.
    DVC runs it as `/bin/sh -c COMMAND` (without $SHELL), and dash stays between them: the stage
    watches its grandparent."""
    fake = tmp_path / "bin" / "dvc"  # a process whose command line is `dvc ...`, as DVC's is
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\n/bin/sh -c "$1" &\nwait\n')
    fake.chmod(0o755)
    dvc = subprocess.Popen(
        [str(fake), " ".join(importing(project))], cwd=project, env={**ENV, "DVC_STAGE": "train"},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stage = started(project)
    dvc.kill()
    assert dvc.stderr is not None
    line = dvc.stderr.readline().strip()  # the stage and the shell inherited the pipe: its one line, then EOF
    wait_for(lambda: not Path(f"/proc/{stage}").exists(), 60, "the stage to end")
    dvc.wait()
    assert (
        line == "terminated (SIGTERM, or dvc was stopped): dvc checkout --force puts back the outputs dvc.lock records"
    )
    assert dvc.stderr.read() == ""
