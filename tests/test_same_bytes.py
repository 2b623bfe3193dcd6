"""The same params give the same bytes on every x86-64 machine: train and evaluate under emulated CPUs.

XLA compiles the training loop for the CPU it runs on and oneDNN (under Eigen's matrix products)
picks its kernels at run time; `stages/__init__.py` caps XLA at AVX and oneDNN at AVX2, and turns
oneDNN's graph rewrites off. Each run below caps the CPU as another machine would be
(`--xla_cpu_max_isa`, `ONEDNN_MAX_CPU_ISA`, with oneDNN's rewrites asked for), and every model
file, curve and metric must be the bytes of the plain run on this machine (AVX-512 here).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ENV, digests, run, write_params

EMULATED = {
    "an AVX2 + FMA machine (oneDNN asked for, capped at AVX2)": {
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "TF_ENABLE_ONEDNN_OPTS": "1",
    },
    "XLA's code at SSE4.2 (128-bit vectors, no FMA)": {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
    "oneDNN's AVX-512 kernels asked for": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "a user's XLA_FLAGS asking for fast math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},
}


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="XLA's and oneDNN's instruction-set caps emulate x86-64 CPUs only",
)
def test_train_and_evaluate_give_the_same_bytes_under_every_emulated_cpu(project: Path) -> None:
    write_params(project, {"train": {"epochs": 2}})
    for stage in ("download", "normalize"):
        run([sys.executable, "-m", f"stages.{stage}"], project)

    plain = {k: v for k, v in ENV.items() if k not in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS")}

    def outputs(extra: dict[str, str]) -> dict[str, str]:
        for stage in ("train", "evaluate"):
            command = [sys.executable, "-m", f"stages.{stage}"]
            proc = subprocess.run(
                command, cwd=project, env={**plain, **extra}, capture_output=True, text=True, check=False
            )
            assert proc.returncode == 0, proc.stderr
        return digests(project, ("models", "metrics/train", "metrics/eval", "metrics/eval.json"))

    native = outputs({})
    assert any(name.endswith("model.tflite") for name in native) and len(native) > 10
    for machine, extra in EMULATED.items():
        assert outputs(extra) == native, machine
    # the caps are real: below AVX2, oneDNN's kernels round differently (the promise's limit, README)
    assert outputs({"ONEDNN_MAX_CPU_ISA": "AVX"})["models/model.keras"] != native["models/model.keras"]
