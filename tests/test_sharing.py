"""Versions that travel: byte-identical reproduction, remotes (local and S3), experiments, offline plots.

Every test works on clones of one bare git `origin` on disk, as a team would; the DVC remote is
the project's default (`../keras-loss-lab-dvc-storage`, beside the clones) unless a test says
otherwise. Real `dvc`, real git, a real S3 server (moto) on 127.0.0.1, real Chromium.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import BIN, ENV, digests, dvc_project, free_ports, reset_worktree, run

pytestmark = pytest.mark.pipeline(seconds=5)
PYTHON = str(BIN / "python")
OUTPUTS = ("data", "models", "metrics")


def clone(origin: Path, path: Path, *, plots: bool = False) -> Path:
    """A clone of `origin`; with `plots`, set up as `make setup` does for `dvc plots` (the offline page)."""
    run(["git", "clone", "-q", str(origin), str(path)], origin.parent)
    if plots:
        run([PYTHON, "-m", "commands.offline_plots"], path)
    return path


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare `origin` holding the project after `dvc repro` (1 epoch), its data pushed to the default remote."""
    root = tmp_path_factory.mktemp("team")
    bare = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], root)
    work = root / "first"
    dvc_project(work)
    run(["git", "remote", "add", "origin", str(bare)], work)
    run(["git", "push", "-q", "origin", "main"], work)
    run(["dvc", "push"], work)
    assert (root / "keras-loss-lab-dvc-storage/files/md5").is_dir()  # the default remote, beside the clones
    return bare


@pytest.fixture(scope="module")
def committed(origin: Path) -> dict[str, str]:
    return digests(origin.parent / "first")


@pytest.mark.pipeline(seconds=30)  # with the origin: the project copy pushed
def test_a_fresh_clone_reproduces_every_output_byte_for_byte(origin: Path, committed: dict[str, str]) -> None:
    fresh = clone(origin, origin.parent / "fresh")
    shutil.rmtree(fresh / "metrics")  # git-tracked: without this evaluate sees its outputs and skips
    proc = run(["dvc", "repro"], fresh)  # no cache, no pull: everything is recomputed
    assert all(f"Running stage '{s}'" in proc.stdout for s in ("download", "normalize", "train", "evaluate"))
    assert run(["git", "status", "--porcelain"], fresh).stdout == ""
    assert "Data and pipelines are up to date." in run(["dvc", "status"], fresh).stdout
    assert digests(fresh) == committed
    assert (fresh / "metrics/timings.json").exists()  # the timing is kept, outside the tracked outputs


def test_pull_from_the_default_remote_restores_the_outputs_without_training(
    origin: Path, committed: dict[str, str]
) -> None:
    second = clone(origin, origin.parent / "second")
    assert not (second / "models").exists()
    run(["dvc", "pull"], second)
    assert digests(second) == committed
    assert "Data and pipelines are up to date." in run(["dvc", "status"], second).stdout
    proc = run(["dvc", "repro"], second)
    assert "Running stage" not in proc.stdout


@pytest.fixture
def s3(tmp_path: Path):
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields (endpoint URL, bucket)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    (port,) = free_ports()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="team", aws_secret_access_key="secret", region_name="us-east-1"
    )
    client.create_bucket(Bucket="team-dvc")
    yield endpoint, client
    server.stop()


def use_s3_remote(repo: Path, endpoint: str) -> None:
    """What the README tells a team: the remote in .dvc/config, the credentials in config.local."""
    run(["dvc", "remote", "add", "-f", "-d", "team", "s3://team-dvc/keras-loss-lab"], repo)
    run(["dvc", "remote", "modify", "team", "endpointurl", endpoint], repo)
    run(["dvc", "remote", "modify", "team", "region", "us-east-1"], repo)
    run(["dvc", "remote", "modify", "--local", "team", "access_key_id", "team"], repo)
    run(["dvc", "remote", "modify", "--local", "team", "secret_access_key", "secret"], repo)


@pytest.mark.system(seconds=16)
def test_an_s3_remote_carries_data_model_and_metrics_between_clones(
    origin: Path, committed: dict[str, str], s3: tuple
) -> None:
    endpoint, client = s3
    pusher = clone(origin, origin.parent / "s3-pusher")
    run(["dvc", "pull", "-r", "storage"], pusher)  # the data, from the local default remote
    use_s3_remote(pusher, endpoint)
    run(["dvc", "push"], pusher)
    assert client.list_objects_v2(Bucket="team-dvc").get("KeyCount", 0) >= 5
    assert "secret" not in (pusher / ".dvc/config").read_text()  # credentials stay in config.local

    puller = clone(origin, origin.parent / "s3-puller")
    use_s3_remote(puller, endpoint)
    run(["dvc", "pull"], puller)
    assert digests(puller) == committed
    assert "Data and pipelines are up to date." in run(["dvc", "status"], puller).stdout


@pytest.fixture(scope="module")
def experiments(origin: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A clone that ran two experiments and pushed one; the outputs of each, by name."""
    lab = clone(origin, origin.parent / "lab", plots=True)
    run(["dvc", "pull"], lab)
    outputs = {"baseline": digests(lab)}
    for name, change in (("exp-a", "train.epochs=2"), ("exp-b", "train.optimizer.name=sgd")):
        proc = run(["dvc", "exp", "run", "-n", name, "-S", change], lab)
        assert "Running stage 'train'" in proc.stdout
        outputs[name] = digests(lab)
    assert outputs["exp-a"] != outputs["exp-b"] != outputs["baseline"]
    run(["dvc", "exp", "push", "origin", "exp-a"], lab)
    return lab, outputs


@pytest.mark.pipeline(seconds=30)  # with the experiments: two trained in a clone
def test_an_experiment_pushed_by_one_clone_is_pulled_and_applied_in_another_without_training(
    origin: Path, experiments: tuple[Path, dict]
) -> None:
    _, outputs = experiments
    other = clone(origin, origin.parent / "other")
    run(["dvc", "exp", "pull", "origin", "exp-a"], other)
    assert "exp-a" in run(["dvc", "exp", "list", "--name-only"], other).stdout
    run(["dvc", "exp", "apply", "exp-a"], other)
    assert digests(other) == outputs["exp-a"]
    assert "Data and pipelines are up to date." in run(["dvc", "status"], other).stdout
    proc = run(["dvc", "repro"], other)
    assert "Running stage" not in proc.stdout and "Data and pipelines are up to date." in proc.stdout


def test_apply_between_local_experiments_and_checkout_of_a_commit_restore_exact_outputs(
    experiments: tuple[Path, dict],
) -> None:
    lab, outputs = experiments
    for name in ("exp-a", "exp-b", "exp-a"):
        run(["dvc", "exp", "apply", name], lab)
        assert digests(lab) == outputs[name], name
        assert "Data and pipelines are up to date." in run(["dvc", "status"], lab).stdout
    reset_worktree(lab)
    head = run(["git", "rev-parse", "HEAD"], lab).stdout.strip()
    run(["git", "checkout", "-q", head], lab)
    run(["dvc", "checkout"], lab)
    assert digests(lab) == outputs["baseline"]
    run(["git", "checkout", "-q", "main"], lab)


def test_exp_show_leads_with_the_test_results_then_the_changed_params(experiments: tuple[Path, dict]) -> None:
    lab, _ = experiments
    table = run(["dvc", "exp", "show", "--only-changed", "--md"], lab).stdout
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[:4] == ["Experiment", "Created", "test.accuracy", "test.log_loss"], header
    assert set(header[4:6]) == {"train.epochs", "train.optimizer.name"}, header
    # at a terminal's default 80 columns (a real pseudo-terminal), as the README shows it: the two test
    # results fit; from 100 columns the params that differ do too
    for columns, expected in (
        (80, ["test.accuracy", "test.log_loss"]),
        (100, ["test.accuracy", "test.log_loss", "train.optimizer.name"]),
    ):
        screen = subprocess.run(
            ["script", "-qc", "dvc exp show --only-changed --drop Created --no-pager", "/dev/null"],
            cwd=lab,
            env={**ENV, "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        lines = re.sub(r"\x1b\[[0-9;]*m", "", screen).splitlines()
        header = next(line for line in lines if "Experiment" in line).split()
        assert len(max(lines, key=len)) <= columns
        assert header[1 : len(expected) + 1] == expected, (columns, header)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=http://127.0.0.1:9",  # nothing listens there: the network is unreachable
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--virtual-time-budget=20000",
    "--window-size=1200,2000",
]


def chromium(page: Path, tmp_path: Path, *args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    proc = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.system(seconds=8)
def test_plots_diff_draws_every_plot_offline_in_a_real_browser(experiments: tuple[Path, dict], tmp_path: Path) -> None:
    lab, _ = experiments
    run(["dvc", "plots", "diff", "exp-a", "exp-b", "-o", str(tmp_path / "plots")], lab)
    page = tmp_path / "plots/index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.count('aria-label="Vega visualization"') == 3, "loss, accuracy and the confusion matrix"
    assert dom.count('class="marks"') == 3
    assert "exp-a" in dom and "exp-b" in dom
    chromium(page, tmp_path, f"--screenshot={tmp_path / 'shot.png'}")
    with Image.open(tmp_path / "shot.png") as shot:
        pixels = np.asarray(shot.convert("L"))
    assert (pixels < 200).mean() > 0.01, "the screenshot is blank"

    # The control: DVC's own page, which loads Vega from a CDN, draws nothing here.
    from dvc_render.html import PAGE_HTML

    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    cdn = ["dvc", "plots", "diff", "exp-a", "exp-b", "--html-template", str(tmp_path / "cdn.html")]
    run([*cdn, "-o", str(tmp_path / "cdn")], lab)
    assert chromium(tmp_path / "cdn/index.html", tmp_path, "--dump-dom").count('aria-label="Vega visualization"') == 0


def test_compare_never_shrinks_the_results_table(experiments: tuple[Path, dict], tmp_path: Path) -> None:
    lab, _ = experiments
    readme = tmp_path / "README.md"
    rows = "\n".join(f"| old-{i} | x | adam | 0.001 | 10 | 0.9 | 0.3 | 0.9 |" for i in range(40))
    readme.write_text(f"# r\n<!-- compare:start -->\n| experiment | loss |\n|---|---|\n{rows}\n<!-- compare:end -->\n")
    before = readme.read_text()
    report = [PYTHON, "-m", "commands.report", "--out", str(tmp_path / "reports"), "--readme", str(readme)]
    proc = run(report, lab, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {readme} shows 40 experiments but only 3 are")
    assert readme.read_text() == before and not (tmp_path / "reports/compare.md").exists()
    run([*report, "--replace"], lab)
    table = readme.read_text()
    assert "old-0" not in table and "| exp-a |" in table and "| exp-b |" in table
    assert "| 2 |" in table  # exp-a's epochs, read from what it committed
