"""The pipeline's stages and commands, one module each: `python -m stages.<name>` (see dvc.yaml).

Before any stage imports TensorFlow, this pins what would let the machine or the environment
change the arithmetic, so that the same params give the same bytes on every x86-64 machine with
AVX2 and FMA (docs/training.md, "The same bytes on every machine"; tests/test_same_bytes.py):
- oneDNN's graph rewrites off, whatever TF_ENABLE_ONEDNN_OPTS says (they also print a notice in
  every process); the training loop is XLA-compiled either way.
- XLA's own CPU code capped at AVX: XLA compiles for the CPU it runs on, and from AVX2 on it fuses
  multiplies and adds (FMA), which round differently. Vector width changes nothing (an SSE4.2
  cap gives the same bytes), FMA does. XLA's fast math stays off whatever XLA_FLAGS says (its
  other flags, dumps and debugging, are kept).
- oneDNN's matrix multiplication (Eigen's, under XLA's dot products) capped at AVX2: it picks its
  kernels for the CPU at run time; AVX-512 machines then run the AVX2 + FMA kernels every such
  machine has. Below AVX2 its kernels round differently: older CPUs get other bytes.
A lower cap already in the environment is kept (that is how another machine is emulated).
"""

import os
import platform
import re
import sys


def _cap(current: str | None, portable: str, lower: tuple[str, ...]) -> str:
    """`portable`, unless the environment already caps lower."""
    return current if current and current.upper() in lower else portable


os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
if platform.machine().lower() in ("x86_64", "amd64"):
    _flags = os.environ.get("XLA_FLAGS", "")
    _isa = _cap(next(iter(re.findall(r"--xla_cpu_max_isa=(\S+)", _flags)), None), "AVX", ("SSE4_2",))
    _others = re.sub(r"--xla_cpu_(max_isa|enable_fast_math)=\S+", "", _flags).split()  # dumps, debugging: kept
    os.environ["XLA_FLAGS"] = " ".join([*_others, f"--xla_cpu_max_isa={_isa}", "--xla_cpu_enable_fast_math=false"])
    os.environ["ONEDNN_MAX_CPU_ISA"] = _cap(os.environ.get("ONEDNN_MAX_CPU_ISA"), "AVX2", ("SSE41", "AVX"))
# TensorFlow's C++ INFO and WARNING lines (CPU features, XLA's notes) out of the logs; its errors stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if sys.argv[:1] == ["-m"]:  # `python -m stages.<name>`: Python imports this package before the module
    from pipeline import runner

    runner.guard()  # Ctrl-C, SIGTERM and a dying dvc are handled during TensorFlow's seconds-long import too
