"""PostgreSQL (a real throwaway server, started by the test) restarted during intake and during a job.

The server fixture is the one of tests/integration/test_postgres.py (initdb into a temp folder, postgres
on a free loopback port, time zone +05:30). While the database is down the node must answer C-STORE with
0xA700 (the sender keeps the image), never Success for an image it could not record; after the restart
everything acknowledged is stored and listed, and the interrupted job ends done with its results delivered
exactly once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest

from tests.faults.conftest import (
    FULL_ONLY,
    ROUNDS,
    FaultRow,
    assert_stored,
    four_streams,
    jobs,
    recovery_s,
    store_fresh_series,
    wait_jobs,
)
from tests.integration import test_postgres
from tests.integration.test_postgres import PostgresServer

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

postgres = test_postgres.postgres  # the module-scoped real server


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    import psycopg

    name = f"uad_fault_{uuid.uuid4().hex[:12]}"
    admin = {"host": "127.0.0.1", "port": postgres.port, "user": "postgres", "dbname": "postgres", "autocommit": True}
    with psycopg.connect(**admin, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.url(name)


def restart(server: PostgresServer, down_s: float) -> float:
    """Stop (fast: connections are cut), stay down ``down_s``, start again; returns when it is back (monotonic)."""
    server.stop()
    time.sleep(down_s)
    result = server.run(
        str(server.bindir / "pg_ctl"), "start", "-D", str(server.data), "-l", str(server.root / "server.log"),
        "-w", "-t", "30", timeout_s=40,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic()


def test_postgres_restarted_during_intake(fault_node, postgres, database_url, rng, fault_table) -> None:  # type: ignore[no-untyped-def]
    node = fault_node(database_url=database_url).start()
    streams = four_streams(node.port, images_each=50 * (ROUNDS + 1), rng=rng, pause_s=0.01)
    for stream in streams:
        stream.start()
    recoveries = []
    for _ in range(ROUNDS):
        time.sleep(rng.uniform(0.3, 1.5))
        back_at = restart(postgres, rng.uniform(0.5, 3.0))
        recoveries.append(recovery_s(node, back_at))
    for stream in streams:
        stream.join(timeout_s=300)
    assert node.alive()
    statuses: Counter = sum((s.statuses for s in streams), Counter())
    assert all(s.done() for s in streams), statuses
    acked = set().union(*(s.acked for s in streams))
    # Every answer was Success, a retryable refusal, or no answer (an abort); never another failure.
    assert set(statuses) <= {0x0000, 0xA700, None, "no association"}, statuses
    lost = assert_stored(node, acked)
    fault_table(
        FaultRow("PostgreSQL restarted during intake (4 senders)", ROUNDS, len(acked), lost, 0, max(recoveries),
                 f"{statuses[0xA700]} refusals 0xA700, {statuses[None]} unanswered; recovery from server back")
    )  # fmt: skip


@FULL_ONLY
def test_postgres_restarted_during_a_job(  # type: ignore[no-untyped-def]
    fault_node, storescp_peer, postgres, database_url, checkpoint, t1_series, rng, fault_table
) -> None:
    peer = storescp_peer().start()
    node = fault_node(database_url=database_url, checkpoint=checkpoint, pacs_port=peer.port).start()
    t1_uids, acked, recoveries, at_restart = [], set(), [], []
    for _ in range(ROUNDS):
        uid, stored = store_fresh_series(node.port, t1_series)
        t1_uids.append(uid)
        acked |= stored
        running = lambda rows, u=uid: any(  # noqa: E731
            r[1] == u and r[2] in ("preprocessing", "inferring", "exporting") for r in rows
        )
        wait_jobs(node, running, "the job running")
        time.sleep(rng.uniform(0.0, 2.0))
        at_restart += [r[2] for r in jobs(node) if r[1] == uid]
        back_at = restart(postgres, rng.uniform(0.5, 3.0))
        recoveries.append(recovery_s(node, back_at))
        wait_jobs(
            node,
            lambda rows: all(any(r[1] == u and r[2] in ("done", "failed") for r in rows) for u in t1_uids),
            "the job finished after the database came back",
        )
    states = {r[1]: (r[2], r[3]) for r in jobs(node) if r[1] in t1_uids}
    lost = assert_stored(node, acked)
    owed = [r[0] for r in node.query("SELECT sop_instance_uid, source_series_uid FROM deliveries") if r[1] in t1_uids]
    received = peer.received()
    duplicated = sum(received[u] - 1 for u in owed if received[u] > 1)
    fault_table(
        FaultRow("PostgreSQL restarted during a job", ROUNDS, len(acked), lost, duplicated, max(recoveries),
                 f"job states at the restart: {at_restart}; final: {[s for s, _ in states.values()]}")
    )  # fmt: skip
    assert all(s == "done" for s, _ in states.values()), states
    assert owed and all(received[u] >= 1 for u in owed), "results missing at the PACS"
    assert duplicated == 0, f"{duplicated} result(s) received twice"
