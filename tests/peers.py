"""Real peers for tests: external tools (dcmtk, Orthanc, dicom3tools) and the node as a subprocess.

A missing tool skips its tests on a developer machine; with UAD_REQUIRE_PEERS=1
(set by .ci/run) it fails them, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from node.demo import pacs
from node.demo.pacs import Orthanc, free_port, wait_for_port

__all__ = [
    "NodeProcess",
    "Orthanc",
    "free_port",
    "node_config",
    "require_file",
    "require_tool",
    "running_orthanc",
    "validate_with_dciodvfy",
    "wait_for_port",
]

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """Path of an external program, or skip (fail under UAD_REQUIRE_PEERS=1) when it is missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        missing_peer(f"{name} is not installed (apt-get install dcmtk orthanc dicom3tools)")
    return path


def echo_node(port: int, calling_ae: str = "SCANNER1", called_ae: str = "UADNODE") -> None:
    """A C-ECHO with dcmtk ``echoscu`` that must succeed within 10 s."""
    result = subprocess.run(
        [require_tool("echoscu"), "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def require_file(path: Path, install: str = "apt-get install mricron-data insighttoolkit5-examples") -> Path:
    """A data file from a package, or skip (fail under UAD_REQUIRE_PEERS=1) when absent; ``install`` says how."""
    if not path.is_file():
        missing_peer(f"{path} is missing ({install})")
    return path


def missing_peer(message: str) -> NoReturn:
    """Skip the test, or fail it under UAD_REQUIRE_PEERS=1 (CI, where every peer must be there)."""
    if os.environ.get("UAD_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class NodeProcess:
    """``uad-node serve`` running as a subprocess on loopback."""

    config_path: Path
    data_dir: Path
    port: int
    ae_title: str
    process: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        log = open(self.config_path.with_suffix(".log"), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(self.config_path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, self.process)
        return self

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; kill if it does not exit. Returns the exit code."""
        if self.process is None:
            return 0
        process, self.process = self.process, None
        return pacs.stop_process(process, timeout_s)

    def log(self) -> str:
        path = self.config_path.with_suffix(".log")
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> dict:
        """``uad-node status --json`` for this node's data."""
        import json

        out = subprocess.run(
            [sys.executable, "-m", "node", "status", "--config", str(self.config_path), "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)


def node_config(
    folder: Path,
    port: int,
    *,
    min_free_disk_mb: int = 1,
    log_patient_data: bool = False,
    extra_node: str = "",
    extra: str = "",
    senders: str | None = None,
) -> Path:
    """Write a node config for tests: loopback, small disk floor, SCANNER1/SCANNER2 from 127.0.0.1."""
    if senders is None:
        senders = (
            '[ { ae_title = "SCANNER1", host = "127.0.0.1" }, { ae_title = "SCANNER2", host = "127.0.0.0/8" },'
            ' { ae_title = "SCANNER3" }, { ae_title = "SCANNER4", host = "localhost" } ]'
        )
    path = folder / "node.toml"
    path.write_text(
        f"""
[node]
ae_title = "UADNODE"
host = "127.0.0.1"
port = {port}
data_dir = "data"
allowed_senders = {senders}
min_free_disk_mb = {min_free_disk_mb}
network_timeout_s = 20
{extra_node}

[logging]
level = "DEBUG"
log_patient_data = {str(log_patient_data).lower()}
{extra}
"""
    )
    return path


def validate_with_dciodvfy(path: Path) -> list[str]:
    """Validate a DICOM file against its IOD with dicom3tools' dciodvfy: fail on any "Error" line,
    return (and print) the warnings."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {path.name}: {len(warnings)} warning(s)", *warnings, sep="\n  ")
    assert not errors, "\n".join(errors)
    return warnings


def running_orthanc(
    folder: Path,
    modalities: dict[str, str],
    ae_title: str = "ORTHANC",
    dicom_port: int | None = None,
    settings: dict[str, object] | None = None,
) -> AbstractContextManager[Orthanc]:
    """A real Orthanc PACS (``node.demo.pacs.running_orthanc``), or skip (fail under UAD_REQUIRE_PEERS=1)
    when Orthanc is not installed."""
    binary = require_tool("Orthanc")
    return pacs.running_orthanc(folder, modalities, ae_title, binary=binary, dicom_port=dicom_port, settings=settings)
