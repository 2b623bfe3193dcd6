"""Will the model fit in memory? An estimate from params, checked by `check` before anything trains.

Training holds, per weight, the float32 weight, its gradient, the optimizer's state (`SLOTS`
per weight: Adam keeps two moments, SGD with momentum one) and the copy written when the model
is saved: 4 bytes x (3 + slots) x weights. Activations of a batch are small beside that for an
MLP on 28x28 images and are added as batch x units x 12 bytes (forward value, gradient, and a
temporary). The estimate is a floor; `check` refuses params whose floor is above the memory this
machine (or its container's cgroup limit) has available, naming both numbers.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from pipeline.errors import ParamError
from pipeline.params import Params

# float32 values of optimizer state per weight (from each Keras optimizer's `build`): moments,
# accumulators, velocities. Adafactor's factored second moment is a row and a column per matrix: ~0.
SLOTS = {
    "adadelta": 2,
    "adafactor": 0,
    "adagrad": 1,
    "adam": 2,
    "adamax": 2,
    "adamw": 2,
    "ftrl": 2,
    "lamb": 2,
    "lion": 1,
    "muon": 2,
    "nadam": 2,
    "rmsprop": 1,
    "schedulefreeadamw": 2,
    "sgd": 0,
}
INPUTS, CLASSES = 28 * 28, 10


def weights(hidden_units: list[int]) -> int:
    """Trainable weights of Flatten -> Dense(units)... -> Dense(10): kernels and biases."""
    sizes = [INPUTS, *hidden_units, CLASSES]
    return sum(n_in * n_out + n_out for n_in, n_out in itertools.pairwise(sizes))


def estimate(p: Params) -> int:
    """Bytes training needs at least with these params (see the module docstring)."""
    opt = p.train.optimizer
    slots = SLOTS.get(opt.name, 2) + (1 if opt.kwargs.get("momentum") else 0) + (1 if opt.kwargs.get("use_ema") else 0)
    activations = p.train.batch_size * (INPUTS + sum(p.model.hidden_units) + CLASSES) * 12
    return 4 * (3 + slots) * weights(p.model.hidden_units) + activations


def available() -> int | None:
    """Bytes this process can still take: the smaller of /proc/meminfo's MemAvailable and the
    cgroup v2 limit less its usage; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii")))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check(p: Params) -> None:
    """Raise ParamError when the estimate is above what is available, naming both (GB)."""
    need, have = estimate(p), available()
    if have is not None and need > have:
        raise ParamError(
            "model.hidden_units",
            f"{p.model.hidden_units} with {p.train.optimizer.name} needs at least {need / 1e9:.1f} GB to train "
            f"({weights(p.model.hidden_units):,} weights, their gradients and the optimizer's state); this "
            f"machine has {have / 1e9:.1f} GB available. Use fewer or smaller layers",
        )
