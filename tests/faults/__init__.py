"""Fault injection against ``uad-node serve`` and real peers (issue 16 §4). See tests/faults/README.md."""
