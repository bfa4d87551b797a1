"""The HTTP interface inside ``uad-node serve``: health and readiness probes, Prometheus metrics, the status
page, job retry/cancel and (when given a receiver) STOW-RS, on uvicorn in a thread of the serve process."""
