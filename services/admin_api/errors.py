"""The admin API's error shape, ``{"status": <HTTP status>, "message": "..."}`` for every error, and what a
Postgres outage answers: 503 + ``Retry-After`` with one WARNING per outage, never a traceback per request."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from provisioning_common.db.guard import DB_UNAVAILABLE
from provisioning_common.outage import OutageLog
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import PATTERN_MESSAGES


async def http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"status": exc.status_code, "message": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def validation_error(_: Request, exc: Exception) -> Response:
    """400 (not FastAPI's 422) with one line per problem, ``field: what is wrong``; a pattern mismatch is
    said in words (``must not contain control characters``), never by quoting the pattern."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        pattern = (err.get("ctx") or {}).get("pattern")
        msg = PATTERN_MESSAGES.get(pattern, err.get("msg")) if isinstance(pattern, str) else err.get("msg")
        parts.append(f"{where}: {msg}" if where else str(msg))
    return JSONResponse({"status": 400, "message": "; ".join(parts)}, status_code=400)


def install(app: FastAPI) -> None:
    """The error handlers, and the database-outage handler with the middleware that notices its end."""
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    db_outage = OutageLog(logging.getLogger("admin_api"), "Postgres")

    async def database_unavailable(_: Request, exc: Exception) -> Response:
        """Postgres down or restarting: 503 "retry later", one WARNING per outage, no traceback."""
        db_outage.failed(type(exc).__name__)
        return JSONResponse({"status": 503, "message": "database unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": "1"})

    for exc_type in DB_UNAVAILABLE:
        if issubclass(exc_type, Exception):
            app.add_exception_handler(exc_type, database_unavailable)

    @app.middleware("http")
    async def database_back(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        if db_outage.down and response.status_code < 500:
            db_outage.recovered()
        return response
