"""Safe experiments, through the real `dvc repro` and `dvc exp run`: every params change is checked
before an output is touched, a failed or interrupted run loses nothing (the one command it prints,
`dvc checkout --force`, restores every output byte for byte), YAML is read as DVC writes it.

How each kind of bad `-S` value reads once DVC has written it is tests/test_params.py's (DVC's own
writer, no dvc run); a refused `dvc exp run` touching nothing is tests/test_run_cache.py's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.harness import BIN, ENV, STAGES, digests, dvc_project, run, wait_for, write_params

pytestmark = pytest.mark.pipeline(seconds=6)


def snapshot(repo: Path) -> dict[str, str]:
    """What must not be lost: every output, and every stage's entry in dvc.lock but check's (a run whose
    params pass `check` and that fails later leaves DVC's record that check ran with them: true, and
    harmless)."""
    return digests(repo, lock=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "safe"
    dvc_project(path)  # each test its own copy
    return path


def test_a_bad_edit_stops_dvc_repro_before_anything_runs(repo: Path) -> None:
    before = snapshot(repo)
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(text + "train:\n  epochs: 3\n")  # a second `train:` section
    proc = run(["dvc", "repro"], repo, check=False)  # DVC reads params.yaml itself first, and refuses
    assert proc.returncode != 0 and 'found duplicate key "train"' in proc.stderr
    assert "Running stage" not in proc.stdout
    assert snapshot(repo) == before
    by_hand = run([str(BIN / "python"), "-m", "stages.check"], repo, check=False)
    assert by_hand.returncode == 2
    line = text.count("\n") + 1  # the second `train:`
    assert by_hand.stderr.strip().startswith(f"error: params.yaml: (file): not valid YAML at line {line}, column 1:")


def test_the_readmes_way_back_after_dvc_exp_apply_restores_the_edits_it_replaced(repo: Path) -> None:
    """DVC's `dvc exp apply` replaces every tracked file without a word (DVC PR 8994); the README's way
    back, `git checkout refs/exps/apply/stash -- FILE...`, gets the user's edits again. The experiment sets
    `true` as DVC writes it (YAML 1.2's boolean), which evaluate reads as meant; only evaluate reruns."""
    png = (repo / "metrics/eval/confusion_matrix.png").read_bytes()
    exp = ["dvc", "exp", "run", "--temp", "--name", "normalized", "-S", "evaluate.confusion_normalize=true"]
    said = run(exp, repo).stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in said]
    assert ran in (["check", "evaluate"], ["evaluate"]), ran  # check: params.yaml's bytes as DVC rewrote them
    params = (repo / "params.yaml").read_text(encoding="utf-8").replace("epochs: 1\n", "epochs: 12\n")
    (repo / "params.yaml").write_text(params, encoding="utf-8")
    code = (repo / "stages/check.py").read_text(encoding="utf-8") + "# my note\n"
    (repo / "stages/check.py").write_text(code, encoding="utf-8")
    run(["dvc", "exp", "apply", "normalized"], repo)
    listed = run(["git", "diff", "--stat", "HEAD", "refs/exps/apply/stash"], repo).stdout
    assert "params.yaml" in listed and "stages/check.py" in listed  # the README's way to see what was replaced
    assert "epochs: 12" not in (repo / "params.yaml").read_text(encoding="utf-8")  # gone without a word
    assert "# my note" not in (repo / "stages/check.py").read_text(encoding="utf-8")
    assert (repo / "metrics/eval/confusion_matrix.png").read_bytes() != png  # the experiment's picture
    run(["git", "checkout", "refs/exps/apply/stash", "--", "params.yaml", "stages/"], repo)
    assert (repo / "params.yaml").read_text(encoding="utf-8") == params
    assert (repo / "stages/check.py").read_text(encoding="utf-8") == code


def test_a_failed_download_says_how_to_restore_the_data_and_it_does(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "not-mnist.csv.gz").write_text("this is not a gzip file")
    before = snapshot(repo)
    url = (tmp_path / "not-mnist.csv.gz").as_uri()
    proc = run(["dvc", "exp", "run", "-S", f"data.url={url}", "-S", "data.sha256=null"], repo, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "error: checksum mismatch for file://" in output, output
    assert RESTORE in output and "Traceback" not in output
    run(["dvc", "checkout", "--force"], repo)  # DVC deleted data/raw before the stage ran
    assert snapshot(repo) == before


def train_processes(repo: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "stages.train" in " ".join(proc.info["cmdline"] or []) and proc.info["cwd"] == str(repo):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# Long enough to be stopped mid-way for sure: 6 epochs one step per call (seconds, not 0.5 s).
LONG = {"epochs": 6, "speed": {"jit_compile": False, "steps_per_execution": 1}}
LONG_SET = ["-S", "train.epochs=6", "-S", "train.speed.jit_compile=false", "-S", "train.speed.steps_per_execution=1"]


@pytest.fixture
def uninterrupted(tmp_path: Path) -> dict[str, str]:
    """The outputs of the LONG run when nothing interrupts it (in a copy of its own)."""
    path = tmp_path / "uninterrupted"
    dvc_project(path)
    write_params(path, {"train": LONG})
    run(["dvc", "repro"], path)
    return digests(path)


RESTORE = "dvc checkout --force puts back the outputs dvc.lock records"
MESSAGES = {
    signal.SIGINT: f"interrupted (Ctrl-C): {RESTORE}",
    signal.SIGTERM: f"terminated (SIGTERM, or dvc was stopped): {RESTORE}",
    signal.SIGKILL: f"terminated (SIGTERM, or dvc was stopped): {RESTORE}",
}


STOPS = [
    pytest.param(sig, command, id=f"{sig.name}-{command}", marks=pytest.mark.pipeline(seconds=25 if recovers else 8))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
    for command in ("repro", "exp run")
    for recovers in [(sig, command) == (signal.SIGKILL, "repro")]  # the recovery: two more LONG runs
]


@pytest.mark.parametrize(("sig", "command"), STOPS)
def test_stopping_dvc_during_train_leaves_no_process_and_one_printed_command_restores_the_outputs(
    repo: Path, request: pytest.FixtureRequest, command: str, sig: signal.Signals
) -> None:
    """Each signal to `dvc repro` (the stage under bash) and `dvc exp run` (under dash); the hardest case,
    SIGKILL of `dvc repro`, then recovers: the same result as a run nothing interrupted."""
    before = snapshot(repo)
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)  # else the run-cache serves LONG: train must run
    if command == "repro":
        write_params(repo, {"train": LONG})
        cmd = ["dvc", "repro"]
    else:
        cmd = ["dvc", "exp", "run", *LONG_SET]
    # DVC runs a stage in $SHELL -c, or /bin/sh -c without SHELL: bash becomes the stage, dash
    # stays between dvc and the stage (and outlives a killed dvc). Both are tried.
    env = {k: v for k, v in ENV.items() if k != "SHELL"}
    if command == "repro":
        env["SHELL"] = shutil.which("bash") or ""
    dvc = subprocess.Popen(
        cmd,
        cwd=repo,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    assert dvc.stdout is not None
    seen = []
    for line in dvc.stdout:
        seen.append(line)
        if line.startswith(f"Epoch 1/{LONG['epochs']}"):
            break
    else:
        pytest.fail("train never started:\n" + "".join(seen))
    if sig == signal.SIGINT:
        os.killpg(dvc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground job
    else:
        dvc.send_signal(sig)  # `kill` / `kill -9` of dvc alone
    rest, _ = dvc.communicate(timeout=120)  # returns once dvc and the stage have both closed the pipe
    output = "".join(seen) + rest
    wait_for(lambda: not train_processes(repo), 30, "the stage to end with dvc")
    assert MESSAGES[sig] in output, output
    assert "Traceback" not in output
    run(["dvc", "checkout", "--force"], repo)  # the command the line printed
    assert snapshot(repo) == before
    if (sig, command) != (signal.SIGKILL, "repro"):  # the recovery below is the same after each signal
        return

    run(["git", "checkout", "-q", "--", "params.yaml"], repo)
    write_params(repo, {"train": LONG})
    run(["dvc", "repro"], repo)  # recovers: the same result as a run nothing interrupted
    assert digests(repo) == request.getfixturevalue("uninterrupted")
    leftovers = [p.name for d in (repo, repo / "models", repo / "metrics") for p in d.iterdir() if ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.pipeline(seconds=8)
def test_params_edited_while_train_runs_do_not_become_its_record(repo: Path) -> None:
    """params.yaml saved mid-training (epochs 6 -> 2): dvc.lock must not record epochs 2 for a model
    trained 6 epochs. train stops with one line naming the key; dvc.lock keeps the last true record."""
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    write_params(repo, {"train": LONG})
    dvc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env={**ENV, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert dvc.stdout is not None
    seen = []
    for line in dvc.stdout:
        seen.append(line)
        if line.startswith("Epoch 1/"):
            break
    write_params(repo, {"train": {**LONG, "epochs": 2}})  # the user saves an edit meanwhile
    output = "".join(seen) + dvc.communicate(timeout=300)[0]
    assert dvc.returncode != 0, output
    assert "params.yaml changed while this stage ran (train.epochs)" in output and "Traceback" not in output
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"] == before
    assert "Data and pipelines are up to date." not in run(["dvc", "status"], repo).stdout


@pytest.fixture
def small_cache(repo: Path, tmp_path: Path) -> Iterator[Path]:
    """`repo`'s DVC cache on a 300 KB tmpfs: the model (1.6 MB) cannot fit. Root only (as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the cache needs root, as CI has")
    cache = tmp_path / "small-cache"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(cache)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run(["dvc", "cache", "dir", str(cache)], repo)
        yield cache
    finally:
        subprocess.run(["umount", str(cache)], check=False)


def test_an_output_that_did_not_reach_a_full_cache_is_said(repo: Path, small_cache: Path) -> None:
    """The cache on a full file system: DVC only warns ("failed to transfer"); `make repro`'s
    cache_check names what dvc.lock records that the cache does not hold, exit 2."""
    write_params(repo, {"train": {"epochs": 2}})
    run(["dvc", "repro"], repo, check=False)  # the model (1.6 MB) cannot fit in 300 KB
    check = run([str(BIN / "python"), "-m", "commands.cache_check"], repo, check=False)
    line = check.stderr.strip().splitlines()[-1]
    assert check.returncode == 2 and line.startswith("error: ") and "not right in DVC's cache: " in line, check.stderr
    assert "models/ (missing from the cache)" in check.stdout.splitlines() and "make room first" in line


@pytest.mark.pipeline(seconds=15)
def test_a_sweep_into_a_full_cache_fails_and_names_the_experiment(repo: Path, small_cache: Path) -> None:
    """DVC's queue fails this experiment itself (the sweep then names it); an experiment that "succeeds"
    without its outputs in the cache is named too (tests/test_cache_integrity.py)."""
    proc = run([str(BIN / "python"), "-m", "commands.sweep", "-S", "train.epochs=2"], repo, check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and line.startswith("error: 1 of 1 experiments "), proc.stderr
    assert "did not finish" in line or "not in DVC's cache" in line
