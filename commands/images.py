"""A person's digit image -> the 28x28 uint8 picture MNIST would have made of it. Pillow + numpy.

MNIST's recipe (LeCun et al.): light ink on a dark background, the digit's bounding box scaled
so its longer side is 20 pixels (aspect ratio kept, anti-aliased), then placed in a 28x28 frame
so that its centre of mass sits at the centre. `to_mnist` applies it to any PNG/JPEG/... a
person makes: any size, colour or transparency, dark ink on paper or light ink on a screen.
An image that already is MNIST-style (28x28, dark background) is used as it is.

First the page is told from the digit: the ink is measured against the page *around* each
pixel (`ink`: uneven light, shadows, ruled lines, dither), and the digit is the marks that
stand out from the page, not everything marked (`the_digit`: specks, a desk around the sheet,
a bit of the next digit). An image that holds no single digit on a page is refused.

Images are read as a viewer shows them (`read_gray`): the EXIF orientation applied, any bit
depth scaled to 0-255 (never clipped), transparency shown on white paper, the first frame of
an animation. What people can hand over is described in docs/images.md.
"""

from __future__ import annotations

import contextlib
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from scipy import ndimage

from pipeline.errors import StageError

MAX_PIXELS = 25_000_000  # 5000 x 5000: larger images are refused before they are decoded
SIDE, BOX = 28, 20  # the MNIST frame, and the longer side of the digit inside it
INK_THRESHOLD = 0.2  # share of the strongest ink that counts as ink (bounding box, blank check)
MIN_CONTRAST = 40  # the strongest ink takes this many 255ths (16%) of the page's light; less is blank
WORK_SIDE = 1024  # a larger image is shrunk to about this longer side before its ink is found
BACKGROUND_GRID = 32  # cells across the shorter side on which the page's light is estimated
PAGE_FLOOR = 0.5  # the page is nowhere darker than this share of its light level; darker is ink
LINE_SHARE = 0.9  # a row or column with ink along this share of its length holds a ruled line
MARK_GRID = 64  # cells across the longer side on which the marks are told apart
MIN_MARK = 0.005  # a mark away from the image's edge counts from this share of the image's cells
SPECK_SHARE = 0.1  # a mark smaller than this share of the largest mark is a speck
OTHER_SHARE = 0.25  # a mark of at least this share of the largest one's size is more than a detached bit
MAX_COVER = 0.8  # the digit's marks cover at most this share of the image; more is no page
WHITES = {"F": (1.0, 255.0, 65535.0), "I": (255.0, 65535.0)}  # the full scales a float or int image may use


class ImageError(StageError):
    """An input image cannot be read or holds no digit."""


class NoInkError(ImageError):
    """The image is blank or nearly uniform: no digit in it."""


def read_gray(path: str | Path) -> np.ndarray:
    """The image at `path` as a viewer shows its first frame: float32 (height, width), 0 black to 255 white.

    Raises ImageError, with `path` and the cause in one line, for a file that is missing, not
    an image, corrupt, larger than MAX_PIXELS, or holds NaN or infinite values.
    """
    path = Path(path)
    if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
        raise ImageError(f"{path}: not a regular file (a FIFO or a device); give image files")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd files it reads anyway
            # From a file object, not a path: Pillow (11-13) memory-maps an uncompressed TIFF opened
            # by path with its size already turned for orientations 5-8, and the pixels come out garbled.
            with path.open("rb") as file, Image.open(file) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {width}x{height} pixels is too large; at most {MAX_PIXELS:,} pixels "
                        "(scale it down first, a digit needs only a few hundred)"
                    )
                img.load()
                _upright(img)
                return gray_levels(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        what = "an empty file" if path.stat().st_size == 0 else "not an image Pillow can read"
        raise ImageError(f"{path}: {what}; give PNG, JPEG, BMP, GIF, TIFF or WebP files") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused as too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # unreadable, truncated or corrupt image data
        raise ImageError(f"{path}: cannot read the image ({exc})") from None


def gray_levels(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> float32 (height, width) grey levels, 0 black to 255 white.

    High bit depths are scaled, not clipped. 16-bit modes (I;16, I;16B, ...) span 0-65535.
    32-bit integer (I) and float (F) images span 0 to the first of 1 (floats only), 255 and
    65535 that holds their largest value (beyond 65535: 0 to that value); negative values are
    black. Pillow itself reads 16-bit RGB(A) as 8-bit RGB(A), scaled.
    Transparency is shown on white paper; when that leaves no ink but the alpha channel holds
    some (a white or light digit on a transparent canvas), the opacity is the ink (opaque =
    black). Raises ValueError for NaN or infinite values.
    """
    if img.mode in WHITES or img.mode.startswith("I;16"):
        gray = np.array(img, dtype=np.float32)
        if not np.isfinite(gray).all():
            raise ValueError("its values include NaN or infinity")
        top = float(gray.max(initial=0))
        white = 65535.0 if img.mode.startswith("I;16") else next((w for w in WHITES[img.mode] if top <= w), top)
        gray *= 255 / white
        return np.maximum(gray, 0, out=gray)
    if img.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in img.info:
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgba = img.convert("RGBA")
    shown = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L"), np.float32)
    if ink_contrast(shown) >= MIN_CONTRAST:
        return shown
    opacity = 255 - np.asarray(rgba.getchannel("A"), dtype=np.float32)
    return opacity if ink_contrast(opacity) >= MIN_CONTRAST else shown


def ink(gray: np.ndarray) -> np.ndarray:
    """Grey levels (height, width), 0-255 -> the ink, float32 >= 0: 255 is black on whatever page.

    An image larger than WORK_SIDE on its longer side is first shrunk by a whole factor (box
    averages), and the ink has that smaller shape. The page is light unless both the image's
    median and its border's median are dark (chalk, a screen, light ink on a dark canvas);
    then dark and light swap. Then:

    1. A light box blur (radius 1/300 of the shorter side) turns dither dots and sensor noise grey.
    2. The page as it would be without the strokes is a grey-level closing (a max filter, then
       a min filter) with a window a third of the shorter side wide, wider than strokes are:
       it follows uneven light, shadows and vignettes, and keeps the sharp edge of a sheet
       lying on a desk. It runs on a grid BACKGROUND_GRID cells across and is resized back up;
       nowhere is it darker than PAGE_FLOOR of the light page level (its 90th percentile).
       Each pixel's ink is the share of that light it lacks, so a stroke in a shadow is as
       dark as one in full light: the black top-hat (Gonzalez & Woods, Digital Image
       Processing, 4th ed., 9.6: top-hat transforms correct uneven illumination), as a ratio.
    3. Ruled, squared and margin lines run through whole rows or columns: the ink that
       LINE_SHARE of a row (then of a column) holds is its line's, and is taken off where it
       is a thin line (narrower than 1/50 of the shorter side), not a digit's wide stroke.
    """
    factor = -(-max(gray.shape) // WORK_SIDE)
    if factor > 1:
        gray = np.asarray(Image.fromarray(gray.astype(np.float32)).reduce(factor))
    sample = gray[:: max(1, gray.shape[0] // 64), :: max(1, gray.shape[1] // 64)]
    if max(np.median(sample), np.median(_border(gray))) < 128:
        gray, sample = 255 - gray, 255 - sample
    page = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    page = page.filter(ImageFilter.BoxBlur(min(page.size) / 300))
    grid = page.reduce(max(1, min(page.size) // BACKGROUND_GRID))
    window = min(grid.size) // 3 | 1  # odd, as the filters need
    background = grid.filter(ImageFilter.MaxFilter(window)).filter(ImageFilter.MinFilter(window))
    background = background.resize(page.size, Image.Resampling.BILINEAR)
    background = np.maximum(np.asarray(background, np.float32), PAGE_FLOOR * np.percentile(sample, 90))
    strokes = np.clip(255 * (1 - np.asarray(page, np.float32) / background), 0, None)
    thin = min(page.size) // 50 | 1
    for axis in (1, 0):  # rows (ruled lines), then columns (a margin line, squared paper)
        step = max(1, strokes.shape[axis] // 128)  # 128 samples along each line are plenty
        samples = strokes[:, ::step] if axis == 1 else strokes[::step]
        line = np.quantile(samples, 1 - LINE_SHARE, axis=axis, method="lower")
        strokes -= np.expand_dims(line - ndimage.grey_opening(line, size=thin, mode="nearest"), axis)
        np.clip(strokes, 0, None, out=strokes)
    return strokes


def ink_contrast(gray: np.ndarray) -> float:
    """The strongest ink, in 255ths of the page's light around it (0 for a blank image)."""
    return float(ink(gray).max())


def is_mnist_style(gray: np.ndarray) -> bool:
    """Already an MNIST picture: 28x28 with a dark background."""
    return gray.shape == (SIDE, SIDE) and float(np.median(_border(gray))) < 128


def to_mnist(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Grey levels of any size -> uint8 (28, 28), light ink on black, framed the way MNIST was.

    Raises NoInkError (naming `name`) when the strongest ink is under MIN_CONTRAST, and
    ImageError when the image holds no single digit on a page (`the_digit`).
    """
    if is_mnist_style(gray):
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    strokes = ink(gray)
    if strokes.max() < MIN_CONTRAST:
        raise NoInkError(f"{name}: no ink found (a blank or nearly uniform image); draw a dark digit on a light page")
    strokes = the_digit(strokes, name)
    strokes = strokes / strokes.max()
    strokes[strokes < INK_THRESHOLD / 2] = 0  # paper texture and JPEG noise
    marked = strokes >= INK_THRESHOLD
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    digit = strokes[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    scale = BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))  # (width, height)
    resized = np.asarray(Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0, 1)

    frame = np.zeros((SIDE, SIDE))
    total = resized.sum()
    cy, cx = (np.indices(resized.shape) * resized).reshape(2, -1).sum(axis=1) / total
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - resized.shape[0]))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - resized.shape[1]))
    frame[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return np.rint(frame * 255).astype(np.uint8)


def the_digit(strokes: np.ndarray, name: str = "image") -> np.ndarray:
    """Ink (float32 (height, width), from `ink`) -> the same, 0 everywhere but on the digit's marks.

    A mark is an 8-connected group of cells (MARK_GRID across the longer side) holding ink of
    at least INK_THRESHOLD of the strongest; strokes broken by less than a cell stay one mark.
    A mark's size is its number of cells, however thin or faint its strokes. Marks that touch
    the image's edge are left out when one that does not covers MIN_MARK of the image (a desk
    around the sheet, a bit of the next digit cut by the edge); of the rest, the digit is every
    mark of at least SPECK_SHARE of the largest one's size.

    Raises ImageError (naming `name`) when those marks cover more than MAX_COVER of the image
    (no page around a digit: a texture, a photo of something else), or when besides the largest
    there are two marks of at least OTHER_SHARE of its size, or one wholly to its left or right
    (several digits or words; a 5's detached bar lies above its body, not beside it).
    """
    height, width = strokes.shape
    cell = -(-max(height, width) // MARK_GRID)
    starts = np.arange(0, height, cell), np.arange(0, width, cell)
    peak = np.maximum.reduceat(np.maximum.reduceat(strokes, starts[0], axis=0), starts[1], axis=1)
    labels, _ = ndimage.label(peak >= INK_THRESHOLD * strokes.max(), structure=np.ones((3, 3)))  # 8-connected
    size = np.bincount(labels.ravel(), minlength=labels.size + 1)  # cells per mark
    size[0] = 0  # not a mark
    inner = size >= MIN_MARK * labels.size
    inner[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    pool = inner if inner.any() else size > 0
    keep = pool & (size >= SPECK_SHARE * size[pool].max())
    kept = keep[labels]
    if kept.mean() > MAX_COVER:
        raise ImageError(
            f"{name}: ink covers {kept.mean():.0%} of the image and no digit on a page stands out; "
            "give one digit with a margin of plain page around it"
        )
    largest = np.argmax(size * keep)
    others = [mark for mark in np.flatnonzero(keep) if mark != largest and size[mark] >= OTHER_SHARE * size[largest]]
    columns = {mark: np.flatnonzero((labels == mark).any(axis=0))[[0, -1]] for mark in [largest, *others]}
    beside = [m for m in others if columns[m][1] < columns[largest][0] or columns[m][0] > columns[largest][1]]
    if len(others) > 1 or beside:
        raise ImageError(
            f"{name}: {len(others) + 1} separate marks (more than one digit?); crop the image to one digit"
        )
    return strokes * np.repeat(np.repeat(kept, cell, axis=0), cell, axis=1)[:height, :width]


def thumbnail(gray: np.ndarray, size: int = 256) -> np.ndarray:
    """`gray` (float32 (height, width), 0-255) shrunk to fit `size` x `size`, as uint8: what a picture needs."""
    img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    img.thumbnail((size, size))
    return np.asarray(img)


def load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(the image as read: float32 grey levels (height, width); the uint8 (28, 28) MNIST-style picture).

    Raises ImageError; for a blank first frame of an animation, the message says only it is read.
    """
    gray = read_gray(path)
    try:
        return gray, to_mnist(gray, str(path))
    except NoInkError:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
        if frames == 1:
            raise
        raise NoInkError(
            f"{path}: has {frames} frames; only the first is read, and it is blank (save the digit's frame on its own)"
        ) from None


def _upright(img: Image.Image) -> None:
    """Turn or mirror `img` in place as its EXIF orientation says (a phone's sideways pixels shown
    upright). EXIF that Pillow cannot parse is ignored, as viewers ignore it."""
    with contextlib.suppress(OSError, SyntaxError, ValueError):
        ImageOps.exif_transpose(img, in_place=True)


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
