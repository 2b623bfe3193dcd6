"""Try ~100 bad inputs and faults through `dvc exp run` and `dvc repro`, as a user would; count outcomes.

Each case runs in a scratch git + DVC copy of the project (trained once at 1 epoch), and is
classed by what the user saw and what was left:

- clean: non-zero exit, one readable line (`error: ...` from a stage, or DVC's own refusal)
- traceback: a Python traceback anywhere in the output
- silent: exit 0 for an input that is wrong
- lost: the model, the metrics, the data or dvc.lock (other than check's own entry) differ from
  before, after the one command the stage's line printed (`dvc checkout --force`, where DVC had
  deleted the outputs before running the stage)

After each case the copy is restored (git reset, git checkout main, dvc checkout) and checked.

    .venv/bin/python benchmarks/probe_bad_inputs.py [--keep DIR] [--only SUBSTRING]

Prints one row per case and the totals; exits 1 if any case is not clean.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: stages/, tests/
from tests.harness import BIN, digests, flip_a_byte, git_project, restore, run, stored_object


@dataclass
class Case:
    kind: str  # what a user does: exp run -S, edit params.yaml + repro, a data fault, a damaged output
    name: str
    prepare: Callable[[Path], list[str]]  # sets up the case in the repo, returns the command to run
    checks_loss: bool = True  # False where the case itself damages an output


def exp(*changes: str) -> Callable[[Path], list[str]]:
    return lambda repo: ["dvc", "exp", "run", *[a for c in changes for a in ("-S", c)]]


def edit(transform: Callable[[str], str]) -> Callable[[Path], list[str]]:
    def prepare(repo: Path) -> list[str]:
        params = repo / "params.yaml"
        params.write_bytes(transform(params.read_text()).encode("utf-8", "surrogateescape"))
        return ["dvc", "repro"]

    return prepare


def data_file(content: bytes, *, with_sum: bool) -> Callable[[Path], list[str]]:
    """data.url -> a local file with `content`; its real checksum too when `with_sum`."""

    def prepare(repo: Path) -> list[str]:
        path = repo.parent / f"input-{hashlib.md5(content).hexdigest()[:8]}.csv.gz"
        path.write_bytes(content)
        changes = [f"data.url={path.as_uri()}"]
        if with_sum:
            changes.append(f"data.sha256={hashlib.sha256(content).hexdigest()}")
        return exp(*changes)(repo)

    return prepare


def fifo_url(repo: Path) -> list[str]:
    """data.url -> a FIFO nobody writes to: opening it would wait forever."""
    fifo = repo.parent / "waits-forever.csv.gz"
    if not fifo.exists():
        os.mkfifo(fifo)
    return exp(f"data.url={fifo.as_uri()}", f"data.sha256={'0' * 64}")(repo)


def gzip_bomb(repo: Path) -> list[str]:
    """data.url -> a small gzip file that inflates to 200 MB of zeros, with its real checksum."""
    path = repo.parent / "bomb.csv.gz"
    with gzip.open(path, "wb") as out:
        for _ in range(200):
            out.write(bytes(2**20))
    return exp(f"data.url={path.as_uri()}", f"data.sha256={hashlib.sha256(path.read_bytes()).hexdigest()}")(repo)


ABSENT_WORKER = json.dumps(
    {"cluster": {"worker": ["127.0.0.1:39871", "127.0.0.1:39872"]}, "task": {"type": "worker", "index": 0}}
)


def planted_model(repo: Path) -> list[str]:
    """models/model.tflite replaced by bytes that are no flatbuffer, with a card whose sha256 matches them."""
    model, card = repo / "models/model.tflite", repo / "models/model.json"
    planted = b"TFL3" + bytes(range(256)) * 4
    text = card.read_text()
    model.unlink()  # DVC may link outputs from its cache: never write through the link
    model.write_bytes(planted)
    card.unlink()
    card.write_text(text.replace(json.loads(text)["sha256"]["model.tflite"], hashlib.sha256(planted).hexdigest()))
    return ["dvc", "repro", "evaluate", "--force", "--single-item"]


def damage(path: str, how: Callable[[bytes], bytes], command: list[str]) -> Callable[[Path], list[str]]:
    def prepare(repo: Path) -> list[str]:
        target = repo / path
        data = target.read_bytes()
        target.unlink()  # DVC may link outputs from its cache: never write through the link
        target.write_bytes(how(data))
        return command

    return prepare


def flipped_in_cache(repo: Path) -> list[str]:
    """A byte of the cached model.keras flipped on disk: `dvc status` stays clean. The command checks,
    then repairs (so the later cases find a sound cache), and exits with the check's status."""
    flip_a_byte(stored_object(repo / ".dvc/cache/files/md5", repo / "models/model.keras"))
    check = f"{PY} -m commands.cache_check --verify"
    return ["sh", "-c", f"{check}; status=$?; {check} --repair > /dev/null; exit $status"]


def deleted_from_remote(repo: Path) -> list[str]:
    """model.keras deleted from the default remote after a push: `dvc status -c` says in sync."""
    run(["dvc", "push"], repo)
    stored_object(repo.parent / "keras-loss-lab-dvc-storage/files/md5", repo / "models/model.keras").unlink()
    return [PY, "-m", "commands.cache_check", "--remote", "storage"]


PY = str(BIN / "python")
CASES: list[Case] = []
for change in [  # unknown keys and typos, added with -S +...
    "+train.epoch=20",
    "+train.batchsize=64",
    "+train.lr=0.01",
    "+train.optimiser=sgd",
    "+model.hidden_unit=[64]",
    "+model.activations=tanh",
    "+data.sources=mnist",
    "+normalize.methods=scale",
    "+evaluate.batch=128",
    "+foo.bar=1",
    "+trian.epochs=3",
]:
    CASES.append(Case("unknown key", change, exp(change)))
for change in [  # wrong types, YAML 1.1 habits included
    "train.epochs=ten",
    "train.epochs=2.5",
    "train.epochs=true",
    "train.batch_size=[32]",
    "train.validation_split=abc",
    "train.seed=4.2",
    "model.hidden_units=128",
    "model.hidden_units=[a]",
    "model.dropout=high",
    "model.activation=5",
    "train.loss=3",
    "train.from_logits=1",
    "train.from_logits=yes",
    "train.from_logits=on",
    "train.early_stopping.enabled=off",
    "train.early_stopping.patience=x",
    "data.test_fraction=half",
    "data.split_seed=x",
    "evaluate.batch_size=null",
    "train.optimizer=adam",
    "train.lr_schedule=cosine",
    "train.loss_args=[1]",
]:
    CASES.append(Case("wrong type", change, exp(change)))
for change in [  # out of range
    "train.epochs=0",
    "train.epochs=-5",
    "train.batch_size=0",
    "train.validation_split=1",
    "train.validation_split=-0.1",
    "model.dropout=1",
    "model.dropout=-0.5",
    "data.test_fraction=0",
    "data.test_fraction=1",
    "train.seed=-1",
    "train.seed=4294967296",
    "data.split_seed=-3",
    "model.hidden_units=[0]",
    "model.hidden_units=[100000000]",
    "train.optimizer.learning_rate=0",
    "train.optimizer.learning_rate=-1",
    "train.epochs=.inf",
    "train.optimizer.learning_rate=.nan",
    "evaluate.batch_size=0",
]:
    CASES.append(Case("out of range", change, exp(change)))
for change in [  # unknown names
    "train.loss=crossentropy",
    "train.loss=binary_crossentropyy",
    "train.optimizer.name=adamm",
    "train.optimizer.name=Adam",
    "train.lr_schedule.name=cosine",
    "model.activation=relu6",
    "model.output_activation=relu",
    "data.source=cifar10",
    "normalize.method=minmax",
    "evaluate.confusion_normalize=rows",
    "train.early_stopping.monitor=val_acc",
]:
    CASES.append(Case("unknown name", change, exp(change)))
for changes in [  # combinations that cannot work
    ("train.loss=binary_crossentropy", "model.output_activation=softmax"),
    ("train.loss=kl_divergence", "train.from_logits=true"),
    ("model.output_activation=sigmoid", "train.from_logits=true"),
    ("train.loss=categorical_hinge", "model.output_activation=softmax"),
    ("train.early_stopping.enabled=true", "train.validation_split=0"),
    ("+train.lr_schedule.decay_steps=100",),
]:
    CASES.append(Case("combination", " ".join(changes), exp(*changes)))
for changes in [  # Keras' own arguments
    ("+train.optimizer.foo=1",),
    ("+train.optimizer.momentum=0.9",),
    ("+train.optimizer.clipnorm=abc",),
    ("+train.optimizer.beta_1=high",),
    ("train.optimizer.name=sgd", "+train.optimizer.nesterov=1"),
    ("+train.loss_args.label_smoothing=0.1",),
    ("+train.loss_args.from_logits=true",),
    ("train.lr_schedule.name=exponential_decay",),
    (
        "train.lr_schedule.name=exponential_decay",
        "+train.lr_schedule.decay_steps=-5",
        "+train.lr_schedule.decay_rate=0.9",
    ),
    ("+train.optimizer.clipnorm=[1,2]",),
]:
    CASES.append(Case("keras argument", " ".join(changes), exp(*changes)))
for change in [  # data locations and checksums
    "data.url=http://host:80a/x",
    "data.url=http://my host/x",
    "data.url=ftp://example.org/x.gz",
    "data.url=http:///x.gz",
    "data.sha256=abc",
    "data.sha256=" + "Z" * 64,
    "data.url=file:///nonexistent/mnist_5k.csv.gz",
]:
    CASES.append(Case("data location", change, exp(change)))
CASES += [
    Case("data fault", "not a gzip file", data_file(b"not a gzip file", with_sum=False)),
    Case("data fault", "not a gzip file, its checksum given", data_file(b"not a gzip file", with_sum=True)),
    Case("data fault", "gzip of a wrong CSV", data_file(gzip.compress(b"1,2,3\n4,5,6\n"), with_sum=True)),
    Case("data fault", "gzip of text", data_file(gzip.compress(b"hello\nworld\n"), with_sum=True)),
    Case("data fault", "truncated gzip", data_file(gzip.compress(b"1,2,3\n" * 1000)[:40], with_sum=True)),
    Case("data fault", "empty file", data_file(b"", with_sum=True)),
    Case("data fault", "mnist, offline (no network here)", exp("data.source=mnist")),
]
CASES += [
    Case("params.yaml edit", "a duplicate section", edit(lambda t: t + "train:\n  epochs: 3\n")),
    Case("params.yaml edit", "an unclosed bracket", edit(lambda t: t.replace("  - 128\n", "  [128\n"))),
    Case("params.yaml edit", "a tab for indentation", edit(lambda t: t.replace("\n  epochs: 1\n", "\n\tepochs: 1\n"))),
    Case("params.yaml edit", "a list, not a mapping", edit(lambda t: "- data\n- train\n")),
    Case("params.yaml edit", "bytes that are not UTF-8", edit(lambda t: t + "# caf\udce9\n")),
    Case("params.yaml edit", "a typo'd section", edit(lambda t: t.replace("evaluate:", "evalute:"))),
    Case("params.yaml edit", "yes for a boolean", edit(lambda t: t.replace("from_logits: false", "from_logits: no"))),
]
CASES += [
    Case(
        "damaged output",
        "truncated model, evaluate by hand",
        damage("models/model.tflite", lambda b: b[: len(b) // 3], [PY, "-m", "stages.evaluate"]),
        checks_loss=False,
    ),
    Case(
        "damaged output",
        "garbage model card, evaluate by hand",
        damage("models/model.json", lambda b: b"{not json", [PY, "-m", "stages.evaluate"]),
        checks_loss=False,
    ),
    Case(
        "damaged output",
        "truncated raw data, normalize by hand",
        damage("data/raw/dataset.npz", lambda b: b[:1000], [PY, "-m", "stages.normalize"]),
        checks_loss=False,
    ),
    Case(
        "damaged output",
        "truncated normalized data, train by hand",
        damage("data/normalized/dataset.npz", lambda b: b[:5000], [PY, "-m", "stages.train"]),
        checks_loss=False,
    ),
    Case(
        "damaged output",
        "model card of an unknown loss, predict",
        damage(
            "models/model.json",
            lambda b: b'{"loss": "nope"}',
            [PY, "-m", "commands.predict", "data/examples/digit-1.png"],
        ),
        checks_loss=False,
    ),
]


def as_pid_1(transform: Callable[[str], str]) -> Callable[[Path], list[str]]:
    """params.yaml edited, then `python -m stages.check` by hand as PID 1 (`docker run IMAGE ...`)."""

    def prepare(repo: Path) -> list[str]:
        edit(transform)(repo)
        return [*NAMESPACE, PY, "-m", "stages.check"]

    return prepare


LONG = ("train.epochs=300", "train.speed.jit_compile=false", "train.speed.steps_per_execution=1")  # minutes
NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]  # PID 1 of its own namespace, as in a container
CASES += [
    Case("params.yaml edit", "a section removed (dvc exp run -S ~evaluate)", exp("~evaluate")),
    Case("params.yaml edit", "an empty params.yaml", edit(lambda t: "")),
    Case("diverges", "train.optimizer.name=sgd train.optimizer.learning_rate=1e30",
         exp("train.optimizer.name=sgd", "train.optimizer.learning_rate=1e30")),
    Case("empty split", "train.validation_split=0.9999", exp("train.validation_split=0.9999")),
    Case("empty split", "data.test_fraction=0.0002", exp("data.test_fraction=0.0002")),
    Case("empty split", "train.batch_size=5000", exp("train.batch_size=5000")),
    Case("no effect", "binary_focal_crossentropy alpha=0.9 without apply_class_balancing",
         exp("train.loss=binary_focal_crossentropy", "+train.loss_args.alpha=0.9")),
    Case("no effect", "sgd nesterov=true without momentum",
         exp("train.optimizer.name=sgd", "+train.optimizer.nesterov=true")),
    Case("no effect", "adam ema_momentum=0.9 without use_ema", exp("+train.optimizer.ema_momentum=0.9")),
    Case("no effect", "a schedule's initial_learning_rate beside another learning_rate", exp(
        "train.lr_schedule.name=cosine_decay", "+train.lr_schedule.decay_steps=10",
        "+train.lr_schedule.initial_learning_rate=0.1")),
    Case("where it runs", "dvc repro as PID 1, a bad value", lambda r: [*NAMESPACE, *exp("train.seed=-1")(r)]),
    Case("where it runs", "a stage by hand as PID 1, a bad value", as_pid_1(lambda t: t.replace("ed: 42", "ed: -1"))),
    Case("bounded", "data.url names a FIFO", fifo_url),
    Case("bounded", "data.url: 200 KB of gzip that inflates to 200 MB", gzip_bomb),
    Case("bounded", "model.hidden_units=[65536,65536] (4.3e9 weights)", exp("model.hidden_units=[65536,65536]")),
    Case("bounded", "multi_worker, TF_CONFIG names a worker that never starts", lambda r: [
        "env", f"TF_CONFIG={ABSENT_WORKER}", *exp("train.distribute=multi_worker", "train.cluster_timeout_s=20")(r)]),
    Case("untrusted", "params nested 5000 deep", edit(lambda t: t.replace(
        "loss_args: {}", "loss_args: {a: " + "[" * 5000 + "]" * 5000 + "}"))),
    Case("untrusted", "a planted model.tflite that is no flatbuffer, its card matching", planted_model,
         checks_loss=False),
    Case("untrusted", "model.json from another model", damage(
        "models/model.json", lambda b: b.replace(b'"model.tflite": "', b'"model.tflite": "0'), [
            "dvc", "repro", "evaluate", "--force", "--single-item"]), checks_loss=False),
    Case("cache and remote", "a byte flipped in the cached model.keras", flipped_in_cache),
    Case("cache and remote", "model.keras deleted from the remote", deleted_from_remote),
    Case("interrupted", "dvc exp run, SIGTERM mid-train", lambda r: ["timeout", "-s", "TERM", "12", *exp(*LONG)(r)]),
    Case("interrupted", "dvc repro as PID 1, SIGTERM mid-train", lambda r: [
        "timeout", "-s", "TERM", "12", *NAMESPACE, *exp(*LONG)(r)]),
]  # fmt: skip


RESTORE = "dvc checkout --force"  # what a stage's line says restores the outputs DVC deleted


def classify(case: Case, proc: subprocess.CompletedProcess[str], lost: bool) -> tuple[str, str]:
    output = proc.stdout + proc.stderr
    said_by = ("error: ", "ERROR: ", "interrupted", "terminated")  # a stage's or DVC's own line
    lines = [line for line in output.splitlines() if line.startswith(said_by)]
    said = lines[0] if lines else (output.strip().splitlines() or [""])[-1]
    if "Traceback (most recent call last)" in output:
        return "traceback", said
    if lost:
        return "lost", said
    if proc.returncode == 0:
        return "silent", said
    return ("clean" if lines else "no message"), said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the scratch copy here and keep it")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="probe-"))
    repo = base / "repo"
    git_project(repo)  # params.yaml as written: the edit cases below change its text
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("\n  epochs: 10\n", "\n  epochs: 1\n"))  # quick to train
    run(["git", "commit", "-qam", "1 epoch"], repo)
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "repro"], repo)
    baseline = digests(repo, lock=True)

    cases = [c for c in CASES if not args.only or args.only in c.name]
    counts: Counter[str] = Counter()
    print("| # | kind | input | outcome | what the user saw | s |")
    print("|---|---|---|---|---|---|")
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        cmd = case.prepare(repo)
        proc = run(cmd, repo, check=False)
        if RESTORE in proc.stdout + proc.stderr:  # the one command the stage printed, as a user would run it
            run(RESTORE.split(), repo, check=False)
        lost = case.checks_loss and digests(repo, lock=True) != baseline
        outcome, said = classify(case, proc, lost)
        counts[outcome] += 1
        said = said.replace("|", "/")[:150]
        print(f"| {i} | {case.kind} | `{case.name}` | {outcome} | {said} | {time.perf_counter() - start:.1f} |")
        sys.stdout.flush()
        restore(repo)
        if digests(repo, lock=True) != baseline:
            raise RuntimeError("the scratch copy could not be restored")
    print(f"\n{len(cases)} cases: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts)))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(0 if counts["clean"] == len(cases) else 1)


if __name__ == "__main__":
    main()
