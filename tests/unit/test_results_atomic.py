"""Results are written into a temporary sibling and renamed into ``results/job-N`` only when complete: a
process killed with SIGKILL mid-write (a real child process, a real kill) leaves the previous folder, or none,
and never a half-written one the exporter could send."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom import examples
from pydicom.uid import generate_uid

from node.analysis import write_notice

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 64

# The child writes a notice, and hangs at the first fsync (all files written, none renamed into place).
CHILD = """
import sys, time
from pathlib import Path
import pydicom
import node.analysis as analysis

source, folder, marker = sys.argv[1:4]
def hang(path):
    Path(marker).touch()
    time.sleep(120)
analysis._fsync = hang
analysis.write_notice((pydicom.dcmread(source), b"new png"), Path(folder))
"""


def a_notice(uid: str | None = None) -> pydicom.Dataset:
    ds = examples.mr.copy()
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def exportable(folder: Path) -> list[str]:
    """What ``Exporter`` would send: every DICOM file under the job's folder."""
    return sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in folder.rglob("*.dcm")) if folder.is_dir() else []


def test_write_replaces_an_older_folder_and_returns_the_final_paths(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "job-7"
    folder.mkdir(parents=True)
    (folder / "stale.dcm").write_bytes(b"from an earlier attempt")
    notice = a_notice()
    written = write_notice((notice, PNG), folder)
    assert written == [folder / "notice.dcm"] and all(p.is_file() for p in written)
    assert sorted(p.name for p in folder.iterdir()) == ["notice.dcm", "notice.png"]
    assert exportable(folder) == [notice.SOPInstanceUID]
    assert [p.name for p in folder.parent.iterdir()] == ["job-7"]  # no temporary sibling left


def test_a_writer_killed_mid_write_leaves_the_previous_results_whole(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "job-7"
    old = a_notice()
    write_notice((old, PNG), folder)
    source = tmp_path / "new.dcm"
    new = a_notice()
    new.save_as(source, enforce_file_format=True)
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(folder), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer never reached its fsync"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)

    # The new notice was fully written, but only in the hidden staging sibling: the job's folder is the old one.
    assert exportable(folder) == [old.SOPInstanceUID]
    assert (folder / "notice.png").read_bytes() == PNG
    [partial] = [p for p in folder.parent.iterdir() if p.name != "job-7"]
    assert partial.name.startswith(".job-7.partial-") and (partial / "notice.dcm").is_file()

    # The next attempt cleans the leftover up and replaces the folder.
    again = a_notice()
    write_notice((again, PNG), folder)
    assert exportable(folder) == [again.SOPInstanceUID]
    assert [p.name for p in folder.parent.iterdir()] == ["job-7"]


def test_a_writer_killed_before_any_older_folder_existed_leaves_none(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "job-8"
    source = tmp_path / "new.dcm"
    a_notice().save_as(source, enforce_file_format=True)
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(folder), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the writer never reached its fsync"
            time.sleep(0.05)
        child.kill()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    assert not folder.exists() and exportable(folder) == []
