"""Fixtures for unit tests: a real SQLite database and data directory under tmp_path for the store, and
Colin27 on the model grid (preprocessed once per session) for the model and evaluation tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.preprocessing import Preprocessor
from node.db import open_database
from node.db.database import Database
from node.receiver.storage import InstanceStore
from tests import brains
from tests.mr_files import MR_IMAGE_STORAGE


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """For tiny tensors a second intra-op thread only adds synchronisation cost (seconds on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def preprocessor() -> Preprocessor:
    from models.atlas import load_mni152_atlas

    return Preprocessor(load_mni152_atlas())


@pytest.fixture(scope="session")
def colin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("colin-cache")


@pytest.fixture(scope="session")
def colin(preprocessor: Preprocessor, colin_cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Colin27 (the evaluation brain) on the model grid before intensity scaling: (unscaled volume, brain mask)."""
    from models.evaluation import colin27_model_grid

    brains.colin27(skull=True)  # skips when mricron-data is absent
    return colin27_model_grid(preprocessor, colin_cache)


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
