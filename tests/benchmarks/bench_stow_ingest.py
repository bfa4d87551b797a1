"""Ingest benchmark: STOW-RS into ``StowReceiver`` against C-STORE into the node's receiver, same files.

Writes ``--count`` synthetic MR slices (``--size`` squared, 16-bit, fake patient) once, then per run and per
method starts from an empty data folder and SQLite database and stores all of them:

- C-STORE: dcmtk ``storescu``, one association, TCP_NODELAY, into the node's ``Receiver`` (in this process);
- STOW-RS, batch 1 and batch 50: ``StowReceiver.receive`` called directly with prebuilt multipart bodies (the
  HTTP server in front of it is not measured: that belongs to the web interface);

Both paths end in the same ``InstanceStore.store`` (fsync + commit per instance), so the difference is the
framing: DIMSE PDUs over loopback against multipart parsing and the Part 10 split. Prints the median of
``--repeats`` runs (all runs shown). Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_stow_ingest.py [--count 400] [--repeats 3]
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
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from node.config import NodeConfig  # noqa: E402
from node.db import Instance, open_database  # noqa: E402
from node.db.database import Database  # noqa: E402
from node.demo.pacs import free_port  # noqa: E402
from node.dicomweb.multipart import related_body  # noqa: E402
from node.dicomweb.stow_rs import StowReceiver  # noqa: E402
from node.receiver import Receiver  # noqa: E402
from tests.mr_files import mr_series, write_series  # noqa: E402

CALLING_AE = "BENCH"


def node_config(folder: Path, port: int) -> NodeConfig:
    return NodeConfig.model_validate(
        {
            "node": {
                "ae_title": "UADNODE",
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(folder / "data"),
                "allowed_senders": [{"ae_title": CALLING_AE, "host": "127.0.0.1"}],
                "min_free_disk_mb": 1,
            },
            "logging": {"level": "WARNING"},
        }
    )


def stored(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance).where(Instance.stored)) or 0)


def c_store(files_dir: Path, count: int, folder: Path) -> float:
    """Seconds for storescu to send every file over one association to a fresh node receiver."""
    config = node_config(folder, free_port())
    config.node.data_dir.mkdir(parents=True)
    db = open_database(config.node.effective_database_url())
    receiver = Receiver(config=config, db=db)
    host, port = receiver.start()
    try:
        command = ["storescu", "-aet", CALLING_AE, "-aec", "UADNODE", "--propose-little", "--scan-directories"]
        started = time.perf_counter()
        subprocess.run(
            [*command, host, str(port), str(files_dir)],
            check=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            timeout=600,
        )
        seconds = time.perf_counter() - started
    finally:
        receiver.stop()
    assert stored(db) == count, f"C-STORE stored {stored(db)} of {count}"
    db.close()
    return seconds


def stow(contents: list[bytes], batch: int, folder: Path) -> float:
    """Seconds for StowReceiver.receive to take every file in requests of ``batch`` instances."""
    config = node_config(folder, 1)
    config.node.data_dir.mkdir(parents=True)
    db = open_database(config.node.effective_database_url())
    receiver = Receiver(config=config, db=db)  # not started: only its store, as serve shares it
    stow_receiver = StowReceiver(config, receiver.store, db)
    bodies = [related_body(contents[i : i + batch]) for i in range(0, len(contents), batch)]
    started = time.perf_counter()
    for body, content_type in bodies:
        reply = stow_receiver.receive(body, content_type, CALLING_AE)
        assert reply.status == 200, reply.body[:200]
    seconds = time.perf_counter() - started
    assert stored(db) == len(contents), f"STOW-RS stored {stored(db)} of {len(contents)}"
    db.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", type=int, default=240, help="rows = columns (240: 115 KB per file)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        print("storescu (dcmtk) is not installed: apt-get install dcmtk", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        root = Path(tmp)
        files = write_series(mr_series(args.count, size=args.size), root / "files")
        contents = [p.read_bytes() for p in files]
        megabytes = sum(len(c) for c in contents) / 1e6
        methods: dict[str, Callable[[Path], float]] = {
            "C-STORE (storescu, 1 association)": lambda f: c_store(root / "files", args.count, f),
            "STOW-RS batch 1 (StowReceiver)": lambda f: stow(contents, 1, f),
            "STOW-RS batch 50 (StowReceiver)": lambda f: stow(contents, 50, f),
        }
        runs: dict[str, list[float]] = {name: [] for name in methods}
        for repeat in range(args.repeats):
            for index, (name, method) in enumerate(methods.items()):  # interleaved: drift hits every method
                runs[name].append(method(root / f"run{repeat}-{index}"))
    print(f"{args.count} MR files of {megabytes / args.count * 1000:.0f} KB ({megabytes:.1f} MB), {args.repeats} runs")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'method':<36} {'median s':>9} {'inst/s':>8} {'MB/s':>7}   runs (s)")
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        all_runs = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{name:<36} {median:>9.2f} {args.count / median:>8.0f} {megabytes / median:>7.1f}   {all_runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
