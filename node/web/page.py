"""The status page: studies, series, jobs, disk, readiness and recent events, rendered on the server from the
same reads as ``uad-node status`` (``node.status``). Shows UIDs, descriptions and dates, never patient names or
IDs (the database holds none). Retry and cancel buttons appear only when a token is configured, and act only
once the admin has entered it in the page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from node import __version__
from node.config import NodeConfig
from node.status import JobStatus, NodeStatus
from node.web.health import Part
from node.web.queries import EventStatus

_TEMPLATES = Path(__file__).with_name("templates")
REFRESH_S = 10
# The quality gate's measures worth a glance, with their labels and formats (the full set is in status --json).
_QUALITY = (
    ("registration_similarity", "similarity", "{:.2f}"),
    ("mask_agreement", "mask", "{:.2f}"),
    ("brain_volume_ml", "brain", "{:.0f} mL"),
    ("coverage", "coverage", "{:.0%}"),
    ("contrast_margin", "contrast", "{:+.3f}"),
    ("anomaly_fraction", "anomalous", "{:.1%}"),
)


@dataclass(frozen=True)
class PageData:
    """Everything one rendering shows (read in a worker thread, rendered after)."""

    status: NodeStatus
    events: list[EventStatus]
    readiness: dict[str, Part]


class StatusPage:
    """Renders the page with Jinja2 (autoescaped: descriptions and reasons come from senders and files)."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]))
        self._env.filters["quality"] = quality_text
        self._env.filters["when"] = _when
        self._template = self._env.get_template("status.html")

    def render(self, data: PageData) -> str:
        node, web = self._config.node, self._config.web
        descriptions = {s.series_uid: s.description for st in data.status.studies for s in st.series}
        counts: dict[str, int] = {}
        for job in data.status.jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
        return self._template.render(
            version=__version__,
            ae_title=node.ae_title,
            address=f"{node.host}:{node.port}",
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            refresh_s=REFRESH_S,
            ready=all(part.ok for part in data.readiness.values()),
            readiness=data.readiness,
            disk=data.status.disk,
            studies=data.status.studies,
            series_count=sum(len(study.series) for study in data.status.studies),
            jobs=list(reversed(data.status.jobs)),  # newest first
            job_counts=counts,
            workers=data.status.workers,  # live and recently ended analysis worker processes
            descriptions=descriptions,
            events=data.events,
            actions=bool(web.token),
            retryable=_retryable,
            cancellable=_cancellable,
        )


def quality_text(quality: dict | None) -> str:
    """The gate's main measures on one line, e.g. ``similarity 0.66 · mask 0.93 · brain 1450 mL``."""
    if not quality:
        return ""
    parts = [label + " " + fmt.format(quality[key]) for key, label, fmt in _QUALITY if quality.get(key) is not None]
    return " · ".join(parts)


def _when(iso: str) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS`` (UTC), or a dash."""
    return iso[:19].replace("T", " ") if iso else "–"


def _retryable(job: JobStatus) -> bool:
    return job.state in ("failed", "cancelled", "done", "skipped")


def _cancellable(job: JobStatus) -> bool:
    return job.state in ("queued", "preprocessing", "inferring", "exporting")
