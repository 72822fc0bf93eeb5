"""The /metrics server holds its ground against idle connections (loopback only)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from fabric.agent import metrics


def test_idle_connections_cost_at_most_a_few_threads_and_expire(monkeypatch):
    monkeypatch.setattr(metrics, "CLIENT_TIMEOUT", 0.5)
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: [
        metrics.Family("up", "gauge", "1", (metrics.Sample("up", 1),))])
    port = server.server.server_address[1]
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    try:
        for _ in range(20):
            time.sleep(0.1)
            assert threading.active_count() - before <= metrics.MAX_CLIENTS
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"up 1" in reply.read()  # idle ones expire (CLIENT_TIMEOUT): served
        assert server.server.refused > 0  # beyond MAX_CLIENTS: closed, no thread
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_one_source_holding_connections_open_does_not_keep_others_out(monkeypatch):
    """A container holding connections open gets MAX_PER_ADDRESS slots, not all of them:
    a scrape from another address is served while they are held."""
    import http.client
    monkeypatch.setattr(metrics, "CLIENT_TIMEOUT", 30)
    server = metrics.MetricsServer("127.0.0.1", 0, lambda: [
        metrics.Family("up", "gauge", "1", (metrics.Sample("up", 1),))])
    port = server.server.server_address[1]
    server.start()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_CLIENTS)]
    try:
        time.sleep(0.3)  # accepted (or refused) by now
        scrape = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=("127.0.0.2", 0))
        scrape.request("GET", "/metrics")
        assert b"up 1" in scrape.getresponse().read()
        scrape.close()
        assert server.server.refused >= metrics.MAX_CLIENTS - metrics.MAX_PER_ADDRESS
    finally:
        for sock in idle:
            sock.close()
        server.stop()
