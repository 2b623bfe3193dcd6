"""Stage `check`: params.yaml, every key of it -> data/params.ok. A fraction of a second, usually.

DVC reruns a stage only when a key it lists changes, and deletes a stage's outputs before
running it. This stage depends on params.yaml as a file (any byte that changes reruns it; DVC's
params comparison would take `true` for an unchanged `1`) and every other stage depends on its
output, so any change — a typo'd key added with `dvc exp run -S +train.epoch=20` too — is
validated first, and a bad value stops `dvc repro` / `dvc exp run` here, before any
model, metric or data file is touched. Its output never changes, so a valid edit reruns only
the stages whose own keys changed. Optimizer options, `loss_args` and a schedule's arguments are
checked against the constructors' signatures in the installed Keras' source, without importing
Keras or TensorFlow (`pipeline.arguments`): a fraction of a second, whatever the params.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import atomic, datasets, memory, params, runner

OUT = Path("data/params.ok")


def main() -> None:
    # DVC deleted the output before running this stage; its bytes never change, so it goes back
    # first. A refused change then leaves every output as it was, and once params.yaml is
    # restored `dvc status` is clean again.
    with atomic.target(OUT) as tmp:
        tmp.write_text("params.yaml is valid\n", encoding="utf-8")
    p = params.load()
    datasets.check_expected_sizes(p)
    memory.check(p)  # a model too large for this machine is refused here, not killed mid-training
    print(f"params.yaml: valid -> {OUT}")


if __name__ == "__main__":
    runner.run(main)
