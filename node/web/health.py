"""Readiness: whether this node can take images and analyse them right now, part by part, so a load balancer
or an orchestrator routes nothing to a node that would refuse it and an admin sees which part is failing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from node.config import NodeSection
from node.db.database import Database
from node.status import disk_status


@dataclass(frozen=True)
class Part:
    """One part of readiness: ``ok`` and what was found (why it fails)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class ReadinessChecks:
    """The parts /readyz looks at. ``listening`` and ``models`` are read from the running receiver and scheduler
    (contrast class -> "loading", "loaded" or "failed: why"); with analysis worker processes, a model is loaded
    when a live worker reports it loaded in the workers table (``node.jobs.registry.model_states``)."""

    listening: Callable[[], bool]
    db: Database
    models: Callable[[], dict[str, str]]
    node: NodeSection

    def check(self) -> dict[str, Part]:
        """Every part, in a fixed order (blocking: the database and the disk are asked)."""
        return {"scp": self._scp(), "database": self._database(), "models": self._models(), "disk": self._disk()}

    def _scp(self) -> Part:
        listening = self.listening()
        where = f"{self.node.ae_title} on {self.node.host}:{self.node.port}"
        return Part(listening, f"listening as {where}" if listening else f"not listening as {where}")

    def _database(self) -> Part:
        try:
            with self.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            return Part(False, f"does not answer: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return Part(True, "answers")

    def _models(self) -> Part:
        states = self.models()
        not_ready = {contrast: state for contrast, state in states.items() if state != "loaded"}
        if not_ready:
            return Part(False, "; ".join(f"{contrast}: {state}" for contrast, state in sorted(not_ready.items())))
        return Part(True, f"loaded: {', '.join(sorted(states))}" if states else "no models configured")

    def _disk(self) -> Part:
        disk = disk_status(self.node)
        floor = f"{disk.free_mb} MB free, floor {disk.min_free_mb} MB"
        return Part(
            not disk.refusing_images, f"below the floor, refusing images: {floor}" if disk.refusing_images else floor
        )
