"""Connections that cannot hold the server: a deadline for request headers, and idle connections
evicted before anyone is refused.

uvicorn counts every open connection against its ``limit_concurrency`` and answers 503 to all
requests once it is reached, while a connection that never sends (or trickles) its headers is
never closed: 256 idle sockets starved every client for as long as they stayed open. uvicorn has
no setting for either, so routetune's own protocol class (a subclass of uvicorn's, passed as
``http=``) adds them:

* a connection waiting for a request's headers (after connecting, or after its last response)
  for longer than ``header_timeout_s`` is closed;
* past ``max_connections``, a new connection evicts one that is waiting for headers: first one
  that has never completed a request (a flood's connections never do), the longest waiting; only
  if there is none, an idle keep-alive connection that has been served; only when every
  connection has a request in flight is the new one refused. (Evicting the longest waiting alone
  closed the ordinary clients' keep-alive connections under a flood that reconnects at once: its
  own connections were always the youngest.)

Requests in flight are never closed here: their bodies and answers have their own deadlines
(serve/limits.py). Each close is counted in ``/metrics`` (``routetune_connections_closed_total``
by reason) and summed up in the log at most once every ten seconds.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("routetune")

REASONS = ("header_timeout", "evicted", "refused")


def _base_protocol():
    """uvicorn's HTTP protocol class as `http="auto"` picks it (httptools if installed, else h11)."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol


class ConnectionGuard:
    """What the protocol class reports to: counters in the app's metrics and a summarised log."""

    def __init__(self, metrics, header_timeout_s: float, max_connections: int, log_every_s: float = 10.0):
        self.metrics, self.header_timeout_s, self.max_connections = metrics, header_timeout_s, max_connections
        self.log_every_s, self.last_log, self.pending = log_every_s, 0.0, dict.fromkeys(REASONS, 0)

    def closed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_closed.labels(reason).inc()
        self.pending[reason] += 1
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            log.warning("closed connections that held the server: %s (header deadline %.1f s, at most %d open)",
                        ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.pending.items() if n),
                        self.header_timeout_s, self.max_connections)
            self.last_log, self.pending = now, dict.fromkeys(REASONS, 0)

    def protocol(self):
        """The protocol class for uvicorn.Config(http=...)."""
        guard, base = self, _base_protocol()

        class GuardedProtocol(base):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                self.rt_waiting_since, self.rt_served = time.monotonic(), 0
                self.rt_timer = self.loop.call_later(guard.header_timeout_s, self.rt_check)
                if guard.metrics is not None:
                    guard.metrics.connections.set(len(self.connections))
                if len(self.connections) > guard.max_connections:
                    guard.admit(self)

            def connection_lost(self, exc) -> None:
                self.rt_timer.cancel()
                super().connection_lost(exc)
                if guard.metrics is not None:
                    guard.metrics.connections.set(len(self.connections))

            def on_response_complete(self) -> None:
                super().on_response_complete()
                self.rt_waiting_since, self.rt_served = time.monotonic(), self.rt_served + 1
                self.rt_timer.cancel()
                self.rt_timer = self.loop.call_later(guard.header_timeout_s, self.rt_check)

            def rt_waiting(self) -> bool:
                """No request in flight: waiting for (the rest of) a request's headers."""
                return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

            def rt_check(self) -> None:
                if self.rt_waiting() and not self.transport.is_closing():
                    self.transport.close()
                    guard.closed("header_timeout")

            def rt_close(self, reason: str) -> None:
                self.transport.close()
                guard.closed(reason)

        return GuardedProtocol

    def admit(self, new) -> None:
        """Over the cap: close a connection waiting for headers (not the new one), never served
        before served, the longest waiting first; if every other connection has a request in
        flight, the new one."""
        waiting = [c for c in new.connections if c is not new and c.rt_waiting() and not c.transport.is_closing()]
        if waiting:
            min(waiting, key=lambda c: (c.rt_served > 0, c.rt_waiting_since)).rt_close("evicted")
        else:
            new.rt_close("refused")
