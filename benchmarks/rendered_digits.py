"""How well the shipped model reads digits handed over as ordinary image files (after `make repro`).

Every digit of the pipeline's test split is redrawn as a person might give it (black ink on
paper, a few hundred pixels, off-centre; every third one a JPEG, see tests/digits.py), read
back through `commands.predict`'s preparation (`commands.images`) and the shipped model, and
compared with the label and with the model's answer on the untouched 28x28 original.

Then each digit is drawn once more and saved plain (PNG) and with each twist of
tests/digits.py (a phone's EXIF orientation, 16-bit and float files, ink only in the alpha
channel, animations), and once more on each page kind (uneven light, a shadow, ruled and
squared paper, a dithered 1-bit scan, a sheet on a desk, chalk, grey paper, a bit of the next
digit); a twist or a page kind should read as its plain page does. A file that cannot be read
counts as a disagreement. Every file is read twice: by today's `commands.images` and by the
one of commit BEFORE (the page the border's median colour, the digit the box around every
marked pixel), the `before` columns. About 12 minutes on 2 cores for the default 1,000 digits
(`--twisted 200 --pages 200` for a quicker look). Results: docs/images.md.

    python benchmarks/rendered_digits.py [--examples data/examples] [--twisted 1000] [--pages 1000] [--before REV]

`--examples DIR` also writes the first few rendered digits there (the README's picture).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from commands import images
from pipeline import serving
from pipeline.errors import StageError
from tests.digits import PAGES, TWISTS, Twist, page, render
from tests.harness import ROOT

BEFORE = "573a775"  # the last commit whose images.py took the border's median colour as the page


def images_at(rev: str) -> ModuleType:
    """commands/images.py as it was at commit `rev` (`git show`), loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:commands/images.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = ModuleType(f"images_at_{rev}")
    exec(compile(source, f"{rev}:commands/images.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, help="also keep a few rendered digits in this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--twisted", type=int, default=1000, metavar="N", help="digits per twist (0: none)")
    parser.add_argument("--pages", type=int, default=1000, metavar="N", help="digits per page kind (0: none)")
    parser.add_argument("--before", default=BEFORE, metavar="REV", help=f"commit to compare with ({BEFORE}; none: no)")
    args = parser.parse_args()
    raw = np.load("data/raw/dataset.npz")
    x, y = raw["x_test"], raw["y_test"]
    model, _ = serving.load()
    readers = {"now": images} if args.before == "none" else {"now": images, "before": images_at(args.before)}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = [render(x[i], Path(tmp, f"{i}.{'jpg' if i % 3 == 0 else 'png'}"), rng) for i in range(len(y))]
        seen, prepare_s = {}, {}
        for name, reader in readers.items():
            start = time.perf_counter()
            seen[name] = np.stack([reader.load(f)[1] for f in files])
            prepare_s[name] = time.perf_counter() - start
        sizes = [f.stat().st_size for f in files]
        if args.examples:
            args.examples.mkdir(parents=True, exist_ok=True)
            for f in files[:4]:
                (args.examples / f"digit-{f.name}").write_bytes(f.read_bytes())
    original = model.predict(x).argmax(axis=1)
    print("| input | digits | accuracy | agrees with the 28x28 original |")
    print("|---|---|---|---|")
    print(f"| the test split's 28x28 originals | {len(y)} | {(original == y).mean():.4f} | 1.0000 |")
    for name, pictures in seen.items():
        rendered = model.predict(pictures).argmax(axis=1)
        print(
            f"| the same, rendered as a person's PNG/JPEG, read {name} | {len(y)} | {(rendered == y).mean():.4f} "
            f"| {(rendered == original).mean():.4f} |"
        )
    print(f"\nmedian file {np.median(sizes) / 1024:.0f} KiB; reading and preparing a file:")
    for name, seconds in prepare_s.items():
        print(f"- {name}: {1000 * seconds / len(y):.1f} ms")
    if args.twisted:
        n = args.twisted
        compare(
            model, x[:n], y[:n], seed=args.seed + 1, kinds=TWISTS, readers=readers, heading="the same page, saved as"
        )
    if args.pages:
        n = args.pages
        compare(model, x[:n], y[:n], seed=args.seed + 2, kinds=PAGES, readers=readers, heading="the same digit, on")


def compare(
    model: serving.LiteRTModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    kinds: dict[str, tuple[str, Twist]],
    readers: dict[str, ModuleType],
    heading: str,
) -> None:
    """Each digit drawn once, saved plain and as every one of `kinds`, each file read by every
    reader; one table row per kind: accuracy, agreement with the plain PNG and files not read,
    for each reader."""
    rng = np.random.default_rng(seed)
    names = ["plain PNG", *kinds]
    seen = {(r, name): np.zeros((len(y), 28, 28), np.uint8) for r in readers for name in names}
    read_ok = {key: np.zeros(len(y), bool) for key in seen}
    with tempfile.TemporaryDirectory() as tmp:
        for i, digit in enumerate(x):
            drawn = page(digit, rng)
            made = {"plain PNG": Path(tmp, "plain.png")}
            drawn.save(made["plain PNG"])
            for k, (name, (suffix, make)) in enumerate(kinds.items()):
                made[name] = make(drawn, Path(tmp, f"{k}{suffix}"), rng)
            for name, path in made.items():
                for r, reader in readers.items():
                    try:
                        seen[r, name][i] = reader.load(path)[1]
                        read_ok[r, name][i] = True
                    except StageError:
                        pass  # counted as not read, and as a disagreement
    read = {key: model.predict(pictures).argmax(axis=1) for key, pictures in seen.items()}
    columns = ["accuracy", "agrees with the plain PNG", "not read"]
    titles = [c if r == "now" else f"{c} ({r})" for r in readers for c in columns]
    print(f"\n| {heading} | digits | " + " | ".join(titles) + " |")
    print("|---|---|" + "---|" * len(columns) * len(readers))
    for name in names:
        cells = []
        for r in readers:
            ok = read_ok[r, name]
            right, agree = (read[r, name] == y) & ok, (read[r, name] == read[r, "plain PNG"]) & ok
            cells += [f"{right.mean():.3f}", f"{agree.mean():.3f}", f"{(~ok).sum()}"]
        print(f"| {name} | {len(y)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
