"""The database layer and the store path on a real PostgreSQL server (a throwaway cluster per module).

SQLite is what the unit tests use; a site may point ``database_url`` at PostgreSQL instead, where
types are checked strictly, timestamps carry the session's time zone and concurrent writers really
run at once. This module runs ``initdb`` into a temporary folder, starts ``postgres`` on 127.0.0.1
(free port, trust authentication, unix socket in the same folder) and gives each test a new database.

The server runs with ``timezone = 'Asia/Kolkata'`` (+05:30, no daylight saving), as a server in a
hospital's local time would: a UTC server would hide every time zone mistake.

Missing PostgreSQL binaries (or psycopg) skip these tests, and fail them under UAD_REQUIRE_PEERS=1.
As root (tests and CI run as root), the server runs as the ``postgres`` user of the Debian package,
since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select, text

from node.db import Event, Instance, Series, Study, open_database
from node.db.database import MIGRATIONS, Database
from node.db.schema import Base
from node.receiver.storage import Caller, InstanceStore, Outcome
from node.status import collect_status
from tests.mr_files import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, mr_slice
from tests.peers import free_port
from tests.stored_instances import (
    CALLER,
    count,
    encode,
    header_of,
    put,
    rows,
    run_concurrently,
    store_at_once,
    target_of,
)

pytestmark = pytest.mark.peers

SERVER_TIMEZONE = "Asia/Kolkata"
START_TIMEOUT_S = 30
INSTALL_HINT = "apt-get install postgresql; pip install 'psycopg[binary]'"


def _missing(message: str) -> None:
    """Skip, or fail under UAD_REQUIRE_PEERS=1 (as ``tests.peers.require_tool`` does)."""
    message = f"{message} ({INSTALL_HINT})"
    if os.environ.get("UAD_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _postgres_bindir() -> Path:
    """The newest server installation's bin folder (Debian keeps it off PATH), or skip/fail."""
    candidates = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in reversed(candidates):
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    _missing("PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed")
    raise AssertionError("unreachable")


@dataclass
class PostgresServer:
    """A running throwaway cluster: superuser ``postgres``, trust authentication on 127.0.0.1."""

    root: Path
    bindir: Path
    port: int
    as_user: list[str]  # command prefix that runs a server program as its owner

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout_s, check=False)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; if that does not work, signal the postmaster directly."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            result = self.run(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "20")
            if result.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_file.exists():
                time.sleep(0.1)
            if pid_file.exists():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _start_server(bindir: Path) -> PostgresServer:
    """``initdb`` into a new folder under the system temp dir, then ``pg_ctl start -w``."""
    if os.geteuid() == 0:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    else:
        owner, as_user = None, []
    # Not under pytest's tmp_path: its parent is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="uad-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(root=root, bindir=bindir, port=free_port(), as_user=as_user)
    try:
        result = server.run(
            str(bindir / "initdb"),
            "-D", str(server.data),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            timeout_s=60,
        )  # fmt: skip
        assert result.returncode == 0, f"initdb failed:\n{result.stdout}\n{result.stderr}"
        (server.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
        )
        with open(server.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {server.port}\n"
                f"unix_socket_directories = '{root}'\ntimezone = '{SERVER_TIMEZONE}'\n"
            )
        result = server.run(
            str(bindir / "pg_ctl"),
            "start",
            "-D", str(server.data),
            "-l", str(root / "server.log"),
            "-w", "-t", str(START_TIMEOUT_S),
            timeout_s=START_TIMEOUT_S + 10,
        )  # fmt: skip
        assert result.returncode == 0, f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{server.log()}"
    except BaseException:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One cluster for this module, stopped and deleted afterwards."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed")
    server = _start_server(_postgres_bindir())
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database for one test; dropped afterwards."""
    import psycopg

    name = f"uad_{uuid.uuid4().hex[:16]}"
    admin = {"host": "127.0.0.1", "port": postgres.port, "user": "postgres", "dbname": "postgres", "autocommit": True}
    with psycopg.connect(**admin, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres.url(name)
    with psycopg.connect(**admin, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = open_database(pg_url)
    yield database
    database.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path, db: Database) -> InstanceStore:
    return InstanceStore(data_dir=data_dir, database=db, stored_sop_classes={MR_IMAGE_STORAGE}, min_free_bytes=0)


def test_server_runs_in_a_non_utc_time_zone(db: Database) -> None:
    """The premise of the time zone tests below: the session time zone is not UTC."""
    with db.engine.connect() as conn:
        assert conn.execute(text("SHOW timezone")).scalar() == SERVER_TIMEZONE
        assert conn.execute(text("SHOW fsync")).scalar() == "on"


def test_migrations_build_the_declared_schema(db: Database) -> None:
    """``open_database`` migrates a new PostgreSQL database to head, and the result is exactly the ORM models."""
    assert {"studies", "series", "instances", "events", "alembic_version"} <= set(inspect(db.engine).get_table_names())
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_store_duplicate_and_replacement(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """STORED rows for new instances, DUPLICATE for the same bytes, REPLACED (counted and audited) for new bytes."""
    study, series = generate_uid(), generate_uid()
    slices = [mr_slice(study, series, i) for i in range(3)]
    assert [put(store, ds) for ds in slices] == [Outcome.STORED] * 3
    assert put(store, slices[0], Caller("SCANNER2", "127.0.0.2")) is Outcome.DUPLICATE

    changed = mr_slice(study, series, 1, sop_instance_uid=slices[1].SOPInstanceUID, seed=7)
    assert put(store, changed, Caller("SCANNER2", "127.0.0.2")) is Outcome.REPLACED
    assert pydicom.dcmread(target_of(data_dir, changed)).PixelData == changed.PixelData

    instances = rows(db, Instance)
    assert [i.sop_instance_uid for i in instances] == [ds.SOPInstanceUID for ds in slices]
    assert [i.replaced_count for i in instances] == [0, 1, 0]
    assert [i.calling_ae for i in instances] == ["SCANNER1", "SCANNER2", "SCANNER1"]
    assert all(i.stored and i.path == str(target_of(data_dir, ds)) for i, ds in zip(instances, slices, strict=True))
    assert all(i.size_bytes == target_of(data_dir, ds).stat().st_size for i, ds in zip(instances, slices, strict=True))
    [event] = rows(db, Event)
    assert (event.kind, event.sop_instance_uid, event.series_uid, event.study_uid) == (
        "instance_replaced",
        changed.SOPInstanceUID,
        series,
        study,
    )
    [series_row] = rows(db, Series)
    assert (series_row.series_uid, series_row.modality, series_row.series_number, series_row.state) == (
        series,
        "MR",
        1,
        "receiving",
    )
    assert [s.study_uid for s in rows(db, Study)] == [study]


def test_ignored_sop_class_is_recorded_without_a_file(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """A CT slice: IGNORED, a row with stored=False and no path, its series 'ignored' with the reason."""
    ct = mr_slice(generate_uid(), generate_uid(), 0, sop_class_uid=CT_IMAGE_STORAGE)
    assert put(store, ct) is Outcome.IGNORED
    assert put(store, ct) is Outcome.IGNORED
    [row] = rows(db, Instance)
    assert (row.stored, row.path, row.sop_class_uid) == (False, None, CT_IMAGE_STORAGE)
    [series] = rows(db, Series)
    assert series.state == "ignored" and CT_IMAGE_STORAGE in series.state_reason
    assert not (data_dir / "studies" / ct.StudyInstanceUID).exists()


def test_same_new_instance_stored_twice_at_once(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Two threads storing one new SOP instance: one STORED, one DUPLICATE, one row."""
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    header, dataset = header_of(ds), encode(ds)
    results = run_concurrently([lambda: store.store(header, dataset, CALLER)] * 2)
    assert sorted(r.value for r in results) == ["duplicate", "stored"], results
    assert count(db, Instance) == 1
    assert target_of(data_dir, ds).read_bytes().endswith(dataset)


def test_eight_instances_of_a_new_series_at_once(store: InstanceStore, data_dir: Path, db: Database) -> None:
    """Eight threads, eight instances of one unseen series: all STORED, one study row and one series row.

    Several rounds, each a new study and series, so the creation race (IntegrityError, then retry) is hit."""
    rounds = 4
    for _ in range(rounds):
        study, series = generate_uid(), generate_uid()
        slices = [mr_slice(study, series, i) for i in range(8)]
        results = store_at_once(store, slices)
        assert results == [Outcome.STORED] * 8, results
        with db.session() as session:
            series_row = session.scalars(select(Series).where(Series.series_uid == series)).one()
            assert series_row.study.study_uid == study
            assert {i.sop_instance_uid for i in series_row.instances} == {ds.SOPInstanceUID for ds in slices}
        assert all(target_of(data_dir, ds).is_file() for ds in slices)
    assert (count(db, Study), count(db, Series), count(db, Instance)) == (rounds, rounds, 8 * rounds)
    assert list((data_dir / "incoming").iterdir()) == []


def _two_studies(store: InstanceStore) -> tuple[list[Dataset], list[Dataset], Dataset]:
    """Study A: an MR series of 3 and an ignored CT slice; study B: an MR series of 2."""
    study_a, study_b = generate_uid(), generate_uid()
    mr_a = [mr_slice(study_a, "1.2.826.0.1.3680043.8.498.7.1", i) for i in range(3)]
    ct_a = mr_slice(study_a, "1.2.826.0.1.3680043.8.498.7.2", 0, sop_class_uid=CT_IMAGE_STORAGE)
    mr_b = [mr_slice(study_b, "1.2.826.0.1.3680043.8.498.7.3", i) for i in range(2)]
    for ds in [*mr_a, ct_a, *mr_b]:
        put(store, ds)
    return mr_a, mr_b, ct_a


def test_collect_status_counts(store: InstanceStore, db: Database) -> None:
    """``collect_status``: studies in arrival order, each series with its instance count and state."""
    mr_a, mr_b, ct_a = _two_studies(store)
    studies = collect_status(db)
    assert [s.study_uid for s in studies] == [mr_a[0].StudyInstanceUID, mr_b[0].StudyInstanceUID]
    summary = [[(s.series_uid, s.modality, s.instances, s.state) for s in study.series] for study in studies]
    assert summary == [
        [(mr_a[0].SeriesInstanceUID, "MR", 3, "receiving"), (ct_a.SeriesInstanceUID, "CT", 1, "ignored")],
        [(mr_b[0].SeriesInstanceUID, "MR", 2, "receiving")],
    ]


def _assert_utc_now(value: datetime, before: datetime, after: datetime) -> None:
    assert value.tzinfo is not None, value
    assert value.utcoffset() == timedelta(0), value
    assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1)


def test_stored_timestamps_read_back_in_utc(store: InstanceStore, db: Database) -> None:
    """Timestamps written by the store read back through the ORM timezone-aware, in UTC, as the time of the store."""
    before = datetime.now(UTC)
    ds = mr_slice(generate_uid(), generate_uid(), 0)
    put(store, ds)
    after = datetime.now(UTC)
    [instance], [series], [study] = rows(db, Instance), rows(db, Series), rows(db, Study)
    for value in (instance.received_at, series.first_received_at, study.first_received_at):
        _assert_utc_now(value, before, after)


def test_collect_status_last_received_is_utc(store: InstanceStore, db: Database) -> None:
    """``last_received_at`` in ``status`` is an ISO timestamp in UTC: the newest instance of the series."""
    before = datetime.now(UTC)
    mr_a, mr_b, ct_a = _two_studies(store)
    after = datetime.now(UTC)
    for study in collect_status(db):
        for series in study.series:
            assert series.last_received_at.endswith("+00:00"), series.last_received_at
            _assert_utc_now(datetime.fromisoformat(series.last_received_at), before, after)


def test_timestamps_keep_their_instant(store: InstanceStore, db: Database) -> None:
    """Whatever offset they are shown in, stored timestamps are the instant of the store (nothing shifted)."""
    before = datetime.now(UTC)
    put(store, mr_slice(generate_uid(), generate_uid(), 0))
    after = datetime.now(UTC)
    [instance] = rows(db, Instance)
    assert instance.received_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= instance.received_at <= after + timedelta(seconds=1)
    [study] = collect_status(db)
    last = datetime.fromisoformat(study.series[0].last_received_at)
    assert last.tzinfo is not None and last == instance.received_at


def test_reopening_keeps_the_data(pg_url: str, tmp_path: Path) -> None:
    """Re-opening (and re-migrating) an existing PostgreSQL database keeps what it holds; the store goes on."""
    first = open_database(pg_url)
    try:
        store = InstanceStore(tmp_path / "data", first, {MR_IMAGE_STORAGE}, 0)
        study, series = generate_uid(), generate_uid()
        slices = [mr_slice(study, series, i) for i in range(2)]
        assert [put(store, ds) for ds in slices] == [Outcome.STORED] * 2
    finally:
        first.close()

    again = open_database(pg_url)
    try:
        assert count(again, Study) == 1 and count(again, Series) == 1
        assert [i.sop_instance_uid for i in rows(again, Instance)] == [ds.SOPInstanceUID for ds in slices]
        store = InstanceStore(tmp_path / "data", again, {MR_IMAGE_STORAGE}, 0)
        assert put(store, slices[0]) is Outcome.DUPLICATE
        assert put(store, mr_slice(study, series, 2)) is Outcome.STORED
        [status] = collect_status(again)
        assert [(s.series_uid, s.instances) for s in status.series] == [(series, 3)]
    finally:
        again.close()
