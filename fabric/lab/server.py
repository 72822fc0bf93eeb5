"""A lab workload's servers: TCP and UDP on ports 80 and 81, IPv4 and IPv6, answering
`ok` to every connection and datagram (what `fabricctl lab probe` connects to).

Standard library only, one thread, run as `python -I -S server.py [PORT ...]` inside
the workload's network namespace; the lab starts it, records its PID and stops it by
that PID. It prints `ready` once every socket listens.
"""

from __future__ import annotations

import selectors
import socket
import sys

PORTS = (80, 81)
REPLY = b"ok\n"


def _bind(kind: int, port: int) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6 alike
        address: tuple[str, int] = ("::", port)
    except OSError:  # no IPv6 in this namespace
        sock = socket.socket(socket.AF_INET, kind)
        address = ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(ports: tuple[int, ...] = PORTS) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        selector.register(_bind(socket.SOCK_STREAM, port), selectors.EVENT_READ, "tcp")
        selector.register(_bind(socket.SOCK_DGRAM, port), selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "tcp":
                    conn, _ = sock.accept()
                    try:
                        conn.sendall(REPLY)
                    finally:
                        conn.close()
                else:
                    _, peer = sock.recvfrom(2048)
                    sock.sendto(REPLY, peer)
            except OSError:
                continue


if __name__ == "__main__":
    serve(tuple(int(p) for p in sys.argv[1:]) or PORTS)
