"""Checksummed, bounded downloads: `fetch(url, dest, sha256)` for `http(s)://` and `file://` URLs.

Streams to a temporary file beside `dest` (with a progress bar at a terminal), retries what is
worth retrying, ends within a deadline, refuses more bytes than any MNIST-sized file, and puts
the file in place only once its sha256 matches. Not a DVC dep of any stage: the bytes it yields
are fixed by the sha256 that `download` asks for (`pipeline.datasets.locations`).
"""

from __future__ import annotations

import functools
import hashlib
import stat
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import urllib3
from tqdm import tqdm

from pipeline import atomic
from pipeline.errors import DataError

RETRIES = 3  # attempts after the first, on a 5xx, a 429, a timeout or a dropped connection
BACKOFF_S = 0.5  # urllib3's backoff factor: waits 0, 1, 2 s between attempts
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 30.0  # per connection attempt, per socket read
CHUNK = 1 << 20
MAX_DOWNLOAD_BYTES = 128 * 2**20  # a bound no MNIST-sized file comes near (mnist.npz: 11 MB)
OFFLINE_HINT = (
    "Offline? Use data.source: mnist_sample (bundled), or set data.url to a local mirror "
    "(file:///path/to/file) or an http(s) mirror"
)


class _Retry(urllib3.Retry):
    """urllib3's retry policy (status 429/5xx, connection errors, exponential backoff), saying each retry."""

    def sleep(self, response: urllib3.BaseHTTPResponse | None = None) -> None:
        last = self.history[-1] if self.history else None
        why = f"HTTP {last.status}" if last and last.status else type(last.error).__name__ if last else "an error"
        wait = self.get_backoff_time()
        when = f"in {wait:g}s" if wait else "now"
        print(f"download failed ({why}); retrying {when} ({len(self.history)}/{RETRIES})", file=sys.stderr)
        super().sleep(response)


def fetch(url: str, dest: Path, sha256: str, *, deadline_s: float = 600) -> None:
    """Stream `url` (http, https or file) to `dest` with a progress bar and verify its sha256.

    Retries (urllib3's `Retry`): a 5xx or 429, a connection that fails or drops mid-body, RETRIES
    times with backoff. Bounded: the whole download, retries included, ends within `deadline_s`
    seconds (`data.timeout_s`), and a file over MAX_DOWNLOAD_BYTES is refused. Raises DataError
    in one line; nothing is left at `dest` on failure.
    """
    deadline = time.monotonic() + deadline_s
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            kind = path.stat().st_mode
        except OSError as exc:
            raise DataError(f"cannot read {url} ({exc.strerror})") from None
        if not stat.S_ISREG(kind):  # a FIFO or a device would block or never end
            raise DataError(f"{url} is not a regular file; point data.url at the dataset file itself")
        with path.open("rb") as source:
            chunks = iter(functools.partial(source.read, CHUNK), b"")
            _save(chunks, path.stat().st_size, url=url, dest=dest, sha256=sha256, deadline=deadline)
        return
    retry = _Retry(total=RETRIES, backoff_factor=BACKOFF_S, status_forcelist=(429, 500, 502, 503, 504))
    retry = retry.new(raise_on_status=False)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DataError(f"download of {url} did not finish in time (data.timeout_s). {OFFLINE_HINT}")
        timeout = urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, left), read=min(READ_TIMEOUT_S, left))
        try:
            response = urllib3.request("GET", url, preload_content=False, retries=retry, timeout=timeout)
        except urllib3.exceptions.MaxRetryError as exc:
            raise DataError(f"cannot fetch {url} ({exc.reason}) (tried {RETRIES + 1} times). {OFFLINE_HINT}") from None
        except (urllib3.exceptions.HTTPError, ValueError) as exc:  # a URL urllib3 cannot use
            raise DataError(f"cannot fetch {url} ({exc}). {OFFLINE_HINT}") from None
        retry = response.retries or retry
        if response.status >= 400:
            tries = f" (tried {RETRIES + 1} times). {OFFLINE_HINT}" if response.status in retry.status_forcelist else ""
            raise DataError(f"download of {url} failed: HTTP {response.status} {response.reason}{tries}")
        total = int(response.headers.get("Content-Length") or 0) or None
        try:
            with response:
                chunks = iter(functools.partial(response.read1, CHUNK), b"")
                _save(chunks, total, url=url, dest=dest, sha256=sha256, deadline=deadline)
            return
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
            try:
                retry = retry.increment("GET", url, error=exc)
            except urllib3.exceptions.MaxRetryError:
                raise DataError(
                    f"download of {url} stopped before its end: the connection broke off (tried {RETRIES + 1} times)"
                ) from None
            retry.sleep()


def _save(chunks: Iterator[bytes], total: int | None, *, url: str, dest: Path, sha256: str, deadline: float) -> None:
    """Write `chunks` to `dest` atomically with a progress bar, within the bounds; then check the sha256."""
    if total is not None and total > MAX_DOWNLOAD_BYTES:
        raise DataError(f"{url} is {total} bytes, more than any MNIST-sized file ({MAX_DOWNLOAD_BYTES} at most)")
    digest, received = hashlib.sha256(), 0
    local = url.startswith("file:")  # no bar for a copy; disable=None: tqdm draws one only at a terminal
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, mininterval=0.5, leave=False,
               disable=True if local else None)  # fmt: skip
    with bar, atomic.target(dest) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            out.write(chunk)  # a local write error (disk full) is an OSError, reported as such
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            if received > MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url} sent over {MAX_DOWNLOAD_BYTES} bytes, more than any MNIST-sized file")
            if time.monotonic() > deadline:
                raise DataError(f"download of {url} did not finish in time (data.timeout_s); the server is too slow")
        if total is not None and received != total:
            raise DataError(f"download of {url} stopped after {received} of {total} bytes")
        if digest.hexdigest() != sha256:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}. "
                "The file is corrupt or not the expected dataset; if it is the right file, set data.sha256"
            )
