"""Read a person's digit images with the trained model: `python -m commands.predict IMAGE...`.

Each PNG/JPEG/... (any size or colour) becomes the 28x28 picture MNIST would have made of it
(`commands.images`), and the shipped model (`models/`, see `pipeline.serving`) reads it.
Prints, per file, the predicted digit and the top-3 outputs; `--json` for machines; `--show
out.png` draws each input beside the 28x28 the model saw and its outputs. Not a DVC stage:
it reads the user's files, and nothing of the project but the model and its card. Runs the
LiteRT model without TensorFlow (a fraction of a second); matplotlib is imported for --show only.

    python -m commands.predict my_seven.png photo_of_a_three.jpg --show seen.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from commands import images
from pipeline import atomic, runner, serving
from pipeline.errors import StageError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m commands.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--model", type=Path, default=serving.MODEL_DIR, help="the train stage's output folder")
    parser.add_argument("--top", type=int, default=3, choices=range(1, 11), metavar="K", help="outputs to list (3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--show", type=Path, metavar="OUT.png", help="also draw what the model saw and said")
    return parser.parse_args()


def check_show(out: Path, inputs: list[Path]) -> None:
    """Refuse a --show target that is an input, a folder, or not a picture file name, before any work."""
    if any(out.resolve() == path.resolve() for path in inputs):
        raise StageError(f"--show {out} is one of the input images; give another file name")
    if out.parent.exists() and not out.parent.is_dir():
        raise StageError(f"--show {out}: {out.parent} is a file, not a folder")
    if out.is_dir():
        raise StageError(f"--show {out} is a folder; give a file in it, e.g. {out / 'predict.png'}")
    from matplotlib.backend_bases import FigureCanvasBase

    if out.suffix.lower().lstrip(".") not in FigureCanvasBase.get_supported_filetypes():
        raise StageError(f"--show {out}: give a picture file name ending in .png, .jpg, .pdf or .svg")


def shown(path: Path) -> str:
    """`path` as text any terminal can print: bytes that are not UTF-8 (an old camera's Latin-1 name,
    a zip made on Windows) as `\\xe9` escapes, the way `ls --quoting-style=escape` and Python's
    `backslashreplace` spell them."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)  # a newline: \\n


def rejoin(given: list[Path]) -> list[Path | str]:
    """`given` with each run of missing names that, joined by spaces, names an existing file (a name with
    spaces that the shell or `make predict IMG=...` split) replaced by one error line saying so."""
    out: list[Path | str] = []
    i = 0
    while i < len(given):
        for end in range(min(len(given), i + 8), i + 1, -1):
            joined = Path(" ".join(str(p) for p in given[i:end]))
            if not given[i].exists() and joined.is_file():
                name, pieces = shown(joined), ", ".join(shown(p) for p in given[i:end])
                quoted = shlex.quote(name)
                make = "" if set(quoted) & set('"$`\\') else f', or make predict IMG="{quoted}"'
                out.append(
                    f"{name}: given as {end - i} names ({pieces}); quote a name with spaces: "
                    f"python -m commands.predict {quoted}{make}"
                )
                i = end
                break
        else:
            out.append(given[i])
            i += 1
    return out


def main() -> None:
    args = parse_args()
    if args.show:
        check_show(args.show, args.images)
    inputs, failures = [], []
    for path in rejoin(args.images):
        if isinstance(path, str):  # a name with spaces, split
            failures.append(path)
            continue
        try:
            gray, seen = images.load(path)
        except images.ImageError as exc:
            failures.append(str(exc).replace(str(path), shown(path)))
            continue
        # only a thumbnail of the file as read, to draw it: memory stays flat in the number of files
        inputs.append((path, images.thumbnail(gray) if args.show else None, seen))
    if inputs:
        model, card = serving.load(args.model)
        outputs = model.predict(np.stack([seen for _, _, seen in inputs]))
        meaning = card["output"]["meaning"]
        results = [
            {
                "file": shown(path),
                "digit": int(out.argmax()),
                "top": [{"digit": int(d), "value": round(float(out[d]), 4)} for d in np.argsort(-out)[: args.top]],
                "outputs": [round(float(v), 6) for v in out],
            }
            for (path, _, _), out in zip(inputs, outputs, strict=True)
        ]
        if args.json:
            print(json.dumps({"output": meaning, "predictions": results}, indent=2))
        else:
            for r in results:
                top = ", ".join(f"{t['digit']}: {t['value']:.3f}" for t in r["top"])
                print(f"{r['file']}: {r['digit']}   ({meaning}: {top})")
        if args.show:
            show(inputs, outputs, meaning, args.show)
            print(f"picture -> {shown(args.show)}", file=sys.stderr)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        sys.exit(2)


def show(inputs: list[tuple[Path, np.ndarray, np.ndarray]], outputs: np.ndarray, meaning: str, out: Path) -> None:
    """One row per image: the file as read, the 28x28 the model saw, and its ten outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(inputs), 3, figsize=(9, 2.4 * len(inputs)), squeeze=False)
    for (path, gray, seen), values, (ax_in, ax_seen, ax_bar) in zip(inputs, outputs, axes, strict=True):
        ax_in.imshow(gray, cmap="gray", vmin=0, vmax=255)
        ax_in.set_title(shown(Path(path.name)), fontsize=9)
        ax_seen.imshow(seen, cmap="gray", vmin=0, vmax=255)
        ax_seen.set_title("what the model saw (28x28)", fontsize=9)
        for ax in (ax_in, ax_seen):
            ax.set(xticks=[], yticks=[])
        digit = int(values.argmax())
        ax_bar.bar(range(10), values, color=["tab:orange" if d == digit else "tab:blue" for d in range(10)])
        ax_bar.set(xticks=range(10), title=f"reads {digit} ({meaning} {values[digit]:.2f})")
        if "probabilities" in meaning:
            ax_bar.set_ylim(0, 1)
        ax_bar.title.set_fontsize(9)
    fig.tight_layout()
    try:
        atomic.save_figure(fig, out, dpi=90)
    except OSError as exc:
        raise StageError(f"--show {out}: cannot write it ({exc.strerror or exc}); give a path you can write") from None
    finally:
        plt.close(fig)


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
