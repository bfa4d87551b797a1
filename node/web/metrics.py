"""The node's Prometheus metrics: one ``CollectorRegistry`` per app, fed by the receiver's and the jobs' observer
hooks (``node.receiver.observer``, ``node.jobs.observer``) and, at scrape time, by the database and the disk.

Counters and histograms live as long as the process (a restart starts them at 0, as Prometheus expects);
``uad_jobs`` and ``uad_disk_free_bytes`` are read when scraped, so they are right after a restart too.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydicom.uid import UID

# C-STORE failure statuses (PS3.4 B.2.3) as label values: a fixed, small set whatever the failure's text says.
REFUSAL_REASONS = {0xA700: "out_of_resources", 0xA900: "dataset_mismatch", 0xC000: "cannot_understand"}
# C-STORE handling is milliseconds (fsync included); an analysis stage is seconds to minutes.
_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def sop_class_label(uid: str) -> str:
    """A SOP class as a label value: its keyword for a class pydicom knows (a bounded set), else "other", so a
    sender cannot create label values (and Prometheus series) at will."""
    keyword = UID(uid).keyword if uid else ""
    return keyword if keyword.endswith("Storage") else "other"


class NodeMetrics:
    """The registry and its metrics; also the observer the receiver and the scheduler call (see the hooks)."""

    def __init__(self, job_counts: Callable[[], dict[str, int]], data_dir: Path) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received_total = Counter(
            "uad_instances_received", "Instances acknowledged with Success, by SOP class", ["sop_class"], registry=r
        )
        self.refused_total = Counter(
            "uad_instances_refused", "Instances answered with a failure status, by reason", ["reason"], registry=r
        )
        self.store_seconds = Histogram(
            "uad_store_seconds", "C-STORE handling time (parse, fsync, database)", buckets=_STORE_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "uad_job_stage_seconds", "Time jobs spent in each stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.exports_total = Counter(
            "uad_exports", "Export attempts per destination and outcome", ["destination", "outcome"], registry=r
        )
        self.model_load_seconds = Gauge(
            "uad_model_load_seconds", "Time to load each configured model at start-up (atlas included)", ["model"],
            registry=r,
        )  # fmt: skip
        for reason in REFUSAL_REASONS.values():  # present at 0 from the start, so rate() sees the first one
            self.refused_total.labels(reason)
        r.register(_StateCollector(job_counts, data_dir))
        ProcessCollector(registry=r)

    # -- node.receiver.observer.StoreObserver -------------------------------------------------------

    def stored(self, sop_class_uid: str, seconds: float) -> None:
        self.received_total.labels(sop_class_label(sop_class_uid)).inc()
        self.store_seconds.observe(seconds)

    def refused(self, status: int, seconds: float) -> None:
        self.refused_total.labels(REFUSAL_REASONS.get(status, "other")).inc()
        self.store_seconds.observe(seconds)

    # -- node.jobs.observer.JobObserver ----------------------------------------------------------------

    def stage_finished(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(max(0.0, seconds))

    def export_finished(self, destination: str, outcome: str) -> None:
        self.exports_total.labels(destination, outcome).inc()

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_load_seconds.labels(model).set(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything (reads the database and the disk: call off the event loop)."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Values read at scrape time: jobs per state from the database, free bytes of the data directory."""

    def __init__(self, job_counts: Callable[[], dict[str, int]], data_dir: Path) -> None:
        self._job_counts, self._data_dir = job_counts, data_dir

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() reads the database

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("uad_jobs", "Jobs per state (from the database)", labels=["state"])
        for state, count in self._job_counts().items():
            jobs.add_metric([state], count)
        yield jobs
        free = shutil.disk_usage(self._data_dir).free
        yield GaugeMetricFamily("uad_disk_free_bytes", "Free bytes on the data directory's file system", value=free)
