"""The API process ExaBGP runs: joins ExaBGP's stdin/stdout to the agent's socket.

ExaBGP starts its API processes itself, so the agent cannot hand it a pipe; this
relay connects to the agent's local socket and copies bytes both ways until either
side closes. When it exits ExaBGP exits too (`exabgp.api.terminate`), and the agent
starts a new one. Standard library only, no parsing.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> int:
    name = sys.argv[1]
    address = "\0" + name[1:] if name.startswith("@") else name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError as exc:
        print(f"relay: cannot reach the agent on {name}: {exc}", file=sys.stderr)
        return 1
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ)
    selector.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == stdin:
                data = os.read(stdin, 1 << 20)
                if not data:
                    return 0
                sock.sendall(data)
            else:
                data = sock.recv(1 << 20)
                if not data:
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout, view):]


if __name__ == "__main__":
    sys.exit(main())
