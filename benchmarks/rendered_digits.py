"""How well the shipped model reads digits handed over as ordinary image files (after `make repro`).

Every digit of the pipeline's test split is redrawn as a person might give it (black ink on
paper, a few hundred pixels, off-centre; every third one a JPEG, see tests/digits.py), read
back through `stages.predict`'s preparation (`stages.lib.images`) and the shipped model, and
compared with the label and with the model's answer on the untouched 28x28 original.

Then each digit is drawn once more and saved plain (PNG) and with each twist of
tests/digits.py (a phone's EXIF orientation, 16-bit and float files, ink only in the alpha
channel, animations); a twist should read as its plain page does. A file that cannot be
read counts as a disagreement. 21 files per digit: about 4 minutes on 2 cores for the default
1,000 digits (`--twisted 200` for a quicker look). Results: docs/images.md.

    python benchmarks/rendered_digits.py [--examples data/examples] [--twisted 1000]

`--examples DIR` also writes the first few rendered digits there (the README's picture).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.lib import images, serving
from tests.digits import TWISTS, page, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, help="also keep a few rendered digits in this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--twisted", type=int, default=1000, metavar="N", help="digits per twist (0: none)")
    args = parser.parse_args()
    raw = np.load("data/raw/dataset.npz")
    x, y = raw["x_test"], raw["y_test"]
    model, _ = serving.load()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = [render(x[i], Path(tmp, f"{i}.{'jpg' if i % 3 == 0 else 'png'}"), rng) for i in range(len(y))]
        start = time.perf_counter()
        seen = np.stack([images.load(f)[1] for f in files])
        prepare_s = time.perf_counter() - start
        sizes = [f.stat().st_size for f in files]
        if args.examples:
            args.examples.mkdir(parents=True, exist_ok=True)
            for f in files[:4]:
                (args.examples / f"digit-{f.name}").write_bytes(f.read_bytes())
    rendered = model.predict(seen).argmax(axis=1)
    original = model.predict(x).argmax(axis=1)
    print("| input | digits | accuracy | agrees with the 28x28 original |")
    print("|---|---|---|---|")
    print(f"| the test split's 28x28 originals | {len(y)} | {(original == y).mean():.4f} | 1.0000 |")
    print(
        f"| the same, rendered as a person's PNG/JPEG | {len(y)} | {(rendered == y).mean():.4f} "
        f"| {(rendered == original).mean():.4f} |"
    )
    print(
        f"\npreparation: {1000 * prepare_s / len(y):.1f} ms per image (median file {np.median(sizes) / 1024:.0f} KiB)"
    )
    if args.twisted:
        twisted(model, x[: args.twisted], y[: args.twisted], args.seed)


def twisted(model: object, x: np.ndarray, y: np.ndarray, seed: int) -> None:
    """Each digit drawn once, saved plain and with every twist; one table row per twist."""
    rng = np.random.default_rng(seed + 1)
    names = ["plain PNG", *TWISTS]
    seen = {name: np.zeros((len(y), 28, 28), np.uint8) for name in names}
    read_ok = {name: np.zeros(len(y), bool) for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for i, digit in enumerate(x):
            drawn = page(digit, rng)
            made = {"plain PNG": Path(tmp, "plain.png")}
            drawn.save(made["plain PNG"])
            for k, (name, (suffix, make)) in enumerate(TWISTS.items()):
                made[name] = make(drawn, Path(tmp, f"{k}{suffix}"), rng)
            for name, path in made.items():
                try:
                    seen[name][i] = images.load(path)[1]
                    read_ok[name][i] = True
                except images.ImageError:
                    pass  # counted as not read, and as a disagreement
    read = {name: model.predict(pictures).argmax(axis=1) for name, pictures in seen.items()}
    print("\n| the same page, saved as | digits | accuracy | agrees with the plain PNG | not read |")
    print("|---|---|---|---|---|")
    for name in names:
        right, agree = (read[name] == y) & read_ok[name], (read[name] == read["plain PNG"]) & read_ok[name]
        print(f"| {name} | {len(y)} | {right.mean():.4f} | {agree.mean():.4f} | {(~read_ok[name]).sum()} |")


if __name__ == "__main__":
    main()
