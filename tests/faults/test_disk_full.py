"""Disk full on a real small filesystem: a tmpfs with ``size=`` mounted as the node's data_dir (SQLite
database included, as on a site with one data disk).

1. At the floor: ``min_free_disk_mb`` above what is left makes the node refuse with 0xA700 before writing.
2. Really out of space below a tiny floor: the file or the database write fails with ENOSPC / SQLITE_FULL;
   the answer must still be 0xA700 (the sender keeps the image), nothing half-written stays behind.
Then space returns (``mount -o remount,size=``) and the senders' remaining images are all stored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.faults.conftest import FULL_ONLY, ROUNDS, FaultRow, Streamer, assert_stored, recovery_s
from tests.mr_files import mr_series

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], check=False).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)


def nothing_half_written(node) -> None:  # type: ignore[no-untyped-def]
    """No temp file in incoming/, every file under studies/ is whole: it has a row whose size and digest match."""
    assert list((node.data_dir / "incoming").glob("*.tmp")) == []
    rows = {r[0]: (r[1], r[2]) for r in node.query("SELECT path, size_bytes, sha256 FROM instances WHERE stored")}
    for path in (node.data_dir / "studies").rglob("*.dcm"):
        assert str(path) in rows, f"{path.name}: a file without a row"
        size, _ = rows[str(path)]
        assert path.stat().st_size == size, f"{path.name}: {path.stat().st_size} bytes on disk, {size} recorded"
    with closing(sqlite3.connect(node.data_dir / "uad-node.sqlite")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert hashlib  # digest of the data set is checked by the store itself on re-send


def _fill(node, images: int, size: int) -> Streamer:  # type: ignore[no-untyped-def]
    series = mr_series(images, size=size)
    for ds in series:
        ds.SeriesDescription = "localizer"
    return Streamer(node.port, series, ae_title="SCANNER2")


@pytest.mark.parametrize(
    ("floor_mb", "image_px", "images", "label"),
    [
        pytest.param(5, 128, 150, "disk full: at the min_free_disk_mb floor (tmpfs, floor 5 MB)", marks=FULL_ONLY),
        (1, 1024, 12, "disk full: tmpfs really full below a 1 MB floor (2 MB images, ENOSPC)"),
    ],
)
def test_disk_full_refuses_with_a700_and_recovers(  # type: ignore[no-untyped-def]
    fault_node, tmp_path: Path, fault_table, floor_mb: int, image_px: int, images: int, label: str
) -> None:
    acked: set[str] = set()
    recoveries: list[float] = []
    refusals = 0
    with tmpfs(tmp_path / "data", 12) as data:
        node = fault_node(min_free_disk_mb=floor_mb)
        assert node.data_dir == data
        node.start()
        try:
            for _ in range(ROUNDS):
                used_mb = (shutil.disk_usage(data).used >> 20) + 1
                grow(data, used_mb + floor_mb + 4)  # about 4 MB above the floor left
                stream = _fill(node, images, image_px).start()
                deadline = time.monotonic() + 120
                while stream.statuses[0xA700] < 3 and not stream.done() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert stream.statuses[0xA700] >= 3, f"never refused: {stream.statuses}"
                # Refusing: every answer so far is Success or 0xA700, never an abort or another failure.
                assert set(stream.statuses) <= {0x0000, 0xA700}, stream.statuses
                assert node.alive()
                disk = node.status()["disk"]
                if floor_mb > 1:
                    assert disk["refusing_images"] is True, disk
                nothing_half_written(node)
                if image_px >= 1024:  # an image bigger than the floor: the write itself ran out of space
                    assert "No space left on device" in node.log(), "the filesystem never really ran full"
                refusals += stream.statuses[0xA700]
                grow(data, used_mb + 64)  # space returns
                grown_at = time.monotonic()
                recoveries.append(recovery_s(node, grown_at))
                stream.join(timeout_s=180)
                assert stream.done(), stream.statuses
                acked |= stream.acked
                nothing_half_written(node)
                assert_stored(node, acked)
            lost = assert_stored(node, acked)
        finally:
            node.stop()
    fault_table(FaultRow(label, ROUNDS, len(acked), lost, 0, max(recoveries), f"{refusals} refusals answered 0xA700"))
