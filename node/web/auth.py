"""The bearer token that guards write actions (job retry and cancel, STOW-RS)."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


def refuse_write(request: Request, token: str) -> Response | None:
    """None when the request may write; otherwise the answer to send: 403 when no token is configured (write
    actions are off), 401 with a ``WWW-Authenticate`` challenge for a missing or wrong bearer token."""
    if not token:
        return JSONResponse({"error": "write actions are disabled: [web] token is empty"}, status_code=403)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return JSONResponse(
            {"error": "a valid bearer token is required"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="uad-node"'},
        )
    return None
