"""What the benchmarks that drive `dvc` in a scratch git repository share: the venv's tools first
on PATH, a git identity (a fresh machine has none), TensorFlow's start-up chatter off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "GIT_AUTHOR_NAME": "benchmarks",
    "GIT_AUTHOR_EMAIL": "benchmarks@example.invalid",
    "GIT_COMMITTER_NAME": "benchmarks",
    "GIT_COMMITTER_EMAIL": "benchmarks@example.invalid",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
