"""Bad input gets one clear line and nothing is lost: the schema under generated input, YAML as DVC
writes it, downloads that survive transient faults, atomic writes under SIGKILL, one-line errors."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from pipeline import atomic, datasets, fetch, params
from pipeline.errors import DataError, ParamError
from tests.harness import ENV, ROOT, FileServer, git_project, run, wait_for

DEFAULTS = YAML(typ="safe", pure=True).load((ROOT / "params.yaml").read_text())

# --- the schema, under generated input -------------------------------------------------------

ODD_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["yes", "no", "on", "off", "1e-3", "0x1F", "~", "", "true", "None", "adam", "sgd", "relu"]),
    st.text(max_size=12),
)
VALUES = st.one_of(
    ODD_SCALARS,
    st.lists(ODD_SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["name", "a", "learning_rate", "momentum"]), ODD_SCALARS, max_size=3),
)


def paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += paths(value, (*prefix, key))
    return out


KNOWN_PATHS = paths(DEFAULTS)


@st.composite
def mutated_params(draw: st.DrawFn) -> dict:
    """The default params.yaml with a few keys replaced, removed or added (typos included)."""
    raw = copy.deepcopy(DEFAULTS)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(KNOWN_PATHS))
        parent = raw
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "remove", "add", "typo"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "remove":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        else:
            parent[path[-1] + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(path[-1], 1)
    return raw


def _judge() -> Any:
    """An independent judge of types, ranges, choices and unknown keys: the JSON Schema of `params.Params`,
    checked by the jsonschema package (integers are not floats or booleans, numbers are finite)."""
    import jsonschema

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _, v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        }
    )
    validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    return validator(params.Params.model_json_schema())


JUDGE = _judge()


def schema_accepts(raw: dict) -> bool:
    raw = copy.deepcopy(raw)
    evaluate = raw.get("evaluate")
    if isinstance(evaluate, dict) and evaluate.get("confusion_normalize", "") in (True, "true", "pred", None):
        evaluate["confusion_normalize"] = "actual"  # earlier spellings, still accepted
    return JUDGE.is_valid(raw)


# Keys whose rules the JSON Schema cannot state: joined keys, URL and checksum formats, and Keras'
# arguments (judged by Keras itself and the registry).
RULE_KEYS = ("model.output_activation", "train.from_logits", "train.early_stopping.monitor", "data.url", "data.sha256")
KERAS_SECTIONS = ("train.optimizer", "train.lr_schedule", "train.loss_args")


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_params())
def test_any_params_mapping_validates_or_names_the_dotted_key(raw: dict) -> None:
    """Accepted: the schema's judge agrees and every given value is kept. Refused: one line naming a key
    that the judge refuses too, or one whose rule lies outside the JSON Schema."""
    try:
        p = params.parse(raw)
    except ParamError as exc:
        assert exc.key and "\n" not in str(exc)
        assert str(exc).startswith(f"params.yaml: {exc.key}: ")
        key = exc.key.strip("'")  # a key with a space in it is quoted
        assert not schema_accepts(raw) or key.startswith(RULE_KEYS + KERAS_SECTIONS), str(exc)
    else:
        assert schema_accepts(raw), raw
        assert p.train.epochs == raw.get("train", {}).get("epochs", 10)
        assert params.parse(p.model_dump()) == p  # what was accepted reads back the same


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    path=st.sampled_from(KNOWN_PATHS),
    scalar=st.sampled_from(["yes", "on", "off", "1e-3", ".nan", "-.inf", "0o17", "~", "[]", "2026-11-29"]),
)
def test_odd_yaml_scalars_in_a_file_validate_or_name_the_key(path: tuple, scalar: str, tmp_path_factory) -> None:
    """Scalars as a person (or `dvc exp run -S`) writes them, read as YAML 1.2, as DVC does."""
    raw = copy.deepcopy(DEFAULTS)
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = "@@"
    text = json.dumps(raw).replace('"@@"', scalar)  # JSON is YAML: one odd scalar in a valid document
    file = tmp_path_factory.mktemp("p") / "params.yaml"
    file.write_text(text)
    try:
        params.load(file)
    except ParamError as exc:
        assert "\n" not in str(exc) and exc.key


def load_text(tmp_path: Path, text: str) -> params.Params:
    """`text` as params.yaml, with an empty `section: {}` after it for each section it lacks."""
    text = textwrap.dedent(text)
    present = {line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()}
    text += "".join(f"{section}: {{}}\n" for section in params.SECTIONS if section not in present)
    (tmp_path / "params.yaml").write_text(text)
    return params.load(tmp_path / "params.yaml")


def test_yaml_is_read_as_dvc_writes_it(tmp_path: Path) -> None:
    """YAML 1.2: exponents are numbers, yes/on are not booleans; `true`, an earlier spelling of a choice, is kept."""
    p = load_text(
        tmp_path,
        """
        train: {optimizer: {name: sgd, learning_rate: 1e-1}, loss_args: {}}
        evaluate: {confusion_normalize: true}
        """,
    )
    assert p.train.optimizer.kwargs["learning_rate"] == 0.1 and p.evaluate.confusion_normalize == "actual"
    with pytest.raises(ParamError, match=r"train.from_logits: expected true or false, got 'yes'"):
        load_text(tmp_path, "train: {from_logits: yes}\n")
    with pytest.raises(ParamError, match=r"\(file\): not valid YAML at line 3, column 1: found duplicate key"):
        load_text(tmp_path, "train:\n  epochs: 3\ntrain:\n  epochs: 4\n")


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"train": {"seed": -1}}, "train.seed", "must be >= 0"),
        ({"train": {"seed": 2**32}}, "train.seed", "must be < 4294967296"),
        ({"data": {"split_seed": 2**40}}, "data.split_seed", "must be <"),
        ({"train": {"epochs": float("inf")}}, "train.epochs", "expected an integer"),
        ({"train": {"validation_split": float("nan")}}, "train.validation_split", "finite"),
        ({"train": {"optimizer": {"name": "sgd", "momentum": float("nan")}}}, "train.optimizer.momentum", "finite"),
        ({"train": {"loss_args": {"label_smoothing": {"a": 1}}}}, "train.loss_args.label_smoothing", "expected"),
        ({"model": {"hidden_units": [10**9]}}, "model.hidden_units[0]", "must be <= 65536"),
        ({"data": {"url": "http://host:80a/x"}}, "data.url", "not a valid URL"),
        ({"data": {"url": "http://my host/x"}}, "data.url", "contains a space"),
        ({"data": {"url": "http:///x.npz"}}, "data.url", "has no host"),
    ],
)
def test_values_that_used_to_give_tracebacks_are_one_line_errors(raw: dict, key: str, fragment: str) -> None:
    with pytest.raises(ParamError) as exc:
        params.parse(raw)
    assert exc.value.key == key and fragment in str(exc.value), str(exc.value)


# --- downloads: retries against a real server that fails, then serves ------------------------


BODY = b"x" * 200_000


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FileServer]]:
    """A server whose first requests fail (set `failures` and `failure`), then serve BODY."""
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.01)
    with FileServer({"/file.bin": BODY}) as server:
        server.failures = 2
        yield f"{server.url}/file.bin", server


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_a_download_that_fails_twice_then_serves_succeeds(flaky: tuple, mode: str, tmp_path: Path, capsys) -> None:
    url, server = flaky
    server.failure = mode
    dest = tmp_path / "file.bin"
    fetch.fetch(url, dest, hashlib.sha256(BODY).hexdigest())
    assert dest.read_bytes() == BODY and server.requests == 3
    assert capsys.readouterr().err.count("download failed (") == 2  # each retry said on stderr
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_download_that_keeps_failing_stops_with_one_line(flaky: tuple, tmp_path: Path) -> None:
    url, server = flaky
    server.failures = 99
    with pytest.raises(DataError, match=r"HTTP 503 .*\(tried 4 times\)\. Offline\?") as exc:
        fetch.fetch(url, tmp_path / "file.bin", "0" * 64)
    assert server.requests == 4 and "\n" not in str(exc.value) and list(tmp_path.iterdir()) == []


def test_corrupt_and_malformed_downloads_are_data_errors(tmp_path: Path) -> None:
    import gzip
    import zlib

    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\nnot,a,number\n"))
    with pytest.raises(DataError, match="not a gzipped CSV"):
        datasets.read_sample_csv({"mnist_5k.csv.gz": bad}, params.DataParams())
    bad.write_bytes(b"\x1f\x8b\x08\x00" + zlib.compress(b"garbage")[2:])  # a gzip header, a broken stream
    with pytest.raises(DataError, match="not a gzipped CSV"):
        datasets.read_sample_csv({"mnist_5k.csv.gz": bad}, params.DataParams())
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="corrupt or truncated"):
        datasets.load_npz(tmp_path / "x.npz")


# --- atomic writes under SIGKILL --------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from pipeline import atomic
out = Path(sys.argv[1])
for generation in range(1, 10**6):
    with atomic.target(out) as tmp:
        tmp.mkdir()
        for i in range(40):
            (tmp / f"part{i}.txt").write_text(f"{generation}\\n" * 2000)
        (tmp / "DONE").write_text(str(generation))
"""


@pytest.mark.slow
def test_sigkill_mid_write_leaves_the_old_or_the_new_folder_never_a_mix(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def under_way() -> bool:  # what the test observes, not a guessed number of seconds
        return (out / "DONE").exists() and any(tmp_path.glob(".out.*-*.tmp"))

    for attempt in range(16):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=env)
        wait_for(under_way, 60, "a folder written, and the next one under way")
        time.sleep(0.003 * attempt)  # a different moment of the write each time (a folder takes about 20 ms)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        atomic.recover(out)  # what the next write does first
        generation = (out / "DONE").read_text()
        parts = {p.read_text() for p in out.glob("part*.txt")}
        assert len(list(out.glob("part*.txt"))) == 40 and parts == {f"{generation}\n" * 2000}, attempt
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary outlives recovery


def test_a_file_write_that_fails_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"accuracy": 0.9})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"accuracy": object()})
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_nested_writes_whose_names_share_a_stem_keep_each_other(tmp_path: Path) -> None:
    """metrics/eval.json written while metrics/eval/ is being written: neither removes the other's temporary."""
    (tmp_path / ".eval.json.1-00.tmp").write_text("pid 1 is alive: its write is under way, kept")
    (tmp_path / f".eval.json.{2**22 + 7}-00.tmp").write_text("a dead process's: removed")
    with atomic.target(tmp_path / "eval") as folder:
        folder.mkdir()
        (folder / "metrics.json").write_text("{}")
        atomic.write_json(tmp_path / "eval.json", {"test": 1})
        with atomic.target(tmp_path / "eval.json.bak") as other:
            other.write_text("x")
            atomic.recover(tmp_path / "eval")  # recovering a same-stem output leaves open writes alone
            atomic.recover(tmp_path / "eval.json")
            assert other.exists() and folder.is_dir()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".eval.json.1-00.tmp", "eval", "eval.json", "eval.json.bak"]
    assert (tmp_path / "eval/metrics.json").read_text() == "{}" and json.loads((tmp_path / "eval.json").read_text())


def test_a_write_left_by_this_process_before_is_stale(tmp_path: Path) -> None:
    stale = tmp_path / f".model.keras.{os.getpid()}-0123.tmp"
    stale.write_text("left by an earlier write of this process, not under way")
    atomic.write_json(tmp_path / "model.keras", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


# --- the stage runner: one line for every kind of failure ------------------------------------


def test_a_write_error_is_one_line_and_exit_2(project: Path) -> None:
    (project / "data").mkdir()
    (project / "data/raw").write_text("a file where the stage needs a folder")
    proc = run([sys.executable, "-m", "stages.download"], project, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read or write ")
    assert "Traceback" not in proc.stderr


def test_a_file_size_limit_is_one_line_not_a_silent_kill(project: Path) -> None:
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 100 && exec {sys.executable} -m stages.download"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in proc.stderr.strip().splitlines()[-1]
    assert not (project / "data/raw/dataset.npz").exists()


# A stage that says it has started (a file `ready`), then waits in C, where Python never runs a signal
# handler: glibc's default mutex, locked twice by one thread, waits forever (ctypes lets go of the GIL).
HOLD = """
import ctypes
from pathlib import Path
from pipeline import runner
def main():
    Path("ready").touch()
    mutex = ctypes.create_string_buffer(64)
    ctypes.CDLL(None).pthread_mutex_lock(mutex)
    ctypes.CDLL(None).pthread_mutex_lock(mutex)
runner.run(main)
"""


def test_sigterm_is_one_line_and_exit_143_even_while_the_stage_waits_in_c(project: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=project, stderr=subprocess.PIPE, text=True)
    try:
        wait_for((project / "ready").exists, 60, "the stage to start its work")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert stderr.strip() == (
        "terminated (SIGTERM, or dvc was stopped): the previous outputs are kept; run it again to recover"
    )


@pytest.mark.slow
def test_a_second_dvc_repro_in_one_workspace_is_refused_by_dvcs_own_lock(tmp_path: Path) -> None:
    """No lock of this project's: while `dvc repro` runs a stage, DVC refuses a second `dvc repro` in the
    same workspace before it touches that stage's outputs, naming the first."""
    with socket.create_server(("127.0.0.1", 0)) as server:  # takes the download's connection, never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/mnist.npz"
        repo = git_project(tmp_path, {"data": {"source": "mnist", "url": url, "sha256": "0" * 64}})
        first = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: select.select([server], [], [], 0)[0], 120, "the first run's download to connect")
            second = run(["dvc", "repro"], repo, check=False)
            assert second.returncode != 0, second.stdout + second.stderr
            assert "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr
            assert (repo / "data/params.ok").is_file()  # the first run's outputs untouched
        finally:
            first.kill()  # its stage ends with it
            first.wait()


def test_an_os_error_not_about_a_users_path_is_an_internal_error_with_a_traceback_on_request(project: Path) -> None:
    code = "import errno; from pipeline import runner\ndef main(): raise OSError(errno.EINVAL, 'Invalid argument')\n"
    code += "runner.run(main, writes_outputs=False)"
    plain = run([sys.executable, "-c", code], project, check=False)
    assert plain.returncode == 1 and plain.stderr.startswith("internal error: OSError: [Errno 22] Invalid argument")
    assert "Traceback" not in plain.stderr
    shown = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env={**ENV, "STAGES_TRACEBACK": "1"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr and "in main" in shown.stderr


def test_a_full_disk_names_the_output_it_was_writing(tmp_path: Path) -> None:
    import errno

    with pytest.raises(OSError) as info, atomic.target(tmp_path / "out.npz"):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a full disk raises it
    assert info.value.filename == str(tmp_path / "out.npz") and list(tmp_path.iterdir()) == []
