"""The node's state: studies, series, instances and an audit trail, in SQLite or PostgreSQL."""

from node.db.database import open_database
from node.db.schema import Event, Instance, Series, Study

__all__ = ["Event", "Instance", "Series", "Study", "open_database"]
