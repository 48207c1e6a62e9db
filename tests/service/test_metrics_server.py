"""The exporter's HTTP server under load, and the warning for a metrics host other machines can reach."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest

from ngd_dist.kfac.distributed.ports import free_port
from ngd_dist.service.metrics import MetricsExporter
from ngd_dist.service.metrics.exporter import MAX_CONNECTIONS
from tests.support import http_get

SCRAPES = 200
"""Concurrent connections the server must answer (issue #9: 200 at once, each within ``ANSWER_S``)."""
ANSWER_S = 10.0
"""The most seconds one scrape may take, connecting included."""

LOGGER = "ngd_dist.service.metrics.exporter"


async def _scrape(host: str, port: int) -> tuple[int, float]:
    """GET ``/metrics`` over a connection of its own; the status code and the seconds it took."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else -1
    return status, time.monotonic() - start


async def _flood(host: str, port: int) -> list[tuple[int, float] | BaseException]:
    """``SCRAPES`` scrapes started together, each cut off after ``ANSWER_S`` seconds."""
    tasks = [asyncio.wait_for(_scrape(host, port), ANSWER_S) for _ in range(SCRAPES)]
    return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(60)
def test_200_concurrent_scrapes_each_answered_within_10_s() -> None:
    before = set(threading.enumerate())
    exporter = MetricsExporter(rank=0, world_size=1, host="127.0.0.1", port=free_port())
    try:
        results = asyncio.run(_flood(exporter.host, exporter.port))
    finally:
        exporter.close()
    late = [r for r in results if isinstance(r, BaseException)]
    statuses = sorted({r[0] for r in results if not isinstance(r, BaseException)})
    slowest = max((r[1] for r in results if not isinstance(r, BaseException)), default=0.0)
    assert not late, (
        f"{len(late)} of {SCRAPES} concurrent scrapes got no answer within {ANSWER_S:g} s "
        f"(first error: {late[0]!r}); the answered ones took up to {slowest:.1f} s"
    )
    assert statuses == [200], f"statuses {statuses}; expected only 200"
    leftover = set(threading.enumerate()) - before
    assert not leftover, f"threads left after close(): {sorted(t.name for t in leftover)}"


@pytest.mark.timeout(60)
def test_idle_connections_neither_block_scrapes_nor_grow_threads_without_bound() -> None:
    before = set(threading.enumerate())
    exporter = MetricsExporter(rank=0, world_size=1, host="127.0.0.1", port=free_port())
    address = (exporter.host, exporter.port)
    idle: list[socket.socket] = []
    try:
        # Clients that connect and say nothing hold a thread each, but do not delay a scrape.
        idle += [socket.create_connection(address, timeout=5) for _ in range(MAX_CONNECTIONS - 1)]
        start = time.monotonic()
        assert http_get(exporter.url + "/metrics", timeout=5)[0] == 200
        assert time.monotonic() - start < 2.0, "a scrape waited behind idle connections"
        # More of them than the cap: the server's threads stay bounded while they wait.
        idle += [socket.create_connection(address, timeout=5) for _ in range(50)]
        peak, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, len(set(threading.enumerate()) - before))
            time.sleep(0.01)
        assert peak <= MAX_CONNECTIONS + 1, f"{peak} threads for {len(idle)} idle connections"
        for sock in idle:
            sock.close()
        idle.clear()
        assert http_get(exporter.url + "/metrics", timeout=5)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        exporter.close()
    leftover = set(threading.enumerate()) - before
    assert not leftover, f"threads left after close(): {sorted(t.name for t in leftover)}"


@pytest.mark.timeout(30)
def test_warning_names_a_non_loopback_host_and_only_that(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port("0.0.0.0")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for host in ("127.0.0.1", "localhost"):
            with MetricsExporter(rank=0, world_size=1, host=host, port=free_port()) as ex:
                assert ex.enabled
        assert [r.getMessage() for r in caplog.records] == [], "a loopback host logged a warning"
        with MetricsExporter(rank=0, world_size=1, host="0.0.0.0", port=port):
            pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"0.0.0.0:{port}" in warnings[0], warnings[0]
    assert "other machines" in warnings[0], warnings[0]
