"""``uad-node demo``, the README's main command, exactly as a new user runs it: a real Orthanc (required in
CI), the node on the embedded defaults with the shipped model, the sample study over DICOM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import REPO, require_tool

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_sends_the_sample_study_through_the_node_into_orthanc(tmp_path: Path) -> None:
    require_tool("Orthanc")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "node", "demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    assert "local PACS: Orthanc" in run.stdout
    assert "(localizer): skipped" in run.stdout and "(T1): done (delivered to pacs" in run.stdout
    assert re.search(
        r"\b1 SEG, [1-9]\d* Secondary Capture images \(summary \+ overlays\) and 1 measurement SR", run.stdout
    )
    assert "last image acknowledged -> SEG stored in the PACS" in run.stdout
    assert (out / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads((out / "report.json").read_text())
    assert report["selected"] is True and report["model"].startswith("cDDPM default")
    assert set(report["timings_s"]) == {"volume", "preprocessing", "quality", "inference", "objects"}
    assert report["analysed"] is True and report["quality"]["anomaly_fraction"] < 0.2  # the gate let it through
    # and the shipped model still finds the simulated lesion: the largest region lies on it
    distance = re.search(r"(\d+) mm from the simulated lesion's centre", run.stdout)
    assert distance is not None and int(distance.group(1)) <= 10
    assert "job 1" in (out / "node.log").read_text()
