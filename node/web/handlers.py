"""The HTTP endpoints' handlers. Anything that touches the database or the disk runs in a worker thread
(``run_in_threadpool``), so the event loop only moves bytes; the C-STORE path never waits for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from node.config import NodeConfig
from node.db.database import Database
from node.jobs.store import JobError, JobRecord, JobStore
from node.status import NodeStatus, collect_jobs, collect_status, collect_workers, disk_status
from node.web.auth import refuse_write
from node.web.health import ReadinessChecks
from node.web.metrics import NodeMetrics
from node.web.page import PageData, StatusPage
from node.web.queries import recent_events
from node.web.stow import StowReceiver

# Who sent a STOW-RS instance, as its rows and the audit trail record it (the token names no one in particular).
STOW_SENDER = "STOW-RS"
# A STOW-RS request is held in memory while it is parsed: a bigger one is refused (413) before it fills the memory.
# 512 MiB is a few thousand MR slices; a sender splits a larger study into several requests.
MAX_STOW_BYTES = 512 * 2**20


@dataclass
class WebHandlers:
    """One running app's handlers and what they read."""

    config: NodeConfig
    db: Database
    checks: ReadinessChecks
    metrics: NodeMetrics
    page: StatusPage
    stow: StowReceiver | None = None

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process answers HTTP."""
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        """200 when every part is ready, else 503; the body names each part and what was found."""
        parts = await run_in_threadpool(self.checks.check)
        ready = all(part.ok for part in parts.values())
        body = {"ready": ready, "parts": {name: asdict(part) for name, part in parts.items()}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(await run_in_threadpool(self.metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    async def status_page(self, request: Request) -> Response:
        data = await run_in_threadpool(self._page_data)
        return HTMLResponse(self.page.render(data), headers={"Cache-Control": "no-store"})

    async def summary_png(self, request: Request) -> Response:
        """The picture PACS got as the job's first Secondary Capture: its summary image, or for a series that was
        not screened its NOT SCREENED notice."""
        job_id = int(request.path_params["job_id"])
        try:
            job = await run_in_threadpool(JobStore(self.db).get, job_id)
        except JobError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        folder = Path(job.results_dir) if job.results_dir else None
        found = [p for p in (folder / "summary.png", folder / "notice.png") if p.is_file()] if folder else []
        if not found:
            return JSONResponse({"error": f"job {job_id} has no summary image"}, status_code=404)
        return FileResponse(found[0], media_type="image/png", headers={"Cache-Control": "no-store"})

    async def retry(self, request: Request) -> Response:
        """``uad-node retry JOB``, over HTTP (the same ``JobStore.retry``)."""
        return await self._job_action(request, lambda store, job_id: store.retry(job_id))

    async def cancel(self, request: Request) -> Response:
        """``uad-node cancel JOB``, over HTTP (the same ``JobStore.cancel``)."""
        return await self._job_action(request, lambda store, job_id: store.cancel(job_id))

    async def stow_rs(self, request: Request) -> Response:
        """STOW-RS: the body goes untouched to the receiver, in a worker thread; its reply goes back as is."""
        if (refusal := refuse_write(request, self.config.web.token)) is not None:
            return refusal
        assert self.stow is not None  # the route exists only with a receiver
        body = await _bounded_body(request, MAX_STOW_BYTES)
        if body is None:
            return JSONResponse({"error": f"request larger than {MAX_STOW_BYTES} bytes; send fewer instances"}, 413)
        host = request.client.host if request.client else ""
        content_type = request.headers.get("content-type", "")
        reply = await run_in_threadpool(self.stow.receive, body, content_type, STOW_SENDER, host=host)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    async def _job_action(self, request: Request, action: Callable[[JobStore, int], JobRecord]) -> Response:
        if (refusal := refuse_write(request, self.config.web.token)) is not None:
            return refusal
        job_id = int(request.path_params["job_id"])
        store = JobStore(self.db)
        try:
            await run_in_threadpool(store.get, job_id)
        except JobError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        try:
            job = await run_in_threadpool(action, store, job_id)
        except JobError as exc:  # wrong state: the admin's request conflicts with where the job is
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse(
            {"id": job.id, "state": str(job.state), "reason": job.reason, "cancel_requested": job.cancel_requested}
        )

    def _page_data(self) -> PageData:
        status = NodeStatus(
            disk=disk_status(self.config.node),
            studies=collect_status(self.db),
            jobs=collect_jobs(self.db),
            workers=collect_workers(self.db),
        )
        return PageData(status=status, events=recent_events(self.db), readiness=self.checks.check())


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it exceeds ``limit`` bytes (by its Content-Length or as it streams in)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
