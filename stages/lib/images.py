"""A person's digit image -> the 28x28 uint8 picture MNIST would have made of it. Pillow + numpy.

MNIST's recipe (LeCun et al.): light ink on a dark background, the digit's bounding box scaled
so its longer side is 20 pixels (aspect ratio kept, anti-aliased), then placed in a 28x28 frame
so that its centre of mass sits at the centre. `to_mnist` applies it to any PNG/JPEG/... a
person makes: any size, colour or transparency, dark ink on paper or light ink on a screen.
An image that already is MNIST-style (28x28, dark background) is used as it is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.lib.errors import StageError

MAX_PIXELS = 25_000_000  # 5000 x 5000: larger images are refused before they are decoded
SIDE, BOX = 28, 20  # the MNIST frame, and the longer side of the digit inside it
INK_THRESHOLD = 0.2  # share of the strongest ink that counts as ink (bounding box, blank check)
MIN_CONTRAST = 40  # grey levels between background and the strongest ink; less is a blank image


class ImageError(StageError):
    """An input image cannot be read or holds no digit."""


def read_gray(path: str | Path) -> np.ndarray:
    """The image at `path` as float grey levels 0-255 (transparency composited onto white)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {width}x{height} pixels is too large; at most {MAX_PIXELS:,} pixels "
                        "(scale it down first, a digit needs only a few hundred)"
                    )
                img.load()
                picture = img
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")  # ink drawn on a transparent canvas: put it on white paper
                    picture = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
                gray = picture.convert("L")
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
    return np.asarray(gray, dtype=np.float64)


def is_mnist_style(gray: np.ndarray) -> bool:
    """Already an MNIST picture: 28x28 with a dark background."""
    return gray.shape == (SIDE, SIDE) and float(np.median(_border(gray))) < 128


def to_mnist(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Grey levels of any size -> uint8 (28, 28), light ink on black, framed the way MNIST was."""
    if is_mnist_style(gray):
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    background = float(np.median(_border(gray)))
    ink = gray - background if background < 128 else background - gray  # light ink on dark, either way
    ink = np.clip(ink, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise ImageError(f"{name}: no ink found (a blank or nearly uniform image); draw a dark digit on a light page")
    ink = ink / ink.max()
    ink[ink < INK_THRESHOLD / 2] = 0  # paper texture and JPEG noise
    rows, cols = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=1)), np.flatnonzero((ink >= INK_THRESHOLD).any(axis=0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

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


def load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(the image as read, in grey levels; the 28x28 uint8 MNIST-style picture made of it)."""
    gray = read_gray(path)
    return gray, to_mnist(gray, str(path))


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
