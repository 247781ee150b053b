"""Moves bytes between an :class:`~memvisor.agent.host.AgentSession` and the guest's port.

QEMU exposes the guest's virtio-serial port as a unix socket server (``-chardev
socket,path=...,server=on,wait=off``; one client at a time). :class:`AgentLink` connects,
reads at most ``read_budget`` bytes per step (so a flooding guest costs bounded CPU; the
session's own rate limits drop the excess), writes what the session wants sent, and
reconnects after the socket drops. When the session is ``lost`` it closes the socket and
tries again after ``lost_retry_s``. :meth:`AgentLink.start` runs it on a thread; use
``with link.lock:`` around calls into the session from other threads.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading

from memvisor.agent.host import AgentSession, AgentState

log = logging.getLogger(__name__)


class AgentLink:
    def __init__(
        self,
        session: AgentSession,
        socket_path: str,
        read_budget: int = 64 * 1024,
        retry_s: float = 0.5,
        lost_retry_s: float = 30.0,
    ) -> None:
        self.session, self.socket_path = session, socket_path
        self.read_budget, self.retry_s, self.lost_retry_s = read_budget, retry_s, lost_retry_s
        self.lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._pending = b""
        self._next_try = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, timeout: float = 0.2) -> None:
        """One round: connect if needed, read, write, tick the session."""
        clock = self.session.clock
        if self._sock is None:
            if clock.now() >= self._next_try:
                self._connect()
            if self._sock is None:
                self._stop.wait(min(timeout, self.retry_s))
                with self.lock:
                    self.session.tick()
                return
        assert self._sock is not None
        with self.lock:
            self._pending += self.session.outgoing()
        events = select.POLLIN | (select.POLLOUT if self._pending else 0)
        poller = select.poll()
        poller.register(self._sock, events)
        for _, ev in poller.poll(int(timeout * 1000)):
            if ev & select.POLLOUT:
                self._write()
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read()
        with self.lock:
            self.session.tick()
            if self.session.state is AgentState.LOST and self._sock is not None:
                log.warning("agent %s lost: closing its channel", self.session.vm)
                self._close(self.lost_retry_s)

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            self._next_try = self.session.clock.now() + self.retry_s
            return
        sock.setblocking(False)
        self._sock, self._pending = sock, b""
        with self.lock:
            self.session.connected()

    def _read(self) -> None:
        assert self._sock is not None
        with self.lock:
            allowance = min(self.read_budget, self.session.input_allowance())
        if allowance <= 0:
            self._stop.wait(0.05)  # over its byte rate: let the guest's writes block
            return
        try:
            data = self._sock.recv(allowance)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self.lock:
            if data:
                self.session.receive(data)
                return
            self.session.disconnected()
        self._close(self.retry_s)

    def _write(self) -> None:
        assert self._sock is not None
        try:
            n = self._sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError:
            with self.lock:
                self.session.disconnected()
            self._close(self.retry_s)
            return
        self._pending = self._pending[n:]

    def _close(self, retry_after: float) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._next_try = self.session.clock.now() + retry_after

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.session.vm}")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a bug must not kill the manager; it is logged and retried
                log.exception("agent link %s failed; reconnecting", self.session.vm)
                self._close(self.retry_s)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._close(0.0)
