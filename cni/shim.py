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

Sizes are bounded on both sides: the shim refuses more than MAX_STDIN bytes of
configuration before it connects, and the agent's server (`fabric.sockets.serve`)
stops reading a request past MAX_REQUEST, so no client can make the agent buffer
without limit.
"""

import os
import sys

MAGIC = b"L3CNI1"
FIELDS = ("plugin", "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
          "CNI_PATH", "stdin")
DEFAULT_SOCKET = "@l3fabric/cni"  # abstract: one per network namespace, i.e. per host
VERSIONS = b'["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'
TIMEOUT = 120.0
# A network configuration is a few KiB, with prevResult and runtimeConfig tens of KiB.
MAX_STDIN = 4 << 20
# The request adds six environment values to stdin; the kernel caps each at 128 KiB
# (MAX_ARG_STRLEN), so 1 MiB covers them and the framing.
MAX_REQUEST = MAX_STDIN + (1 << 20)
DECODE_FAILURE = 6
INVALID_CONFIG = 7
_SUPPORTED = (b"0.3.0", b"0.3.1", b"0.4.0", b"1.0.0", b"1.1.0")


def encode_request(values):
    out = [MAGIC]
    for value in values:
        out.append(b"%d:" % len(value))
        out.append(value)
        out.append(b",")
    return b"".join(out)


def decode_request(data):
    """dict of FIELDS from a request; ValueError when it is malformed.

    The messages never quote the request's bytes: callers put them in error documents.
    """
    if not data.startswith(MAGIC):
        raise ValueError("not an l3fabric CNI request")
    pos, values = len(MAGIC), []
    for field in FIELDS:
        colon = data.find(b":", pos, pos + 21)
        digits = data[pos:colon]
        if colon < 0 or not digits.isdigit():
            raise ValueError(f"bad length of field {field}")
        start = colon + 1
        end = start + int(digits)
        if data[end:end + 1] != b",":
            raise ValueError(f"bad framing of field {field}")
        values.append(data[start:end])
        pos = end + 1
    return dict(zip(FIELDS, values, strict=True))


def socket_address(name):
    """`@name` is an abstract socket (bound to the network namespace), else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _version_of(stdin):
    """The request's cniVersion, found without a JSON parser (for our own errors);
    one we do not support, or none, gives the latest."""
    at = stdin.find(b'"cniVersion"')
    if at >= 0:
        start = stdin.find(b'"', stdin.find(b":", at) + 1) + 1
        end = stdin.find(b'"', start)
        if 0 < start <= end and stdin[start:end] in _SUPPORTED:
            return stdin[start:end]
    return b"1.1.0"


def _error(stdin, code, msg):
    """Print the spec's error document. Built by the JSON encoder, never by formatting:
    messages carry socket names and OS errors, which may hold quotes, backslashes or
    newlines. Imported here, so only failures pay for it."""
    import json

    doc = {"cniVersion": _version_of(stdin).decode(), "code": code, "msg": msg}
    sys.stdout.buffer.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
    return 1


def _agent_socket(stdin):
    """(socket name, None), or (None, (code, message)) when the configuration names a
    socket but cannot be decoded, or names one no socket can have."""
    if b'"agent_socket"' in stdin:  # rare: only then pay for a JSON parser
        import json
        try:
            doc = json.loads(stdin)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            return None, (DECODE_FAILURE, f"network configuration is not JSON: {exc}")
        name = doc.get("agent_socket") if isinstance(doc, dict) else None
        if isinstance(name, str) and name:
            try:
                usable = "\0" not in name and len(os.fsencode(socket_address(name))) <= 107
            except UnicodeEncodeError:  # a lone surrogate from a JSON escape
                usable = False
            if not usable:
                return None, (INVALID_CONFIG, f"agent_socket {name!r} is not a socket path "
                                              "or @name (at most 107 bytes, no NUL)")
            return name, None
    return DEFAULT_SOCKET, None


def main():
    import _socket  # the C module: `socket` would pull in enum, selectors and more

    env = os.environb  # bytes: a value that is not UTF-8 travels as it is
    command = env.get(b"CNI_COMMAND", b"")
    if command == b"VERSION":
        sys.stdout.buffer.write(b'{"cniVersion":"1.1.0","supportedVersions":%s}\n' % VERSIONS)
        return 0
    stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(stdin) > MAX_STDIN:
        return _error(stdin, DECODE_FAILURE, f"network configuration is larger than "
                                             f"{MAX_STDIN} bytes; refused unread")
    plugin = os.fsencode(os.path.basename(sys.argv[0]))
    values = [plugin] + [env.get(k.encode(), b"") for k in FIELDS[1:-1]] + [stdin]
    name, problem = _agent_socket(stdin)
    if problem:
        return _error(stdin, *problem)
    # The namespace travels as an open file descriptor, not only as a path: the agent
    # may live in another mount namespace, where the runtime's netns mount is invisible.
    netns_fd = -1
    if command in (b"ADD", b"CHECK", b"DEL") and env.get(b"CNI_NETNS"):
        try:
            netns_fd = os.open(env[b"CNI_NETNS"], os.O_RDONLY)
        except OSError:
            netns_fd = -1
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    # Connect in blocking mode, bounded by SO_SNDTIMEO: when many ADDs start at once
    # and the agent's listen backlog is full, the kernel holds the connect until there
    # is room. A socket with a Python timeout is non-blocking, and a non-blocking unix
    # connect fails at once with EAGAIN, which read as "agent not running".
    word = 8 if sys.maxsize > 2**32 else 4  # struct timeval: two longs
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO,
                    int(TIMEOUT).to_bytes(word, sys.byteorder) + bytes(word))
    try:
        sock.connect(socket_address(name))
        sock.settimeout(TIMEOUT)
    except OSError:
        sock.close()
        if command == b"STATUS":
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
        return _error(stdin, 11, f"l3fabric agent did not answer ({name}): {exc}")
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
