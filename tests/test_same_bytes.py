"""The same params give the same bytes on every x86-64 machine: train and evaluate under emulated CPUs.

XLA compiles the training loop for the CPU it runs on and oneDNN (under Eigen's matrix products)
picks its kernels at run time; `stages/__init__.py` caps XLA at AVX and oneDNN at AVX2, and turns
oneDNN's graph rewrites off. Each run below caps the CPU as another machine would be
(`--xla_cpu_max_isa`, `ONEDNN_MAX_CPU_ISA`, with oneDNN's rewrites asked for), and every model
file, curve and metric must be the bytes of the plain run on this machine (AVX-512 here).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ENV, digests, dvc_project

EMULATED = {
    "an AVX2 + FMA machine (oneDNN asked for, capped at AVX2)": {
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TF_ENABLE_ONEDNN_OPTS": "1",
    },
    # a lower cap the stage keeps, with two settings it overrides: one retraining for the three
    "XLA's code at SSE4.2 (128-bit vectors, no FMA) with a user's fast math, oneDNN's AVX-512 kernels asked for": {
        "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2 --xla_cpu_enable_fast_math=true",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
}


@pytest.mark.pipeline(seconds=25)
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="XLA's and oneDNN's instruction-set caps emulate x86-64 CPUs only",
)
def test_train_and_evaluate_give_the_same_bytes_under_every_emulated_cpu(tmp_path: Path) -> None:
    """The reference is the tests' trained project (`dvc repro` at 1 epoch on this machine, plain); each
    emulated machine retrains it, and evaluate runs once after the first (LiteRT reads no XLA or oneDNN
    setting: same model, same evaluation). A plain rerun is each of these with no cap (and
    tests/test_sharing.py's fresh clone reruns the whole pipeline)."""
    project = tmp_path / "p"
    dvc_project(project)
    trained = ("models", "metrics/train")
    native = digests(project, (*trained, "metrics/eval", "metrics/eval.json"))
    assert any(name.endswith("model.tflite") for name in native) and len(native) >= 15, native
    assert "models/saved_model/saved_model.pb" in native and "metrics/eval/confusion_matrix.png" in native
    plain = {k: v for k, v in ENV.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS")}

    def stage(name: str, extra: dict[str, str]) -> None:
        command = [sys.executable, "-m", f"stages.{name}"]
        proc = subprocess.run(command, cwd=project, env={**plain, **extra}, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr

    for i, (machine, extra) in enumerate(EMULATED.items()):
        stage("train", extra)
        if i == 0:
            stage("evaluate", extra)
            evaluated = ("metrics/eval", "metrics/eval.json")
            assert digests(project, evaluated) == {k: v for k, v in native.items() if k.startswith(evaluated)}
        assert digests(project, trained) == {k: v for k, v in native.items() if k.startswith(trained)}, machine
    timings = json.loads((project / "metrics/timings.json").read_text())  # what benchmarks/training.py reads
    assert timings["train_time_s"] > 0 and len(timings["epoch_s"]) == timings["epochs_run"] == 1
    # the caps are real: below AVX2, oneDNN's kernels round differently (the promise's limit, README)
    stage("train", {"ONEDNN_MAX_CPU_ISA": "AVX"})
    assert digests(project, ("models",))["models/model.keras"] != native["models/model.keras"]
