"""The README's "Adapting the model to your site" on tiny data, as a model owner runs it: fine-tune a shipped-style
checkpoint on healthy scans (``train --init``), calibrate the fine-tuned model on them (``calibrate``), then serve
it: a series sent by dcmtk ``storescu`` to ``uad-node serve`` is analysed with the site's model, and the result
names the calibration. Every command is the real one, in its own process; the data and the model are tiny.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from node.jobs.states import JobState
from tests.eval_datasets import write_healthy
from tests.integration.test_real_input import storescu, wait_until_finished
from tests.peers import NodeProcess, free_port, node_config
from tests.tiny_model import write_fast_checkpoint

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]


def uad_node(*args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"uad-node {args[0]}: {run.stderr[-3000:]}"
    return run


def test_fine_tune_calibrate_and_serve_the_site_model(tmp_path: Path) -> None:
    shipped = write_fast_checkpoint(tmp_path / "shipped.pt")
    healthy = write_healthy(tmp_path / "healthy", 2, skull=False)
    site, calibrated = tmp_path / "site.pt", tmp_path / "site-calibrated.pt"

    uad_node(
        "train", "--data", str(healthy), "--init", str(shipped), "--out", str(site), "--steps", "2",
        "--threads", "1", "--cache", str(tmp_path / "cache"),
    )  # fmt: skip
    tuned = load_checkpoint(site)
    assert tuned.threshold is None and tuned.training["init"]["content_hash"] == load_checkpoint(shipped).content_hash

    printed = uad_node(
        "calibrate", "--checkpoint", str(site), "--healthy", str(healthy), "--max-fp-ml", "8",
        "--out", str(calibrated), "--threads", "1",
    ).stdout  # fmt: skip
    model = load_checkpoint(calibrated)
    assert model.threshold is not None and model.calibration is not None
    assert model.calibration_label in printed and model.calibration_label.startswith("site: FP <= 8 mL")

    port = free_port()
    config = node_config(
        tmp_path,
        port,
        extra=f"""
[selection]
models = {{ T1 = "{calibrated}" }}

[completion]
series_quiet_s = 1

[jobs]
threads = 1
poll_interval_s = 0.2
""",
    )
    node = NodeProcess(config, tmp_path / "data", port, "UADNODE").start()
    try:
        series = write_healthy(tmp_path / "sent", 1, skull=True, seed=7, dicom=True)
        storescu("+sd", "+r", "127.0.0.1", str(port), str(series))
        [job] = wait_until_finished(tmp_path / "data", node, 1)
        status = node.status()
    finally:
        node.stop()
    assert job.state is JobState.DONE, job.reason  # no destinations: the results stay on disk
    assert job.report["analysed"] is True and job.report["model"].endswith(model.content_hash[:12])
    assert job.report["calibration"] == model.calibration_label
    [entry] = status["jobs"]
    assert entry["calibration"] == model.calibration_label
