"""Checksummed, bounded downloads: `fetch(url, dest, sha256)` for `http(s)://` and `file://` URLs.

urllib3 retries a 5xx, a 429 or a connection that fails (its `Retry`, saying each retry; a server's
Retry-After is not waited for); a body that breaks off is retried here with the same policy. The
whole download ends within a deadline, a file over MAX_DOWNLOAD_BYTES is refused, and `dest` is
written (atomically) only once its sha256 matches.
"""

from __future__ import annotations

import functools
import hashlib
import stat
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import urllib3
from tqdm import tqdm

from pipeline import atomic
from pipeline.errors import DataError

RETRIES = 3  # attempts after the first, on a 5xx, a 429, a timeout or a dropped connection
BACKOFF_S = 0.5  # urllib3's backoff factor: waits 0, 1, 2 s between attempts
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 30.0  # per connection attempt, per socket read
MAX_DOWNLOAD_BYTES = 128 * 2**20  # a bound no MNIST-sized file comes near (mnist.npz: 11 MB)
OFFLINE_HINT = (
    "Offline? Use data.source: mnist_sample (bundled), or set data.url to a local mirror "
    "(file:///path/to/file) or an http(s) mirror"
)


class _Retry(urllib3.Retry):
    def sleep(self, response: urllib3.BaseHTTPResponse | None = None) -> None:
        last, wait = self.history[-1], self.get_backoff_time()
        why = f"HTTP {last.status}" if last.status else type(last.error).__name__
        print(f"download failed ({why}); retrying {f'in {wait:g}s' if wait else 'now'} ({len(self.history)}/{RETRIES})",
              file=sys.stderr)  # fmt: skip
        super().sleep(response)


def fetch(url: str, dest: Path, sha256: str, *, deadline_s: float = 600) -> None:
    """Stream `url` to `dest` (a progress bar at a terminal) and verify its sha256, all within `deadline_s`
    seconds (`data.timeout_s`). Raises DataError in one line; nothing is left at `dest` on failure."""
    deadline = time.monotonic() + deadline_s
    save = functools.partial(_save, url=url, dest=dest, sha256=sha256, deadline=deadline)
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            info = path.stat()
        except OSError as exc:
            raise DataError(f"cannot read {url} ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise DataError(f"{url} is not a regular file; point data.url at the dataset file itself")
        with path.open("rb") as source:
            return save(source.read, info.st_size)
    retry = _Retry(RETRIES, backoff_factor=BACKOFF_S, status_forcelist=(429, 500, 502, 503, 504),
                   raise_on_status=False, respect_retry_after_header=False)  # fmt: skip
    while (left := deadline - time.monotonic()) > 0:
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
        try:
            with response:  # a body shorter than its Content-Length is a ProtocolError (urllib3)
                return save(response.read1, int(response.headers.get("Content-Length") or 0) or None)
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:  # broke off mid-body
            try:
                retry = retry.increment("GET", url, error=exc)
            except urllib3.exceptions.MaxRetryError:
                raise DataError(f"download of {url} stopped before its end: the connection broke off "
                                f"(tried {RETRIES + 1} times)") from None  # fmt: skip
            retry.sleep()
    raise DataError(f"download of {url} did not finish in time (data.timeout_s). {OFFLINE_HINT}")


def _save(
    read: Callable[[int], bytes], size: int | None, *, url: str, dest: Path, sha256: str, deadline: float
) -> None:
    """Write what `read` gives to `dest` atomically, within the bounds; then check the sha256."""
    if (size or 0) > MAX_DOWNLOAD_BYTES:
        raise DataError(f"{url} is {size} bytes, more than any MNIST-sized file ({MAX_DOWNLOAD_BYTES} at most)")
    digest, received = hashlib.sha256(), 0
    local = url.startswith("file:")  # no bar for a copy; disable=None: tqdm draws one only at a terminal
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, mininterval=0.5, leave=False,
               disable=True if local else None)  # fmt: skip
    with bar, atomic.target(dest) as tmp, open(tmp, "wb") as out:
        while chunk := read(1 << 20):
            out.write(chunk)  # a local write error (disk full) is an OSError, reported as such
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            if received > MAX_DOWNLOAD_BYTES:
                raise DataError(f"{url} sent over {MAX_DOWNLOAD_BYTES} bytes, more than any MNIST-sized file")
            if time.monotonic() > deadline:
                raise DataError(f"download of {url} did not finish in time (data.timeout_s); the server is too slow")
        if digest.hexdigest() != sha256:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}. "
                "The file is corrupt or not the expected dataset; if it is the right file, set data.sha256"
            )
