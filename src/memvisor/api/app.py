"""The HTTP API: FastAPI app over the store (reads) and the daemon (changes).

Read endpoints serve what the control loop records; change endpoints make the same changes as
the CLI, through the daemon's :class:`Controller` (``set_reservation`` goes through admission
control). Every ``/api`` route and ``/metrics`` need the bearer token; the dashboard's static
files and the OpenAPI document do not (they hold no host data). Errors are JSON objects
``{"error": TYPE, "message": TEXT}`` with 404 (not found), 409 (refused by admission), 422
(bad input) or 500.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from memvisor import __version__
from memvisor.api import metrics
from memvisor.api.auth import token_matches
from memvisor.errors import AdmissionError, InputError, MemvisorError, NotFoundError
from memvisor.store import Row, Store
from memvisor.units import parse_size

STATIC_DIR = Path(__file__).parent / "static"


class Controller(Protocol):
    """What the running daemon offers the API beyond the store."""

    def info(self) -> dict[str, Any]:
        """Daemon facts: backend, interval, pid, start time, state thresholds (bytes)."""
        ...

    def pools(self) -> dict[str, Any]:
        """The pool tree with reservations, as nested JSON."""
        ...

    def set_reservation(self, vm: str, reservation: int) -> dict[str, Any]:
        """Change a VM's reservation through admission control; raises AdmissionError."""
        ...


class ReservationChange(BaseModel):
    reservation: str | int  # "512MiB" or bytes


def _status_for(exc: MemvisorError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, AdmissionError):
        return 409
    if isinstance(exc, InputError):
        return 422
    return 500


def create_app(store: Store, controller: Controller, token: str) -> FastAPI:
    app = FastAPI(
        title="memvisor",
        version=__version__,
        description="Memory resource manager for hosts running many QEMU VMs.",
        docs_url=None,  # Swagger UI would load scripts from a CDN; the spec is at /openapi.json
        redoc_url=None,
    )

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token_matches(token, authorization):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (see STATE/api-token)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(MemvisorError)
    async def memvisor_error(request: Request, exc: MemvisorError) -> JSONResponse:
        return JSONResponse(
            status_code=_status_for(exc),
            content={"error": type(exc).__name__, "message": str(exc)},
        )

    auth = [Depends(require_token)]
    _add_read_routes(app, store, controller, auth)

    @app.put("/api/v1/vms/{name}/reservation", dependencies=auth, tags=["changes"])
    def set_reservation(name: str, change: ReservationChange) -> dict[str, Any]:
        """Change a VM's reservation live, through admission control (409 if refused)."""
        size = parse_size(change.reservation, what=f"{name} reservation")
        return controller.set_reservation(name, size)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse, tags=["metrics"])
    def prometheus() -> PlainTextResponse:
        text = metrics.render(
            store.latest_host(), store.latest_vms(), store.counters(), store.hit_counts()
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def _add_read_routes(app: FastAPI, store: Store, controller: Controller, auth: Any) -> None:
    @app.get("/api/v1/info", dependencies=auth, tags=["read"])
    def info() -> dict[str, Any]:
        return {"version": __version__, **controller.info()}

    @app.get("/api/v1/host", dependencies=auth, tags=["read"])
    def host() -> Row:
        row = store.latest_host()
        if row is None:
            raise NotFoundError("no observation recorded yet (is the control loop running?)")
        return row

    @app.get("/api/v1/host/history", dependencies=auth, tags=["read"])
    def host_history(
        seconds: Annotated[float, Query(gt=0, le=7 * 86400)] = 600,
        points: Annotated[int, Query(gt=0, le=5000)] = 600,
    ) -> list[Row]:
        return store.host_history(time.time() - seconds, points)

    @app.get("/api/v1/vms", dependencies=auth, tags=["read"])
    def vms() -> list[Row]:
        return store.latest_vms()

    @app.get("/api/v1/vms/{name}", dependencies=auth, tags=["read"])
    def vm(name: str) -> Row:
        for row in store.latest_vms():
            if row["vm"] == name:
                return row
        raise NotFoundError(f"VM {name!r}: not in the latest observation")

    @app.get("/api/v1/vms/{name}/history", dependencies=auth, tags=["read"])
    def vm_history(
        name: str,
        seconds: Annotated[float, Query(gt=0, le=7 * 86400)] = 600,
        points: Annotated[int, Query(gt=0, le=5000)] = 600,
    ) -> list[Row]:
        return store.vm_history(name, time.time() - seconds, points)

    @app.get("/api/v1/pools", dependencies=auth, tags=["read"])
    def pools() -> dict[str, Any]:
        return controller.pools()

    @app.get("/api/v1/decisions", dependencies=auth, tags=["read"])
    def decisions(
        limit: Annotated[int, Query(gt=0, le=1000)] = 50, vm: str | None = None
    ) -> list[Row]:
        return store.decisions(limit, vm)

    @app.get("/api/v1/actions", dependencies=auth, tags=["read"])
    def actions(limit: Annotated[int, Query(gt=0, le=1000)] = 50) -> list[Row]:
        return store.actions(limit)

    @app.get("/api/v1/events", dependencies=auth, tags=["read"])
    def events(
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(gt=0, le=1000)] = 100,
        vm: str | None = None,
    ) -> list[Row]:
        return store.events(after, limit, vm)

    @app.get("/api/v1/hits", dependencies=auth, tags=["read"])
    def hits(limit: Annotated[int, Query(gt=0, le=1000)] = 50, vm: str | None = None) -> list[Row]:
        return store.hits(limit, vm)
