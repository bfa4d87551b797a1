"""The database: schema from migrations, durability pragmas, persistence, UTC timestamps, ``status``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from node.config import load_config
from node.db import Instance, Series, Study, open_database
from node.db.database import MIGRATIONS, Database
from node.db.schema import Base

REPO = Path(__file__).resolve().parents[2]
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _instance(series: Series, sop_instance_uid: str, number: int = 1) -> Instance:
    return Instance(
        series=series,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=MR,
        transfer_syntax_uid=EXPLICIT_LE,
        instance_number=number,
        path=f"/data/{sop_instance_uid}.dcm",
        size_bytes=1234,
        sha256="0" * 64,
        calling_ae="SCANNER1",
        calling_host="127.0.0.1",
    )


def _add_study(db: Database, n_instances: int = 2) -> None:
    """One MR study with one series of ``n_instances`` instances, through the ORM."""
    with db.session() as session:
        study = Study(study_uid=STUDY_UID)
        series = Series(study=study, series_uid=SERIES_UID, modality="MR", series_number=3, description="T1")
        instances = [_instance(series, f"{SERIES_UID}.{i}", i) for i in range(1, n_instances + 1)]
        session.add_all([study, series, *instances])
        session.commit()


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "x.sqlite"


@pytest.fixture
def db(db_file: Path) -> Iterator[Database]:
    database = open_database(_url(db_file))
    yield database
    database.close()


def test_open_creates_file_and_tables(db: Database, db_file: Path) -> None:
    """Opening a new SQLite URL creates its folder, the file and every table."""
    assert db_file.is_file()
    tables = set(inspect(db.engine).get_table_names())
    assert {"studies", "series", "instances", "events", "alembic_version"} <= tables


@pytest.mark.parametrize(
    ("pragma", "expected"),
    [("journal_mode", "wal"), ("synchronous", 2), ("foreign_keys", 1)],  # synchronous 2 = FULL
)
def test_sqlite_connections_have_durability_pragmas(db: Database, pragma: str, expected: object) -> None:
    """Every engine connection runs in WAL mode with FULL sync (and enforces foreign keys)."""
    with db.engine.connect() as connection:
        assert connection.execute(text(f"PRAGMA {pragma}")).scalar() == expected


def test_wal_mode_is_persisted_in_the_file(db: Database, db_file: Path) -> None:
    """WAL is recorded in the file itself, so other readers (sqlite3 tools) see it too."""
    with db.engine.connect():
        pass
    raw = sqlite3.connect(db_file)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_orm_models_match_migrations(db: Database) -> None:
    """The schema built by Alembic migrations is exactly what the ORM models declare."""
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_alembic_version_is_head(db: Database) -> None:
    """After opening, the database is stamped with the newest migration revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]


def test_reopening_keeps_existing_data(db_file: Path) -> None:
    """Re-opening (and re-migrating) an existing database never loses what it holds."""
    first = open_database(_url(db_file))
    _add_study(first)
    first.close()

    again = open_database(_url(db_file))
    try:
        with again.session() as session:
            study = session.scalars(select(Study)).one()
            assert study.study_uid == STUDY_UID
            [series] = study.series
            assert (series.series_uid, series.modality, series.series_number) == (SERIES_UID, "MR", 3)
            assert [i.sop_instance_uid for i in series.instances] == [f"{SERIES_UID}.1", f"{SERIES_UID}.2"]
            assert series.instances[0].stored is True
            assert series.instances[0].replaced_count == 0
    finally:
        again.close()


def test_default_timestamps_read_back_timezone_aware_utc(db: Database) -> None:
    """Default timestamps come back aware, in UTC, and are the time of the insert."""
    before = datetime.now(UTC)
    _add_study(db, n_instances=1)
    after = datetime.now(UTC)
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        instance = session.scalars(select(Instance)).one()
        for value in (study.first_received_at, instance.received_at):
            assert value.tzinfo is not None
            assert value.utcoffset() == timedelta(0)
            assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1)


def test_aware_non_utc_timestamp_keeps_its_instant(db: Database) -> None:
    """A timestamp written with another offset reads back as the same instant, expressed in UTC."""
    written = datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with db.session() as session:
        session.add(Study(study_uid=STUDY_UID, first_received_at=written))
        session.commit()
    with db.session() as session:
        read = session.scalars(select(Study)).one().first_received_at
    assert read == written  # aware comparison: same instant
    assert read.utcoffset() == timedelta(0)


def test_sop_instance_uid_is_unique(db: Database) -> None:
    """A second row with the same SOP Instance UID is refused by the database."""
    _add_study(db, n_instances=1)
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        session.add(_instance(series, f"{SERIES_UID}.1", 9))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        assert session.scalar(select(Instance.id).where(Instance.instance_number == 9)) is None


def _status(config_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node", "status", "--config", str(config_file), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def status_config(tmp_path: Path) -> Path:
    config_file = tmp_path / "node.toml"
    config_file.write_text('[node]\nport = 11112\ndata_dir = "data"\n', encoding="utf-8")
    return config_file


def test_status_json_without_database_is_empty(status_config: Path) -> None:
    """``status --json`` before anything was received: no studies, no jobs, the disk, exit 0, nothing created."""
    assert not (status_config.parent / "data").exists()
    result = _status(status_config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["studies"], report["jobs"]) == ([], [])
    assert report["disk"]["min_free_mb"] == 1024 and report["disk"]["free_mb"] > 0
    assert report["disk"]["refusing_images"] is (report["disk"]["free_mb"] < 1024)
    assert not (status_config.parent / "data").exists()


def test_status_json_contract_with_one_series(status_config: Path) -> None:
    """``status --json`` lists studies -> series with modality, instance count and state."""
    db = open_database(load_config(status_config).node.effective_database_url())
    _add_study(db, n_instances=2)
    db.close()
    assert (status_config.parent / "data" / "uad-node.sqlite").is_file()

    result = _status(status_config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report) == ["disk", "studies", "jobs", "workers", "file_problems"]
    [study] = report["studies"]
    assert set(study) == {"study_uid", "series"}
    assert study["study_uid"] == STUDY_UID
    [series] = study["series"]
    assert {k: series[k] for k in ("series_uid", "modality", "instances", "state")} == {
        "series_uid": SERIES_UID,
        "modality": "MR",
        "instances": 2,
        "state": "receiving",
    }
