"""Worker processes and their supervision (node/jobs/supervisor.py, worker_process.py, registry.py) and the
store's side of it: the workers table, putting a dead worker's job back in one guarded UPDATE, and a real
supervisor restarting a real worker process killed with SIGKILL. Real SQLite, real processes, no model (the
workers load none, so they start in a few seconds)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from node.child_process import how_ended
from node.config import NodeConfig
from node.db import Job, Worker
from node.db.database import Database
from node.db.schema import utcnow
from node.jobs import registry
from node.jobs.states import JobState
from node.jobs.store import JobStore
from node.jobs.supervisor import Supervisor
from tests.unit.test_jobs_store import add_job

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def jobs(db: Database) -> JobStore:
    return JobStore(db)


# -- the store ----------------------------------------------------------------------------------------------


def test_claim_records_the_claimant(jobs: JobStore) -> None:
    add_job(jobs)
    claimed = jobs.claim(worker="host:12:1")
    assert claimed is not None
    with jobs.db.session() as session:
        assert session.get_one(Job, claimed.id).worker == "host:12:1"


@pytest.mark.parametrize("state", [JobState.PREPROCESSING, JobState.INFERRING])
def test_a_dead_workers_job_goes_back_to_the_queue_with_its_attempt_counted(jobs: JobStore, state: JobState) -> None:
    held = add_job(jobs, state, attempts=1, worker="h:12:1")
    other = add_job(jobs, state, attempts=1, worker="h:13:2")

    before = jobs.requeue_from_dead_worker("h:12:1", "SIGKILL", max_attempts=3)

    assert before is not None and before.id == held.id
    back = jobs.get(held.id)
    assert (back.state, back.attempts, back.next_attempt_at) == (JobState.QUEUED, 1, None)
    assert back.reason == f"worker h:12:1 died (SIGKILL) during {state}; attempt 1 of 3; analysing again"
    assert jobs.get(other.id) == other  # another worker's job is untouched
    assert jobs.requeue_from_dead_worker("h:12:1", "SIGKILL", max_attempts=3) is None  # nothing held any more


def test_the_last_attempt_says_it_will_not_be_analysed_again(jobs: JobStore) -> None:
    held = add_job(jobs, JobState.INFERRING, attempts=3, worker="h:12:1")
    jobs.requeue_from_dead_worker("h:12:1", "exit code 3", max_attempts=3)
    back = jobs.get(held.id)
    assert back.state is JobState.QUEUED and back.reason.endswith("attempt 3 of 3; not analysing again")


def test_a_worker_killed_while_writing_results_loses_them_but_not_recorded_ones(jobs: JobStore) -> None:
    writing = add_job(jobs, JobState.EXPORTING, attempts=1, worker="h:12:1")  # results not yet recorded
    assert jobs.requeue_from_dead_worker("h:12:1", "SIGKILL", max_attempts=3) is not None
    assert jobs.get(writing.id).state is JobState.QUEUED

    recorded = add_job(jobs, JobState.EXPORTING, attempts=1, worker="h:14:1", results_dir="/data/results/job-2")
    assert jobs.requeue_from_dead_worker("h:14:1", "SIGKILL", max_attempts=3) is None
    assert jobs.get(recorded.id) == recorded  # the exporter sends them; a dead worker changes nothing


def test_recover_requeues_a_job_whose_results_were_being_written(jobs: JobStore) -> None:
    writing = add_job(jobs, JobState.EXPORTING, attempts=1)
    recorded = add_job(jobs, JobState.EXPORTING, attempts=1, results_dir="/data/results/job-2")
    assert [(job.id, state) for job, state in jobs.recover(max_attempts=3)] == [(writing.id, JobState.QUEUED)]
    assert jobs.get(recorded.id) == recorded


# -- the registry -------------------------------------------------------------------------------------------


def test_model_states_come_from_live_workers(db: Database) -> None:
    assert registry.model_states(db, ["T1"]) == {"T1": "loading (no live analysis worker)"}
    registry.register(db, "h:1:1", 1, {"T1": "loading", "T2": "loading"})
    assert registry.model_states(db, ["T1", "T2"]) == {"T1": "loading", "T2": "loading"}
    registry.heartbeat(db, "h:1:1", "ready", {"T1": "loaded", "T2": "failed: no such file"}, None)
    assert registry.model_states(db, ["T1", "T2"]) == {"T1": "loaded", "T2": "failed: no such file"}

    registry.register(db, "h:2:2", 2, {"T2": "loaded"})  # a second worker has it: loaded
    assert registry.model_states(db, ["T2"]) == {"T2": "loaded"}
    registry.mark(db, "h:2:2", "exited", "killed by SIGKILL")
    assert registry.model_states(db, ["T2"]) == {"T2": "failed: no such file"}
    registry.heartbeat(db, "h:2:2", "ready", {"T2": "loaded"}, None)  # an exited row stays exited
    assert [w.state for w in registry.all_workers(db)] == ["ready", "exited"]

    with db.session.begin() as session:  # no heartbeat for a while: not live any more
        stale = utcnow() - timedelta(seconds=registry.STALE_AFTER_S + 1)
        session.execute(update(Worker).values(heartbeat_at=stale))
    assert registry.model_states(db, ["T1"]) == {"T1": "loading (no live analysis worker)"}


def test_rows_left_by_a_killed_serve_on_this_host_are_marked_exited(db: Database) -> None:
    registry.register(db, registry.worker_name(1, 999_999_99), 999_999_99, {})  # no such process
    registry.register(db, registry.worker_name(2), os.getpid(), {})  # alive (this test)
    assert registry.mark_gone_on_this_host(db) == [registry.worker_name(1, 999_999_99)]
    assert [w.state for w in registry.all_workers(db)] == ["exited", "starting"]


def test_how_a_worker_ended() -> None:
    assert how_ended(-signal.SIGKILL) == "killed by SIGKILL"
    assert how_ended(3) == "exit code 3"


# -- a real supervisor --------------------------------------------------------------------------------------


class Recorder:
    """A JobObserver that keeps (method, first argument) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def stage_finished(self, stage: str, seconds: float) -> None:
        self.calls.append(("stage_finished", stage))

    def export_finished(self, destination: str, outcome: str) -> None:
        self.calls.append(("export_finished", destination))

    def model_loaded(self, model: str, seconds: float) -> None:
        self.calls.append(("model_loaded", model))


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not after {timeout_s} s: {what}")


def test_a_killed_worker_is_marked_its_job_requeued_and_it_is_restarted(tmp_path: Path) -> None:
    from node.db.database import open_database

    data_dir = tmp_path / "data"
    config = NodeConfig.model_validate(
        {
            "node": {"data_dir": str(data_dir)},
            "selection": {"models": {}},
            "jobs": {"workers": 1, "poll_interval_s": 0.2, "worker_nice": 5, "worker_memory_mb": 8192},
        }
    )
    data_dir.mkdir()
    db = open_database(config.node.effective_database_url())
    jobs = JobStore(db)
    observer = Recorder()
    supervisor = Supervisor(config, db, jobs, observer)
    supervisor.start()
    try:
        first = wait_until(
            lambda: next((w for w in registry.all_workers(db) if w.state == "ready" and w.live()), None),
            "a worker ready",
        )
        assert first.pid != os.getpid() and first.pid in supervisor.pids().values()
        assert os.getpriority(os.PRIO_PROCESS, first.pid) >= os.getpriority(os.PRIO_PROCESS, 0) + 5
        [limit] = [line for line in Path(f"/proc/{first.pid}/limits").read_text().splitlines() if "address" in line]
        assert limit.split()[3:5] == [str(8192 * 2**20)] * 2  # [jobs] worker_memory_mb, soft and hard
        # As if it had claimed a job and were analysing it when it died.
        held = add_job(jobs, JobState.INFERRING, attempts=1, worker=first.name)
        os.kill(first.pid, signal.SIGKILL)

        second = wait_until(
            lambda: next((w for w in registry.all_workers(db) if w.name != first.name and w.live()), None),
            "a new worker",
        )
        [dead] = [w for w in registry.all_workers(db) if w.name == first.name]
        assert (dead.state, dead.detail) == ("exited", "killed by SIGKILL")
        assert second.pid != first.pid
        # Requeued with the attempt counted; the new worker then takes it and ends it (its images are nowhere),
        # and what it measured reaches serve's observer (the metrics) over its pipe.
        ended = wait_until(lambda: jobs.get(held.id).state.finished, "the job ended by the new worker")
        assert ended and jobs.get(held.id).attempts == 2
        wait_until(lambda: ("stage_finished", "preprocessing") in observer.calls, "the stage timing forwarded")
    finally:
        supervisor.stop(grace_s=30)
    rows = registry.all_workers(db)
    assert {w.state for w in rows} == {"exited", "stopped"}
    for worker in rows:
        with pytest.raises(ProcessLookupError):
            os.kill(worker.pid, 0)
    db.close()


def test_a_worker_killed_by_serve_stopping_does_not_cost_an_attempt(jobs: JobStore) -> None:
    held = add_job(jobs, JobState.INFERRING, attempts=2, worker="h:12:1")
    jobs.requeue_from_dead_worker("h:12:1", "SIGKILL", max_attempts=3, count_attempt=False)
    back = jobs.get(held.id)
    assert (back.state, back.attempts) == (JobState.QUEUED, 1) and "when the node stopped" in back.reason


def test_status_lists_the_workers(db: Database) -> None:
    from node.status import DiskStatus, NodeStatus, collect_workers, status_json, status_text

    registry.register(db, "h:7:1", 7, {"T1": "loading"})
    registry.heartbeat(db, "h:7:1", "ready", {"T1": "loaded"}, 12)
    registry.register(db, "h:8:2", 8, {})
    registry.mark(db, "h:8:2", "exited", "killed by SIGKILL")
    status = NodeStatus(DiskStatus("/data", 100, 1, False), workers=collect_workers(db))
    [ready, dead] = status_json(status)["workers"]
    assert {"name", "host", "pid", "state", "current_job", "heartbeat_at", "models"} <= set(ready)
    assert (ready["name"], ready["pid"], ready["state"], ready["current_job"]) == ("h:7:1", 7, "ready", 12)
    assert ready["models"] == {"T1": "loaded"} and ready["live"] is True
    assert (dead["state"], dead["detail"], dead["live"]) == ("exited", "killed by SIGKILL", False)
    text = status_text(status)
    assert "workers" in text and "h:7:1" in text and "job 12" in text and "killed by SIGKILL" in text


def test_receiver_processes_are_listed_with_their_role_and_load_no_model(db: Database) -> None:
    """A receiver row ([node] receiver_processes > 1) shows in status with its role and counts, and never
    stands for an analysis worker in the models' readiness."""
    from node.status import DiskStatus, NodeStatus, collect_workers, status_json, status_text

    registry.register(db, "h:9:r1", 9, {}, role="receiver")
    registry.heartbeat(db, "h:9:r1", "ready", {}, None, "40 instances stored, 0 refused")
    assert registry.model_states(db, ["T1"]) == {"T1": "loading (no live analysis worker)"}
    status = NodeStatus(DiskStatus("/data", 100, 1, False), workers=collect_workers(db))
    [receiver] = status_json(status)["workers"]
    assert (receiver["role"], receiver["state"], receiver["live"]) == ("receiver", "ready", True)
    assert receiver["detail"] == "40 instances stored, 0 refused"
    assert "receiver" in status_text(status)
    registry.register(db, "h:7:1", 7, {"T1": "loaded"})
    registry.heartbeat(db, "h:7:1", "ready", {"T1": "loaded"}, None)
    assert registry.model_states(db, ["T1"]) == {"T1": "loaded"}
    assert [w.role for w in registry.all_workers(db)] == ["receiver", "worker"]
