"""Digits as a person would hand them over: MNIST test digits redrawn as ordinary image files.

Shared by tests/test_predict.py and benchmarks/rendered_digits.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def render(digit: np.ndarray, path: Path, rng: np.random.Generator) -> Path:
    """Black ink on white paper, upscaled to a few hundred pixels, off-centre, PNG or JPEG by `path`."""
    ink = Image.fromarray(255 - digit)  # MNIST is light ink on black; people write dark on light
    side = int(rng.integers(200, 420))
    ink = ink.resize((side, side), Image.Resampling.BICUBIC)
    width, height = int(side * rng.uniform(1.2, 1.8)), int(side * rng.uniform(1.1, 1.6))
    paper = int(rng.integers(225, 256))  # paper is rarely pure white
    page = Image.new("L", (width, height), color=paper)
    page.paste(
        ink.point(lambda v: min(v, paper)),
        (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))),
    )
    if path.suffix.lower() in (".jpg", ".jpeg"):
        page.convert("RGB").save(path, quality=int(rng.integers(70, 95)))
    else:
        page.save(path)
    return path
