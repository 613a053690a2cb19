"""The /metrics, /healthz and /readyz endpoints of the operator and the agent."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import prometheus_client
import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

Check = Callable[[], str | None]  # returns None when fine, else why not


def parse_bind_address(address: str) -> tuple[str, int]:
    """`:8080`, `0.0.0.0:8080` or `127.0.0.1:0`; `0` disables the server (returns port -1)."""
    if address in ("", "0"):
        return "", -1
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"bind address {address!r}: expected [host]:port, e.g. :8080")
    return host or "0.0.0.0", int(port)


class ProbeServer:
    """Serves metrics and health on one address; readiness is the AND of registered checks."""

    def __init__(self, address: str, *, registry: prometheus_client.CollectorRegistry | None = None):
        self.host, self.port = parse_bind_address(address)
        self.registry = registry or prometheus_client.REGISTRY
        self._health: dict[str, Check] = {}
        self._ready: dict[str, Check] = {}
        self.bound_port: int | None = None

    def add_health_check(self, name: str, check: Check) -> None:
        self._health[name] = check

    def add_readiness_check(self, name: str, check: Check) -> None:
        self._ready[name] = check

    @staticmethod
    def _answer(checks: dict[str, Check]) -> web.Response:
        failures = {name: reason for name, check in checks.items() if (reason := check()) is not None}
        if failures:
            body = "\n".join(f"[-] {name}: {reason}" for name, reason in sorted(failures.items()))
            return web.Response(status=503, text=body + "\n")
        return web.Response(text="ok\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def serve(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        if self.port < 0:
            task_status.started()
            await anyio.sleep_forever()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", lambda _r: self._answer(self._health))
        app.router.add_get("/livez", lambda _r: self._answer(self._health))
        app.router.add_get("/readyz", lambda _r: self._answer({**self._health, **self._ready}))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.bound_port = site._server.sockets[0].getsockname()[1]  # the real port when asked for :0
            log.info("serving probes and metrics", address=f"{self.host}:{self.bound_port}")
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
