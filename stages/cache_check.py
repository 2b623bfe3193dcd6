"""Did every output reach DVC's cache? `python -m stages.cache_check` (`make repro` runs it after `dvc repro`).

When the file system holding DVC's cache is full, `dvc repro` prints "failed to transfer" and still
exits 0: dvc.lock then records outputs the cache does not hold, `dvc push` has nothing to send, and
a checkout away and back loses them. DVC's own `dvc data status` lists such outputs
(`not_in_cache`); this command turns that list into one line and exit 2. Not a DVC stage.
"""

from __future__ import annotations

import argparse
import json
import subprocess

from stages.lib import runner
from stages.lib.errors import StageError


def main() -> None:
    argparse.ArgumentParser(prog="python -m stages.cache_check", description=__doc__.splitlines()[0]).parse_args()
    proc = subprocess.run(["dvc", "data", "status", "--json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StageError(f"`dvc data status` failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    missing = json.loads(proc.stdout or "{}").get("not_in_cache", [])
    if missing:
        raise StageError(
            f"{len(missing)} output(s) are not in DVC's cache: {', '.join(missing)} (its disk is full, or a "
            "transfer failed); make room, then `dvc commit -f` puts them there (and `dvc push` sends them)"
        )
    print("every output is in DVC's cache")


if __name__ == "__main__":
    runner.run(main, writes_outputs=False)
