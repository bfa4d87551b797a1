"""C-STORE ingest with the HTTP interface off and on: does serving /metrics and the status page slow receiving?

The same synthetic MR files (fake patient "BENCH^PATIENT") go with one dcmtk ``storescu`` association
(TCP_NODELAY on) to a fresh ``uad-node serve`` per run, in three modes, interleaved run by run:

- ``off``: ``[web] enabled = false`` (the node as before);
- ``on``: the HTTP interface on, nobody calling it;
- ``on+scraped``: on, with /metrics fetched every second (a Prometheus) and the status page every 2 s (an admin's
  browser) for the whole send.

Series completion is pushed past the send (a 10 min quiet period) and no model is configured, so only receiving
is measured. Prints instances/s per run and the median per mode.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_web_ingest.py [--instances 400] [--runs 3] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests.benchmarks.bench_receive import SeriesSpec, free_port, write_series  # noqa: E402
from tests.peers import wait_for_port  # noqa: E402

MODES = ("off", "on", "on+scraped")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def config_text(port: int, web_port: int, web: bool) -> str:
    return f"""
[node]
port = {port}
data_dir = "data"
min_free_disk_mb = 1
allowed_senders = [{{ ae_title = "BENCH", host = "127.0.0.1" }}]

[selection]
models = {{}}

[completion]
series_quiet_s = 600
study_quiet_s = 600
max_wait_s = 900

[logging]
level = "WARNING"

[web]
enabled = {str(web).lower()}
port = {web_port}
"""


class Poller:
    """GETs ``paths`` on the node's HTTP interface, each at its own interval, until stopped."""

    def __init__(self, base: str, every: dict[str, float]) -> None:
        self.base, self.every, self.requests = base, every, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, args=(p, s), daemon=True) for p, s in every.items()]

    def _poll(self, path: str, seconds: float) -> None:
        while not self._stop.is_set():
            with urllib.request.urlopen(self.base + path, timeout=10) as answer:
                answer.read()
            self.requests += 1
            self._stop.wait(seconds)

    def __enter__(self) -> Poller:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def one_run(files: Path, count: int, mode: str, workdir: Path) -> tuple[float, int]:
    """Send ``files`` to a fresh node in ``mode``; returns (instances/s, requests the poller made)."""
    port, web_port = free_port(), free_port()
    workdir.mkdir(parents=True)
    config = workdir / "node.toml"
    config.write_text(config_text(port, web_port, mode != "off"))
    log = open(workdir / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)], cwd=REPO, stdout=log, stderr=log
    )
    try:
        wait_for_port(port, node, timeout_s=60)
        every = {"/metrics": 1.0, "/": 2.0} if mode == "on+scraped" else {}
        with Poller(f"http://127.0.0.1:{web_port}", every) as poller:
            started = time.perf_counter()
            sent = subprocess.run(
                ["storescu", "-aet", "BENCH", "-aec", "UADNODE", "+sd", "127.0.0.1", str(port), str(files)],
                env=DCMTK_ENV, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            seconds = time.perf_counter() - started
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
        stored = sum(1 for _ in (workdir / "data" / "studies").rglob("*.dcm"))
        if stored != count:
            raise RuntimeError(f"{mode}: {stored} of {count} instances stored")
        return count / seconds, poller.requests
    finally:
        node.terminate()
        node.wait(timeout=60)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (interleaved)")
    parser.add_argument("--size", type=int, default=256, help="matrix size (256: ~130 KB per instance)")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        print("storescu not found (apt-get install dcmtk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        root = Path(tmp)
        series = write_series(SeriesSpec("bench", args.instances, args.size), root / "files", np.random.default_rng(0))
        per_instance_kb = series.total_bytes / args.instances / 1024
        print(f"{args.instances} instances of {per_instance_kb:.0f} KB, one storescu association per run; "
              f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}")  # fmt: skip
        results: dict[str, list[float]] = {mode: [] for mode in MODES}
        for run in range(args.runs):
            for mode in MODES:
                rate, requests = one_run(series.directory, args.instances, mode, root / f"run-{run}-{mode}")
                results[mode].append(rate)
                extra = f" ({requests} HTTP requests during the send)" if mode == "on+scraped" else ""
                print(f"  run {run + 1} {mode:<11} {rate:7.1f} instances/s{extra}", flush=True)
        print("median instances/s (min-max):")
        for mode, rates in results.items():
            print(f"  {mode:<11} {statistics.median(rates):7.1f}  ({min(rates):.1f}-{max(rates):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
