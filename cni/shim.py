"""The executable a container runtime runs: forwards the request to the node agent.

Start-up cost is the product here (runtimes exec the plugin once per container), so
this file imports nothing beyond what the interpreter has already loaded, and
`fabricctl cni install` copies it as a standalone script run with `python -SI`
(no site-packages, no environment). It must stay a single self-contained file.

Wire format on the agent's unix socket (the agent imports `encode_request`'s
counterpart `decode_request` from here, so both sides share one definition):
  request:  b"L3CNI1" then fields as netstrings `<len>:<bytes>,`:
            plugin, CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS,
            CNI_PATH, stdin; then the client shuts down its write side.
  response: b"<exit status>\n" then the bytes to print on stdout.
  For ADD, CHECK and DEL the network namespace also travels as an open descriptor
  (SCM_RIGHTS with the first bytes of the request).
"""

import os
import sys

MAGIC = b"L3CNI1"
FIELDS = ("plugin", "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
          "CNI_PATH", "stdin")
DEFAULT_SOCKET = "@l3fabric/cni"  # abstract: one per network namespace, i.e. per host
VERSIONS = b'["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'
TIMEOUT = 120.0


def encode_request(values):
    out = [MAGIC]
    for value in values:
        out.append(b"%d:" % len(value))
        out.append(value)
        out.append(b",")
    return b"".join(out)


def decode_request(data):
    """dict of FIELDS from a request; ValueError when it is malformed."""
    if not data.startswith(MAGIC):
        raise ValueError("not an l3fabric CNI request")
    pos, values = len(MAGIC), []
    for _ in FIELDS:
        colon = data.index(b":", pos)
        length = int(data[pos:colon])
        start = colon + 1
        end = start + length
        if data[end:end + 1] != b",":
            raise ValueError("bad field framing")
        values.append(data[start:end])
        pos = end + 1
    return dict(zip(FIELDS, values, strict=True))


def socket_address(name):
    """`@name` is an abstract socket (bound to the network namespace), else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _version_of(stdin):
    """The request's cniVersion, found without a JSON parser (for our own errors)."""
    at = stdin.find(b'"cniVersion"')
    if at >= 0:
        start = stdin.find(b'"', stdin.find(b":", at) + 1) + 1
        end = stdin.find(b'"', start)
        if 0 < start <= end and end - start < 16:
            return stdin[start:end]
    return b"1.1.0"


def _error(stdin, code, msg):
    sys.stdout.buffer.write(b'{"cniVersion":"%s","code":%d,"msg":"%s"}\n'
                            % (_version_of(stdin), code, msg.encode()))
    return 1


def _agent_socket(stdin):
    if b'"agent_socket"' in stdin:  # rare: only then pay for a JSON parser
        import json
        try:
            name = json.loads(stdin).get("agent_socket")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            return name
    return DEFAULT_SOCKET


def main():
    import _socket  # the C module: `socket` would pull in enum, selectors and more

    env = os.environ
    command = env.get("CNI_COMMAND", "")
    stdin = sys.stdin.buffer.read() if command != "VERSION" else b""
    if command == "VERSION":
        sys.stdout.buffer.write(b'{"cniVersion":"1.1.0","supportedVersions":%s}\n' % VERSIONS)
        return 0
    plugin = os.path.basename(sys.argv[0]).encode()
    values = [plugin] + [env.get(k, "").encode() for k in FIELDS[1:-1]] + [stdin]
    name = _agent_socket(stdin)
    # The namespace travels as an open file descriptor, not only as a path: the agent
    # may live in another mount namespace, where the runtime's netns mount is invisible.
    netns_fd = -1
    if command in ("ADD", "CHECK", "DEL") and env.get("CNI_NETNS"):
        try:
            netns_fd = os.open(env["CNI_NETNS"], os.O_RDONLY)
        except OSError:
            netns_fd = -1
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(socket_address(name))
    except OSError:
        sock.close()
        if command == "STATUS":
            return _error(stdin, 50, f"l3fabric agent is not running on this host ({name})")
        return _error(stdin, 11, f"l3fabric agent is not running on this host ({name}); "
                                 "start fabric-agent and try again")
    try:
        payload = encode_request(values)
        if netns_fd >= 0:
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                       netns_fd.to_bytes(4, sys.byteorder))]
            sent = sock.sendmsg([payload], rights)
            sock.sendall(payload[sent:])
        else:
            sock.sendall(payload)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        detail = str(exc).replace('"', "'")
        return _error(stdin, 11, f"l3fabric agent did not answer ({name}): {detail}")
    finally:
        sock.close()
    reply = b"".join(chunks)
    status, _, output = reply.partition(b"\n")
    if not status.isdigit():
        return _error(stdin, 11, "l3fabric agent gave a malformed answer")
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
