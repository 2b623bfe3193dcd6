"""Digits as a person would hand them over: MNIST test digits redrawn as ordinary image files.

`render` draws a digit as black ink on white paper and saves it as PNG or JPEG. The twists
save the same page the way other devices do: a phone's sideways pixels with an EXIF
orientation, 16-bit and float scans, ink only in the alpha channel, animations. Each twist is
what a viewer shows as the plain page (up to rounding), so `predict` should read them alike.

Shared by tests/test_predict.py and benchmarks/rendered_digits.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

# The pixels a camera stores for each EXIF orientation, from what a viewer shows (the EXIF
# spec, written out in numpy rather than taken from Pillow, which the code under test uses).
STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: np.fliplr,  # mirrored
    3: lambda a: np.rot90(a, 2),  # upside down
    4: np.flipud,  # mirrored upside down
    5: np.transpose,  # mirrored and turned
    6: lambda a: np.rot90(a, 1),  # phone held upright: stored turned a quarter to the left
    7: lambda a: np.rot90(a, 2).T,  # mirrored and turned the other way
    8: lambda a: np.rot90(a, -1),  # turned a quarter to the right
}


def page(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Black ink on white paper (mode L), upscaled to a few hundred pixels, off-centre."""
    ink = Image.fromarray(255 - digit)  # MNIST is light ink on black; people write dark on light
    side = int(rng.integers(200, 420))
    ink = ink.resize((side, side), Image.Resampling.BICUBIC)
    width, height = int(side * rng.uniform(1.2, 1.8)), int(side * rng.uniform(1.1, 1.6))
    paper = int(rng.integers(225, 256))  # paper is rarely pure white
    drawn = Image.new("L", (width, height), color=paper)
    drawn.paste(
        ink.point(lambda v: min(v, paper)),
        (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))),
    )
    return drawn


def render(digit: np.ndarray, path: Path, rng: np.random.Generator) -> Path:
    """`page(digit)` saved as PNG or JPEG by `path`'s suffix."""
    drawn = page(digit, rng)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        drawn.convert("RGB").save(path, quality=int(rng.integers(70, 95)))
    else:
        drawn.save(path)
    return path


# --- twists: the same page saved as other devices save it; each writes `path` and returns it ---


def oriented(drawn: Image.Image, path: Path, orientation: int) -> Path:
    """A phone photo: pixels stored turned or mirrored, the EXIF Orientation tag saying how to show them."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](np.asarray(drawn))))
    stored.convert("RGB" if path.suffix == ".jpg" else "L").save(path, exif=exif, **_lossless(path))
    return path


def sixteen_bit(drawn: Image.Image, path: Path, byte_order: str = "<") -> Path:
    """A 16-bit greyscale export (PNG or TIFF): the page's levels times 257, 0-65535."""
    levels = np.asarray(drawn, dtype=np.uint16) * 257
    Image.fromarray(levels.astype(f"{byte_order}u2")).save(path)
    return path


def floating(drawn: Image.Image, path: Path, white: float = 1.0) -> Path:
    """A float32 TIFF: the page's levels on 0..`white` (1.0 or 255.0)."""
    Image.fromarray(np.asarray(drawn, dtype=np.float32) * np.float32(white / 255)).save(path)
    return path


def pencil_scan(
    drawn: Image.Image, path: Path, rng: np.random.Generator, pencil: float | None = None, paper: float | None = None
) -> Path:
    """A 16-bit scan of faint pencil: darkest stroke at `pencil` of full scale (50-70% if not
    given), the paper at `paper` (90-96%), a little sensor noise; TIFF or PNG by `path`."""
    pencil = rng.uniform(0.5, 0.7) if pencil is None else pencil
    paper = rng.uniform(0.90, 0.96) if paper is None else paper
    levels = np.asarray(drawn, dtype=np.float32)
    lightness = levels / levels.max()  # 0 at the pen's darkest, 1 on the paper
    scan = 65535 * (pencil + lightness * (paper - pencil)) + rng.normal(0, 65535 * 0.004, levels.shape)
    Image.fromarray(np.clip(np.rint(scan), 0, 65535).astype(np.uint16)).save(path)
    return path


def alpha_only(drawn: Image.Image, path: Path, colour: tuple[int, int, int] = (255, 255, 255)) -> Path:
    """A drawing app's or web canvas's PNG: one `colour` for every stroke, the ink only in the
    opacity; the canvas fully transparent, its pixels (0, 0, 0, 0)."""
    levels = np.asarray(drawn, dtype=np.float32)
    opacity = np.rint(255 * (1 - levels / levels.max())).astype(np.uint8)
    rgba = np.zeros((*levels.shape, 4), dtype=np.uint8)
    rgba[opacity > 0, :3] = colour
    rgba[..., 3] = opacity
    Image.fromarray(rgba).save(path)
    return path


def animated(drawn: Image.Image, path: Path, first_blank: bool = False) -> Path:
    """A three-frame GIF, TIFF or WebP (by suffix): the page, then a blank page and the page upside
    down; with `first_blank`, a blank page comes first."""
    blank = Image.new("L", drawn.size, int(np.asarray(drawn).max()))
    frames = [blank, drawn, drawn.rotate(180)] if first_blank else [drawn, blank, drawn.rotate(180)]
    if path.suffix == ".webp":
        frames = [f.convert("RGB") for f in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], **_lossless(path))
    return path


def png_rgb16(drawn: Image.Image, path: Path) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow writes none: the file is written here by hand)."""
    rgb = np.repeat(np.asarray(drawn, dtype=">u2")[..., None] * 257, 3, axis=2)
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)  # filter type 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", drawn.width, drawn.height, 16, 2, 0, 0, 0)  # 16-bit, RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def _lossless(path: Path) -> dict:
    return {".webp": {"lossless": True}, ".jpg": {"quality": 90}}.get(path.suffix, {})


# Every twist, as the tests and the benchmark run it: name -> (file suffix, how to save a page).
Twist = Callable[[Image.Image, Path, np.random.Generator], Path]
TWISTS: dict[str, tuple[str, Twist]] = {
    **{f"phone JPEG, EXIF orientation {o}": (".jpg", lambda d, p, rng, o=o: oriented(d, p, o)) for o in STORED},
    "16-bit grey PNG": (".png", lambda d, p, rng: sixteen_bit(d, p)),
    "16-bit grey TIFF, big-endian": (".tif", lambda d, p, rng: sixteen_bit(d, p, ">")),
    "16-bit RGB PNG": (".png", lambda d, p, rng: png_rgb16(d, p)),
    "float TIFF, 0..1": (".tif", lambda d, p, rng: floating(d, p, 1.0)),
    "float TIFF, 0..255": (".tif", lambda d, p, rng: floating(d, p, 255.0)),
    "16-bit scan, ink at 12% on 94% paper": (".tif", lambda d, p, rng: pencil_scan(d, p, rng, 0.12, 0.94)),
    "16-bit pencil scan, 50-70% on 90-96% paper": (".tif", pencil_scan),
    "white ink in the alpha channel only": (".png", lambda d, p, rng: alpha_only(d, p)),
    "one random colour, ink in the alpha channel": (
        ".png",
        lambda d, p, rng: alpha_only(d, p, tuple(int(c) for c in rng.integers(0, 256, 3))),
    ),
    **{
        f"3-frame {s[1:].upper()}, digit first": (s, lambda d, p, rng: animated(d, p))
        for s in (".gif", ".tif", ".webp")
    },
}
