"""Shared fixtures: a running node on a free loopback port, torn down after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import NodeProcess, free_port, node_config


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Start nodes with a given config tweak; every node started is stopped at teardown."""
    started: list[NodeProcess] = []

    def start(*, folder: Path | None = None, **config_options: Any) -> NodeProcess:
        """``config_options`` go to ``tests.peers.node_config``."""
        folder = folder or tmp_path
        port = free_port()
        config = node_config(folder, port, **config_options)
        node = NodeProcess(config_path=config, data_dir=folder / "data", port=port, ae_title="UADNODE")
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory) -> NodeProcess:  # type: ignore[no-untyped-def]
    """A node with the test defaults."""
    return node_factory()
