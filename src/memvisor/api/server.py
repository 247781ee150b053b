"""Serving the API from inside the daemon: uvicorn in a background thread.

The control loop owns the main thread (and the signal handlers); uvicorn runs beside it and
stops when asked. ``port=0`` picks a free port; :attr:`ApiServer.url` tells which one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from memvisor.api.auth import check_listen
from memvisor.errors import BackendError


class ApiServer:
    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 8470,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        check_listen(host, tls_cert, tls_key)
        self.host, self.tls = host, tls_cert is not None
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="memvisor-api", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise BackendError(
                    f"API server could not listen on {self.host} (port in use? see the log)"
                )
            if time.monotonic() > deadline:
                raise BackendError(f"API server did not start within {timeout:.0f} s")
            time.sleep(0.02)

    @property
    def port(self) -> int:
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise BackendError("API server is not listening")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
