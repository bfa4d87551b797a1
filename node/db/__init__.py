"""The node's state: studies, series, instances, jobs, deliveries and an audit trail, in SQLite or PostgreSQL."""

from node.db.database import open_database
from node.db.schema import Event, Instance, Job, Series, Study, Worker

__all__ = ["Event", "Instance", "Job", "Series", "Study", "Worker", "open_database"]
