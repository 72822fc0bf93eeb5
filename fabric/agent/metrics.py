"""Prometheus metrics: the text format rendered from samples (pure), served over HTTP.

Names are prefixed `l3fabric_`. Sessions by state, routes received / accepted /
rejected (by reason) / advertised per peer, routes installed, reconcile durations,
etcd errors.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # gauge or counter
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    lines = []
    for family in families:
        lines.append(f"# HELP l3fabric_{family.name} {family.help}")
        lines.append(f"# TYPE l3fabric_{family.name} {family.kind}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            suffix = f"{{{labels}}}" if labels else ""
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            lines.append(f"l3fabric_{sample.name}{suffix} {value}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, address: str, port: int, collect: Callable[[], list[Family]]) -> None:
        collect_ = collect

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                body = render(collect_()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
