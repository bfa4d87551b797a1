"""Fixtures for unit tests of the store: a real SQLite database and data directory under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.db import open_database
from node.db.database import Database
from node.receiver.storage import InstanceStore
from tests.mr_files import MR_IMAGE_STORAGE


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database kept apart from the data dir, so 'no file written' is checkable."""
    database = open_database(f"sqlite:///{tmp_path / 'db' / 'node.sqlite'}")
    yield database
    database.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_store(data_dir: Path, db: Database, min_free_bytes: int = 0) -> InstanceStore:
    return InstanceStore(
        data_dir=data_dir, database=db, stored_sop_classes={MR_IMAGE_STORAGE}, min_free_bytes=min_free_bytes
    )


@pytest.fixture
def store(data_dir: Path, db: Database) -> InstanceStore:
    return make_store(data_dir, db)
