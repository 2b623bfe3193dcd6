"""Download and dataset I/O against a real HTTP server on 127.0.0.1, and the download stage."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import datasets, fetch
from pipeline.errors import DataError
from pipeline.params import DataParams
from stages.download import download
from tests.harness import BIN, FileServer, run, write_params


def keras_npz(n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A small Keras-layout dataset with every class present."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries 0.01 s apart, not urllib3's 0, 1, 2 s: the same attempts, 3 s less per failing download."""
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.01)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


def test_mnist_from_an_http_mirror_round_trips(server: FileServer) -> None:
    arrays = keras_npz()
    server.files["/mnist.npz"] = body = npz_bytes(arrays)
    got = download(DataParams(source="mnist", url=f"{server.url}/mnist.npz", sha256=sha(body)))
    for key in datasets.KEYS:
        np.testing.assert_array_equal(got[key], arrays[key])


def test_a_mirror_without_its_own_checksum_is_held_to_the_official_one(server: FileServer) -> None:
    server.files["/mnist.npz"] = npz_bytes(keras_npz())
    with pytest.raises(DataError, match="checksum mismatch .* expected sha256 731c5ac6"):
        download(DataParams(source="mnist", url=f"{server.url}/mnist.npz"))


def test_a_corrupted_byte_fails_the_checksum(server: FileServer) -> None:
    body = npz_bytes(keras_npz())
    server.files["/mnist.npz"] = body[:-1] + bytes([body[-1] ^ 1])
    with pytest.raises(DataError, match="checksum mismatch"):
        download(DataParams(source="mnist", url=f"{server.url}/mnist.npz", sha256=sha(body)))


def test_http_errors_and_unreachable_hosts_are_one_clear_error(server: FileServer) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        download(DataParams(source="mnist", url=f"{server.url}/missing.npz"))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="Offline\\? Use data.source: mnist_sample"):
        download(DataParams(source="mnist", url=f"http://127.0.0.1:{port}/mnist.npz"))


def test_a_download_cut_short_is_reported_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    body = npz_bytes(keras_npz())
    server.files["/mnist.npz"] = body
    server.truncate.add("/mnist.npz")
    dest = tmp_path / "mnist.npz"
    with pytest.raises(DataError, match="stopped before its end: the connection broke off"):
        fetch.fetch(f"{server.url}/mnist.npz", dest, sha(body))
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_matches_its_checksum_but_is_not_a_dataset_is_rejected(server: FileServer) -> None:
    wrong = {k: v for k, v in keras_npz().items() if k != "y_test"}
    server.files["/a.npz"] = a = npz_bytes(wrong)
    with pytest.raises(DataError, match="missing arrays \\['y_test'\\]"):
        download(DataParams(source="mnist", url=f"{server.url}/a.npz", sha256=sha(a)))
    server.files["/b.npz"] = b = b"this is not a zip file"
    with pytest.raises(DataError, match="not a readable npz"):
        download(DataParams(source="mnist", url=f"{server.url}/b.npz", sha256=sha(b)))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.update(x_train=d["x_train"].astype(np.float32)), "expected uint8 images"),
        (lambda d: d.update(x_test=d["x_test"][:, :, :27]), "shape (n, 28, 28)"),
        (lambda d: d.update(y_test=d["y_test"][:-1]), "expected 20 labels for 20 images"),
        (lambda d: d.update(y_train=d["y_train"] + 1), "labels must be integers 0-9"),
        (lambda d: d.update(y_train=d["y_train"] % 9), "classes [9] have no training examples"),
    ],
)
def test_validation_catches_mismatching_data(change, fragment: str) -> None:
    data = keras_npz()
    change(data)
    with pytest.raises(DataError) as info:
        datasets.validate(data)
    assert fragment in str(info.value)


def test_official_sources_must_have_their_official_sizes() -> None:
    with pytest.raises(DataError, match="expected 60000 train and 10000 test examples, got 60 and 20"):
        datasets.validate(keras_npz(), (60_000, 10_000))


def test_fashion_mnist_idx_files_from_a_folder_url(server: FileServer) -> None:
    arrays = keras_npz(seed=3)
    names = {
        "train-images-idx3-ubyte.gz": arrays["x_train"],
        "train-labels-idx1-ubyte.gz": arrays["y_train"],
        "t10k-images-idx3-ubyte.gz": arrays["x_test"],
        "t10k-labels-idx1-ubyte.gz": arrays["y_test"],
    }
    sums = {}
    for name, array in names.items():
        server.files[f"/mirror/{name}"] = body = idx_gz(array)
        sums[name] = sha(body)
    got = download(DataParams(source="fashion_mnist", url=f"{server.url}/mirror", sha256=sums))
    for key in datasets.KEYS:
        np.testing.assert_array_equal(got[key], arrays[key])
    # one file served truncated inside a valid gzip: the header no longer matches the body
    broken = gzip.compress(gzip.decompress(server.files["/mirror/t10k-images-idx3-ubyte.gz"])[:-28])
    server.files["/mirror/t10k-images-idx3-ubyte.gz"] = broken
    sums["t10k-images-idx3-ubyte.gz"] = sha(broken)
    with pytest.raises(DataError, match="truncated"):
        download(DataParams(source="fashion_mnist", url=f"{server.url}/mirror/", sha256=sums))


def test_file_urls_work_for_air_gapped_copies(tmp_path: Path) -> None:
    body = npz_bytes(keras_npz())
    (tmp_path / "mnist.npz").write_bytes(body)
    got = download(DataParams(source="mnist", url=(tmp_path / "mnist.npz").as_uri(), sha256=sha(body)))
    assert got["x_train"].shape == (60, 28, 28)


def test_bundled_sample_is_split_stratified_and_reproducibly(sample: dict[str, np.ndarray]) -> None:
    assert sample["x_train"].shape == (4000, 28, 28) and sample["x_test"].shape == (1000, 28, 28)
    assert np.bincount(sample["y_train"]).tolist() == [400] * 10
    assert np.bincount(sample["y_test"]).tolist() == [100] * 10
    again = download(DataParams())
    other = download(DataParams(split_seed=7, test_fraction=0.1))
    np.testing.assert_array_equal(again["x_test"], sample["x_test"])
    assert len(other["y_test"]) == 500 and not np.array_equal(other["y_train"][:500], sample["y_train"][:500])
    # the split is a partition: no image is both a train and a test image
    train = {row.tobytes() for row in sample["x_train"]}
    assert not any(row.tobytes() in train for row in sample["x_test"])


def test_download_stage_keeps_the_previous_output_when_a_later_download_fails(
    project: Path, server: FileServer
) -> None:
    python = str(BIN / "python")
    run([python, "-m", "stages.download"], project)
    out = project / "data/raw/dataset.npz"
    before = out.read_bytes()
    server.files["/mnist.npz"] = npz_bytes(keras_npz())
    write_params(project, {"data": {"source": "mnist", "url": f"{server.url}/mnist.npz", "sha256": "0" * 64}})
    proc = run([python, "-m", "stages.download"], project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checksum mismatch")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset.npz"]  # no temporary left behind


# --- bounded: no download waits or grows without end --------------------------------------------


def test_a_server_that_drips_stops_at_the_deadline(server: FileServer, tmp_path: Path) -> None:
    """Headers, then a byte every 0.3 s: each read succeeds, so only the overall deadline ends it."""
    server.files["/mnist.npz"] = b"x" * 1000
    server.drip = 0.3
    start = time.monotonic()
    with pytest.raises(DataError, match=r"did not finish in time \(data.timeout_s\)"):
        fetch.fetch(f"{server.url}/mnist.npz", tmp_path / "mnist.npz", "0" * 64, deadline_s=1.0)
    assert time.monotonic() - start < 10 and list(tmp_path.iterdir()) == []


def test_a_retry_after_of_an_hour_is_not_waited_for(tmp_path: Path) -> None:
    """A 503 that asks to come back in an hour: retried on the usual backoff, so the download still ends."""

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Retry-After", "3600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy) as httpd:
        threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        start = time.monotonic()
        with pytest.raises(DataError, match=r"HTTP 503 .*\(tried 4 times\)"):
            fetch.fetch(f"http://127.0.0.1:{httpd.server_address[1]}/mnist.npz", tmp_path / "mnist.npz", "0" * 64)
        httpd.shutdown()
    assert time.monotonic() - start < 10


def test_a_fifo_or_device_as_data_url_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "mnist.npz"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    for special in (fifo, Path("/dev/zero")):
        with pytest.raises(DataError, match="is not a regular file"):
            fetch.fetch(special.as_uri(), tmp_path / "out.npz", "0" * 64)
    assert not (tmp_path / "out.npz").exists()


def test_a_file_larger_than_any_mnist_is_refused(server: FileServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "MAX_DOWNLOAD_BYTES", 1000)
    server.files["/mnist.npz"] = b"x" * 5000
    with pytest.raises(DataError, match="more than any MNIST-sized file"):
        fetch.fetch(f"{server.url}/mnist.npz", tmp_path / "mnist.npz", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_gzip_or_npz_that_inflates_past_any_mnist_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A few KB that inflate to far more (a gzip bomb) stop at the bound, before memory fills."""
    monkeypatch.setattr(datasets, "MAX_INFLATED_BYTES", 10_000)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes(1_000_000)))
    assert bomb.stat().st_size < 5_000
    with pytest.raises(DataError, match="inflates to more than 10000 bytes"):
        datasets.read_idx(bomb)
    (tmp_path / "mnist.npz").write_bytes(npz_bytes(keras_npz()))  # 60 + 20 images: about 63 KB inflated
    with pytest.raises(DataError, match="inflates to .* more than any MNIST dataset"):
        datasets.read_keras_npz({"mnist.npz": tmp_path / "mnist.npz"}, DataParams())
