"""kill -9 of the receiver and of analysis workers at random points, with four senders streaming.

Asserted after every scenario: each image acknowledged with Success is stored and listed (row, file,
``status --json``), none lost; results of every completed series reach the PACS (dcmtk storescp, one
file per received object) exactly once; the node answers C-ECHO and C-STORE after the fault.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from tests.faults.conftest import (
    FINISHED,
    FULL_ONLY,
    ROUNDS,
    FaultRow,
    Streamer,
    assert_stored,
    four_streams,
    fresh_copy,
    jobs,
    orphan_files,
    recovery_s,
    store_fresh_series,
    wait_jobs,
)

pytestmark = [pytest.mark.peers, pytest.mark.timeout(1200)]


def test_kill9_receiver_under_four_senders(fault_node, rng, fault_table) -> None:  # type: ignore[no-untyped-def]
    node = fault_node().start()
    streams = four_streams(node.port, images_each=60 * (ROUNDS + 1), rng=rng, pause_s=0.005)
    for stream in streams:
        stream.start()
    recoveries = []
    for _ in range(ROUNDS):
        time.sleep(rng.uniform(0.3, 2.0))  # a random point in the stream
        node.kill9()
        killed_at = time.monotonic()
        node.start()
        recoveries.append(recovery_s(node, killed_at))
    for stream in streams:
        stream.join(timeout_s=300)
    acked = set().union(*(s.acked for s in streams))
    assert all(s.done() for s in streams), [(s.ae_title, len(s.acked), s.statuses) for s in streams]
    lost = assert_stored(node, acked)
    orphans = orphan_files(node)
    fault_table(
        FaultRow(
            "kill -9 receiver, 4 senders streaming",
            ROUNDS,
            len(acked),
            lost,
            0,
            max(recoveries),
            f"{orphans} orphan file(s) without a row (never acknowledged); aborts seen by senders "
            f"{sum(s.aborts for s in streams)}",
        )
    )


def _deliveries_once(node, peer, series_uids: list[str]) -> tuple[int, int, list[str]]:  # type: ignore[no-untyped-def]
    """(results owed, duplicated deliveries, uids missing at the peer) for the analysed series."""
    owed = [
        r[0]
        for r in node.query("SELECT sop_instance_uid, source_series_uid FROM deliveries")
        if r[1] in set(series_uids)
    ]
    received: Counter = peer.received()
    duplicated = sum(received[uid] - 1 for uid in owed if received[uid] > 1)
    missing = [uid for uid in owed if received[uid] == 0]
    return len(owed), duplicated, missing


def _killed_while_exporting(node, series_uid: str) -> bool:  # type: ignore[no-untyped-def]
    return any(r[1] == series_uid and r[2] == "exporting" for r in jobs(node))


@FULL_ONLY
def test_kill9_serve_during_analysis_and_export(  # type: ignore[no-untyped-def]
    fault_node, storescp_peer, checkpoint, t1_series, rng, fault_table
) -> None:
    """Each round: four senders stream (skipped localizers) while a T1 is analysed and exported; serve is
    killed at a random point (intake, queue, analysis or export). Every T1 ends done, its results at the
    PACS exactly once. A duplicate is only explained when the kill hit the export of that series (a result
    the PACS stored whose response the node never recorded is sent again after the restart)."""
    peer = storescp_peer().start()
    node = fault_node(checkpoint=checkpoint, pacs_port=peer.port).start()
    t1_uids, acked, recoveries, explained = [], set(), [], 0
    for _ in range(ROUNDS):
        streams = four_streams(node.port, images_each=30, rng=rng, pause_s=0.01)
        for stream in streams:
            stream.start()
        t1 = fresh_copy(t1_series)
        t1_uids.append(str(t1[0].SeriesInstanceUID))
        sender = Streamer(node.port, t1, ae_title="SCANNER1").start()
        sender.join(timeout_s=120)
        acked |= sender.acked
        time.sleep(rng.uniform(0.5, 10.0))  # quiet period 1 s, then analysis (a few s), then export
        exporting = _killed_while_exporting(node, t1_uids[-1])
        node.kill9()
        killed_at = time.monotonic()
        node.start()
        recoveries.append(recovery_s(node, killed_at))
        for stream in streams:
            stream.join(timeout_s=300)
            acked |= stream.acked
        rows = wait_jobs(
            node,
            lambda rows: (
                all(any(r[1] == u and r[2] in FINISHED for r in rows) for u in t1_uids)
                and all(r[2] in FINISHED for r in rows)
            ),
            "every job finished after the restart",
        )
        if exporting:
            explained += 1
    states = {r[1]: (r[2], r[3]) for r in rows if r[1] in t1_uids}
    assert all(state == "done" for state, _ in states.values()), states
    lost = assert_stored(node, acked)
    owed, duplicated, missing = _deliveries_once(node, peer, t1_uids)
    assert owed and not missing, f"{len(missing)} of {owed} results never reached the PACS"
    if duplicated:
        assert explained, f"{duplicated} result(s) delivered twice without a kill during export"
    fault_table(
        FaultRow(
            "kill -9 serve during intake/analysis/export, 4 senders",
            ROUNDS,
            len(acked),
            lost,
            duplicated,
            max(recoveries),
            f"{owed} results owed, all delivered; kills during export: {explained}",
        )
    )


def _busy_worker(node, timeout_s: float = 120.0) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """(pid, job id) of a worker process with a current job, or None when no worker ever reported."""
    deadline = time.monotonic() + timeout_s
    seen_any = False
    while time.monotonic() < deadline:
        try:
            rows = node.query("SELECT pid, current_job_id, state FROM workers")
        except Exception:  # noqa: BLE001 - no workers table in this tree
            return None
        seen_any = seen_any or bool(rows)
        for pid, job_id, _state in rows:
            if job_id is not None and pid and pid != node.pid():
                return int(pid), int(job_id)
        time.sleep(0.1)
    return None if not seen_any else (0, 0)


@FULL_ONLY
def test_kill9_worker_process_mid_job(  # type: ignore[no-untyped-def]
    fault_node, storescp_peer, checkpoint, t1_series, fault_table
) -> None:
    """The ``workers`` contract: a worker process has a row (pid, current_job_id). Killing it mid-job must not
    lose the job: serve starts a new worker, the job is done, its results reach the PACS exactly once."""
    peer = storescp_peer().start()
    node = fault_node(checkpoint=checkpoint, pacs_port=peer.port).start()
    t1_uids, acked, recoveries, states_at_kill = [], set(), [], []
    for _ in range(ROUNDS):
        uid, stored = store_fresh_series(node.port, t1_series)
        t1_uids.append(uid)
        acked |= stored
        busy = _busy_worker(node)
        if busy is None:
            pytest.xfail("worker processes not yet landed (the workers table stays empty)")
        pid, job_id = busy
        assert pid, "workers reported, but none took the job within 120 s"
        states_at_kill += [r[2] for r in jobs(node) if r[0] == job_id]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        recoveries.append(recovery_s(node, killed_at))
        wait_jobs(
            node,
            lambda rows: all(any(r[1] == u and r[2] in FINISHED for r in rows) for u in t1_uids),
            "the job of the killed worker finished",
        )
    states = {r[1]: r[2] for r in jobs(node) if r[1] in t1_uids}
    assert set(states.values()) == {"done"}, states
    lost = assert_stored(node, acked)
    owed, duplicated, missing = _deliveries_once(node, peer, t1_uids)
    fault_table(
        FaultRow(
            "kill -9 analysis worker mid-job",
            ROUNDS,
            len(acked),
            lost,
            duplicated,
            max(recoveries),
            f"job states at the kill: {states_at_kill}",
        )
    )
    deliveries = [
        node.query("SELECT sop_instance_uid, state, attempts FROM deliveries WHERE source_series_uid = :s", s=u)
        for u in t1_uids
    ]
    assert owed and not missing, (owed, missing)
    assert duplicated == 0 or "exporting" in states_at_kill, (
        f"{duplicated} duplicated deliveries; states at kill {states_at_kill}; deliveries {deliveries}; "
        f"received {peer.received()}"
    )


@FULL_ONLY
def test_kill9_serve_in_the_middle_of_an_export(  # type: ignore[no-untyped-def]
    fault_node, storescp_peer, checkpoint, t1_series, fault_table
) -> None:
    """The kill lands inside the export for certain: a slow PACS (``--sleep-after 1``) has received some of
    the results when serve is SIGKILLed. After the restart the rest is delivered; what the PACS already
    acknowledged and the node recorded is not sent again. At most the one object in flight at the kill may
    arrive twice (the PACS stored it, its response was lost with the process): counted, never more."""
    peer = storescp_peer(slow_s=1).start()
    node = fault_node(checkpoint=checkpoint, pacs_port=peer.port).start()
    t1_uids, acked, recoveries, in_flight_max = [], set(), [], 0
    for _ in range(ROUNDS):
        uid, stored = store_fresh_series(node.port, t1_series)
        t1_uids.append(uid)
        acked |= stored
        before = sum(peer.received().values())
        deadline = time.monotonic() + 240
        while sum(peer.received().values()) < before + 2:
            assert time.monotonic() < deadline and node.alive(), "the export never started"
            time.sleep(0.1)
        assert _killed_while_exporting(node, uid)
        node.kill9()
        killed_at = time.monotonic()
        node.start()
        recoveries.append(recovery_s(node, killed_at))
        wait_jobs(node, lambda rows, u=uid: any(r[1] == u and r[2] in FINISHED for r in rows), "export resumed")
        in_flight_max = max(in_flight_max, 1)
    states = {r[1]: r[2] for r in jobs(node) if r[1] in t1_uids}
    assert set(states.values()) == {"done"}, states
    lost = assert_stored(node, acked)
    owed, duplicated, missing = _deliveries_once(node, peer, t1_uids)
    fault_table(
        FaultRow(
            "kill -9 serve in the middle of an export (slow PACS)",
            ROUNDS,
            len(acked),
            lost,
            duplicated,
            max(recoveries),
            f"{owed} results owed; duplicates allowed: at most 1 in flight per kill",
        )
    )
    assert owed and not missing, (owed, missing)
    assert duplicated <= ROUNDS * in_flight_max, f"{duplicated} duplicates after {ROUNDS} kill(s) during export"
