"""Analyses run in worker processes that ``uad-node serve`` supervises: killing one with SIGKILL mid-analysis
leaves the receiver answering, a new worker takes the job again (the attempt counted), and the results reach
a real Orthanc exactly once; a series whose analysis kills every worker ends not screened with the reason.

Real parts only: ``serve`` as a subprocess, dcmtk ``storescu``/``echoscu`` on loopback, Orthanc as the PACS,
the tiny model of ``tests.tiny_model`` (every stage runs for real).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.db import open_database
from node.jobs.registry import WorkerInfo, all_workers
from node.jobs.states import JobState
from node.jobs.store import JobRecord
from node.sender import DeliveryState
from tests.integration.test_node_jobs import (
    all_results,
    config_for,
    deliveries,
    finished,
    jobs_of,
    results_in_orthanc,
    send,
    sent,
    wait_for,
    write_study,
)
from tests.peers import NodeProcess, Orthanc, echo_node, free_port, running_orthanc
from tests.tiny_model import write_fast_checkpoint

pytestmark = [pytest.mark.peers, pytest.mark.timeout(600)]

WAIT_S = 240.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fast_checkpoint(tmp_path_factory.mktemp("model") / "fast.pt")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    folder = tmp_path_factory.mktemp("study")
    return (folder, *write_study(folder))


@pytest.fixture(scope="module")
def late_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    """Another study; its 3-slice localizer is what a scanner sends while a worker dies (skipped, not analysed)."""
    folder = tmp_path_factory.mktemp("late-study")
    return (folder, *write_study(folder, slices=36))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc", {"node": "UADNODE", "scanner": "SCANNER1"}) as pacs:
        yield pacs


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[[Path, int], NodeProcess]]:
    started: list[NodeProcess] = []

    def start(config: Path, port: int) -> NodeProcess:
        node = NodeProcess(config, tmp_path / "data", port, "UADNODE").start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(timeout_s=90)


def workers_of(data_dir: Path) -> list[WorkerInfo]:
    db = open_database(f"sqlite:///{data_dir / 'uad-node.sqlite'}", migrate=False)
    try:
        return all_workers(db)
    finally:
        db.close()


def wait_for_worker(node: NodeProcess, holding: Callable[[WorkerInfo, list[JobRecord]], bool], what: str) -> WorkerInfo:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert node.process is not None and node.process.poll() is None, node.log()[-3000:]
        if (node.data_dir / "uad-node.sqlite").exists():
            jobs = jobs_of(node.data_dir)
            for worker in workers_of(node.data_dir):
                if worker.live() and holding(worker, jobs):
                    return worker
        time.sleep(0.1)
    raise AssertionError(f"{what}: not after {WAIT_S} s; workers {workers_of(node.data_dir)}\n{node.log()[-3000:]}")


def analysing_series(series_uid: str) -> Callable[[WorkerInfo, list[JobRecord]], bool]:
    """A worker holding the job of ``series_uid`` while it is being analysed (not yet writing results)."""

    def holding(worker: WorkerInfo, jobs: list[JobRecord]) -> bool:
        return any(
            job.id == worker.current_job and job.series_uid == series_uid and job.state.analysing for job in jobs
        )

    return holding


def test_a_worker_killed_mid_analysis_is_replaced_and_the_job_completes_once(
    tmp_path: Path,
    study: tuple[Path, str, str, str],
    late_study: tuple[Path, str, str, str],
    checkpoint: Path,
    orthanc: Orthanc,
    node_process: Callable[[Path, int], NodeProcess],
) -> None:
    folder, study_uid, t1_uid, _ = study
    port = free_port()
    node = node_process(config_for(tmp_path, port, checkpoint, orthanc.dicom_port), port)
    sent(send(folder, port))
    victim = wait_for_worker(node, analysing_series(t1_uid), "a worker analysing the T1")
    assert victim.pid != node.process.pid  # type: ignore[union-attr]
    os.kill(victim.pid, signal.SIGKILL)

    # The receiver does not notice: C-ECHO and a C-STORE (a localizer of another study) right after the kill.
    started = time.monotonic()
    echo_node(port)
    sent(send(late_study[0] / "localizer", port))
    assert time.monotonic() - started < 15

    replacement = wait_for_worker(
        node, lambda w, _: w.name != victim.name and w.state == "ready", "a new worker after the kill"
    )
    assert replacement.pid != victim.pid
    jobs = wait_for(node.data_dir, node, finished(3), "the T1 done after the worker was replaced")
    [t1] = [job for job in jobs if job.series_uid == t1_uid]
    assert (t1.state, t1.attempts, t1.version) == (JobState.DONE, 2, 1), t1
    assert len([job for job in jobs if job.series_uid == t1_uid]) == 1
    rows = deliveries(node.data_dir, t1_uid)
    assert rows and {(r.state, r.attempts) for r in rows} == {(DeliveryState.DELIVERED, 1)}  # each object once
    in_pacs = results_in_orthanc(orthanc, study_uid)
    assert len(in_pacs["SEG"]) == 1 and all_results(in_pacs) == sorted(r.sop_instance_uid for r in rows)

    [dead] = [w for w in workers_of(node.data_dir) if w.name == victim.name]
    assert (dead.state, dead.detail) == ("exited", "killed by SIGKILL")
    status = node.status()
    names = {w["name"]: w for w in status["workers"]}
    assert names[victim.name]["state"] == "exited" and names[replacement.name]["state"] == "ready"
    assert {"name", "host", "pid", "state", "current_job", "heartbeat_at", "models"} <= set(names[replacement.name])
    assert names[replacement.name]["models"] == {"T1": "loaded"}
    assert "killed by SIGKILL during job" in node.log()
    assert node.stop(timeout_s=90) == 0


def test_a_series_that_kills_every_worker_ends_not_screened_and_the_node_keeps_receiving(
    tmp_path: Path,
    study: tuple[Path, str, str, str],
    late_study: tuple[Path, str, str, str],
    checkpoint: Path,
    orthanc: Orthanc,
    node_process: Callable[[Path, int], NodeProcess],
) -> None:
    folder, study_uid, t1_uid, _ = study
    port = free_port()
    config = config_for(tmp_path, port, checkpoint, orthanc.dicom_port, extra="analysis_attempts = 2")
    node = node_process(config, port)
    sent(send(folder, port))
    killed: list[str] = []
    for attempt in (1, 2):  # every worker that takes the series dies during it
        victim = wait_for_worker(
            node,
            lambda w, jobs: w.name not in killed and analysing_series(t1_uid)(w, jobs),
            f"a worker analysing the T1 (attempt {attempt})",
        )
        os.kill(victim.pid, signal.SIGKILL)
        killed.append(victim.name)

    jobs = wait_for(node.data_dir, node, finished(2), "the T1 given up after two dead workers")
    [t1] = [job for job in jobs if job.series_uid == t1_uid]
    assert t1.state is JobState.FAILED and t1.attempts == 3, t1
    assert "not screened" in t1.reason and "died (SIGKILL)" in t1.reason, t1.reason
    assert t1.report["analysed"] is False
    assert "NOT SCREENED notice delivered" in t1.reason  # the notice reached PACS
    in_pacs = results_in_orthanc(orthanc, study_uid)
    assert sum(len(uids) for uids in in_pacs.values()) == 1

    # A worker is running again, and the node still takes images.
    wait_for_worker(node, lambda w, _: w.name not in killed and w.state == "ready", "a worker after the deaths")
    echo_node(port)
    sent(send(late_study[0] / "localizer", port))
    assert {w.state for w in workers_of(node.data_dir) if w.name in killed} == {"exited"}
    assert node.stop(timeout_s=90) == 0
