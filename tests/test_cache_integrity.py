"""Verify and repair DVC's cache and a remote (`python -m commands.cache_check`), where DVC trusts what it stored.

Real `dvc`, real git, the project's default remote (a folder beside the clone) with DVC's own
`verify = true`. Each test flips or deletes a stored object the way a failing disk or a careless
`rm` would, shows that DVC's own status does not see it, and that the README's commands do.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.harness import BIN, digests, dvc_project, flip_a_byte, run, stored_object

pytestmark = pytest.mark.pipeline(seconds=5)
CHECK = [str(BIN / "python"), "-m", "commands.cache_check"]


@pytest.fixture
def pushed(tmp_path: Path) -> Path:
    """A trained project (1 epoch) whose outputs are pushed to its default remote, beside it."""
    repo = tmp_path / "lab"
    dvc_project(repo)
    run(["dvc", "push"], repo)
    return repo


def stored(db: Path, repo: Path, path: str) -> Path:
    return stored_object(db, repo / path)


def test_a_byte_flipped_in_the_cache_is_found_and_repaired_from_the_workspace(pushed: Path) -> None:
    cached = stored(pushed / ".dvc/cache/files/md5", pushed, "models/model.keras")
    flip_a_byte(cached)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], pushed).stdout  # DVC does not see it
    assert run(CHECK, pushed).returncode == 0  # present: the quick check cannot see it either

    found = run([*CHECK, "--verify"], pushed, check=False)
    line = found.stderr.strip().splitlines()[-1]
    assert found.returncode == 2 and line.startswith("error: 1 object(s) are not right in DVC's cache"), found.stderr
    assert "models/model.keras (corrupt in the cache)" in line
    assert "`python -m commands.cache_check --verify --repair` copies good objects" in line  # the flags that found it

    fixed = run([*CHECK, "--verify", "--repair"], pushed)
    assert "repaired models/model.keras (corrupt in the cache) from the workspace" in fixed.stdout
    assert cached.read_bytes() == (pushed / "models/model.keras").read_bytes()
    assert "are read and hashed in DVC's cache" in run([*CHECK, "--verify"], pushed).stdout


def test_a_remote_missing_or_corrupt_object_is_found_repaired_and_a_fresh_clone_pulls_every_byte(
    pushed: Path, tmp_path: Path
) -> None:
    remote = tmp_path / "keras-loss-lab-dvc-storage/files/md5"  # the default remote, beside the clone
    stored(remote, pushed, "models/model.keras").unlink()  # a file of a directory whose listing stays
    flip_a_byte(stored(remote, pushed, "metrics/eval/metrics.json"))
    assert "in sync" in run(["dvc", "status", "-c"], pushed).stdout  # DVC trusts the listing
    assert "Everything is up to date." in run(["dvc", "push"], pushed).stdout  # so it sends nothing

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pushed), str(clone)], tmp_path)
    assert run(["dvc", "pull"], clone, check=False).returncode != 0  # verify = true: the pull refuses
    shutil.rmtree(clone / ".dvc/cache", ignore_errors=True)  # (a partial pull's leftovers)

    quick = run([*CHECK, "--remote", "storage"], pushed, check=False)
    assert quick.returncode == 2 and "models/model.keras (missing from remote 'storage')" in quick.stderr
    assert "metrics/eval/metrics.json" not in quick.stderr  # present; only --verify reads it
    found = run([*CHECK, "--verify", "--remote", "storage"], pushed, check=False)
    assert found.returncode == 2 and "metrics/eval/metrics.json (corrupt in remote 'storage')" in found.stderr

    fixed = run([*CHECK, "--verify", "--remote", "storage", "--repair"], pushed)
    assert "repaired models/model.keras (missing from remote 'storage') from the cache" in fixed.stdout
    assert "repaired metrics/eval/metrics.json (corrupt in remote 'storage') from the cache" in fixed.stdout
    run(["dvc", "pull"], clone)
    assert digests(clone) == digests(pushed)


def test_an_object_lost_everywhere_is_named_with_what_makes_it_again(pushed: Path, tmp_path: Path) -> None:
    places = [pushed / ".dvc/cache/files/md5", tmp_path / "keras-loss-lab-dvc-storage/files/md5"]
    for path in [stored(db, pushed, "models/model.keras") for db in places] + [pushed / "models/model.keras"]:
        path.unlink()
    proc = run([*CHECK, "--remote", "storage", "--repair"], pushed, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "models/model.keras (missing from the cache)" in line, proc.stderr
    assert "models/model.keras (missing from remote 'storage')" in line and "dvc repro --force" in line


@pytest.mark.pipeline(seconds=10)
def test_an_experiment_whose_outputs_are_not_in_the_cache_fails_the_sweep_and_its_study_trial(pushed: Path) -> None:
    """`dvc exp run` only warns when the cache's disk is full. The sweep checks each finished experiment
    (`commands.sweep.not_in_cache`) and the study reads each through `read_metrics`: both name what the
    cache lacks (here the experiment's model, which it shares with HEAD: it changed only evaluate's params)."""
    run(["dvc", "exp", "run", "--name", "short", "-S", "evaluate.confusion_normalize=all"], pushed)
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], pushed).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/short")]  # not DVC's refs/exps/exec/EXEC_* beside it
    model = stored(pushed / ".dvc/cache/files/md5", pushed, "models/model.keras")
    model.unlink()
    named = run([*CHECK, "--rev", "short"], pushed, check=False)
    assert named.returncode == 2 and "models/model.keras at short (missing from the cache)" in named.stderr
    probe = f"import commands.study_worker as w\ntry: w.read_metrics({ref!r})\nexcept w.TrialFailed as e: print(e)"
    out = run([str(BIN / "python"), "-c", probe], pushed)
    assert "short's outputs are not in DVC's cache: models/model.keras" in out.stdout, out.stdout + out.stderr
    assert "dvc exp remove short" in out.stdout
    sweep = run([str(BIN / "python"), "-c", "import commands.sweep as s; print(s.not_in_cache(['short']))"], pushed)
    assert "{'short': 'models/model.keras'}" in sweep.stdout


def test_an_unknown_remote_or_revision_and_a_remote_that_never_answers_are_one_line(pushed: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the kernel's backlog), never answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    run(["dvc", "remote", "add", "silent", "s3://bucket/lab"], pushed)
    run(["dvc", "remote", "modify", "silent", "endpointurl", endpoint], pushed)
    for key in ("access_key_id", "secret_access_key"):
        run(["dvc", "remote", "modify", "--local", "silent", key, "x"], pushed)
    for args, said in (
        (["--remote", "nope"], "remote 'nope' doesn't exist"),
        (["--rev", "nope"], "'nope'"),
        (["--remote", "silent", "--timeout", "3"], "remote 'silent' did not answer within 3 s (--timeout)"),
    ):
        proc = run([*CHECK, *args], pushed, check=False, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines
    silent.close()
