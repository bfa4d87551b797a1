"""The Starlette application: which path goes to which handler (``node.web.handlers``)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from node.config import NodeConfig
from node.db.database import Database
from node.web.handlers import WebHandlers
from node.web.health import ReadinessChecks
from node.web.metrics import NodeMetrics
from node.web.page import StatusPage
from node.web.stow import StowReceiver


def create_app(
    config: NodeConfig,
    db: Database,
    checks: ReadinessChecks,
    metrics: NodeMetrics,
    stow: StowReceiver | None = None,
) -> Starlette:
    """The node's HTTP interface; ``POST /dicomweb/studies`` (STOW-RS) exists only when ``stow`` is given."""
    handlers = WebHandlers(config=config, db=db, checks=checks, metrics=metrics, page=StatusPage(config), stow=stow)
    routes = [
        Route("/", handlers.status_page, methods=["GET"]),
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/readyz", handlers.readyz, methods=["GET"]),
        Route("/metrics", handlers.metrics_text, methods=["GET"]),
        Route("/jobs/{job_id:int}/summary.png", handlers.summary_png, methods=["GET"]),
        Route("/jobs/{job_id:int}/retry", handlers.retry, methods=["POST"]),
        Route("/jobs/{job_id:int}/cancel", handlers.cancel, methods=["POST"]),
    ]
    if stow is not None:
        routes.append(Route("/dicomweb/studies", handlers.stow_rs, methods=["POST"]))
    return Starlette(routes=routes)
