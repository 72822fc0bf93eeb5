"""CNI input edge cases: each one gets the spec's error code and a message naming it.

The parser is tested directly; the shim is exec'd the way a runtime execs it
(`python -SI`, CNI_* environment, config on stdin), with agent sockets nobody
listens on, so every document here is one the shim built itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni import shim
from cni.install import InstallError, conflist, install
from cni.netconf import MAX_CONTAINER_ID, MAX_DEPTH, network_name_problem, parse_request
from cni.spec import CniError
from fabric import sockets
from fabric.model.handles import MAX_HANDLE, check_handle

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0"}
CONF = {"cniVersion": "1.0.0", "name": "net", "type": "l3fabric"}
SHIM = Path(shim.__file__)
# Abstract names no agent listens on, unique to this test process.
NOBODY = f"@l3fabric-test-{os.getpid()}/nobody"


def refused(env: dict[str, str] | None = None, conf: dict[str, object] | None = None,
            raw: bytes | None = None) -> CniError:
    stdin = raw if raw is not None else json.dumps({**CONF, **(conf or {})}).encode()
    with pytest.raises(CniError) as info:
        parse_request({**ENV, **(env or {})}, stdin, "l3fabric")
    return info.value


@pytest.mark.parametrize(("conf", "field"), [
    ({"ipam": {"families": [[4]]}}, "ipam.families"),
    ({"ipam": {"families": [4.0]}}, "ipam.families"),
    ({"ipam": {"families": [True]}}, "ipam.families"),
    ({"ipam": []}, "ipam must be a JSON object, not a list"),
    ({"ipam": ""}, "ipam must be a JSON object, not a string"),
    ({"ipam": 0}, "ipam must be a JSON object, not a number"),
    ({"dns": []}, "dns must be a JSON object, not a list"),
    ({"dns": False}, "dns must be a JSON object, not a boolean"),
    ({"runtimeConfig": []}, "runtimeConfig must be a JSON object"),
    ({"prevResult": []}, "prevResult must be a JSON object"),
    ({"ipam": {"routes": {}}}, "ipam.routes"),
    ({"ipam": {"routes": [{"dst": "0.0.0.0/0", "gw": 5}]}}, "ipam.routes"),
    ({"name": "prod\n"}, "network name"),
])
def test_wrong_types_are_invalid_config(conf, field):
    error = refused(conf=conf)
    assert error.code == 7
    assert field in error.msg


def test_null_fields_are_absent():
    req = parse_request(ENV, json.dumps({**CONF, "ipam": None, "dns": None}).encode())
    assert req.conf.dns == {} and req.conf.families == (4,)


def test_nesting_past_the_decoder_is_a_decode_failure():
    deep = b'{"cniVersion":"1.0.0","name":"n","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = refused(raw=deep)
    assert error.code == 6 and "nests too deeply" in error.msg


def test_nesting_is_bounded_below_the_recursion_limit():
    nested: object = {}
    for _ in range(MAX_DEPTH):
        nested = {"a": nested}
    error = refused(conf={"runtimeConfig": nested})
    assert error.code == 6 and f"more than {MAX_DEPTH} levels" in error.msg
    shallow: object = {}
    for _ in range(MAX_DEPTH - 2):
        shallow = {"a": shallow}
    parse_request(ENV, json.dumps({**CONF, "runtimeConfig": shallow}).encode())


def test_container_id_longer_than_a_handle_allows():
    error = refused(env={"CNI_CONTAINERID": "a" * 300})
    assert error.code == 4
    assert "CNI_CONTAINERID" in error.msg and f"at most {MAX_CONTAINER_ID}" in error.msg
    assert "a" * 50 not in error.msg  # the length, not the id itself
    # The longest id allowed with the longest interface name still makes a handle.
    longest = parse_request({**ENV, "CNI_CONTAINERID": "a" * MAX_CONTAINER_ID,
                             "CNI_IFNAME": "e" * 15}, json.dumps(CONF).encode())
    assert len(check_handle(longest.handle)) == MAX_HANDLE


@pytest.mark.parametrize(("env", "text"), [
    ({"CNI_IFNAME": "eth%0"}, "CNI_IFNAME"),
    ({"CNI_CONTAINERID": "abc\n"}, "CNI_CONTAINERID"),
])
def test_names_a_handle_cannot_carry_are_invalid_env(env, text):
    error = refused(env=env)
    assert error.code == 4 and text in error.msg


def test_network_name_rule_is_shared_with_install(tmp_path):
    assert network_name_problem("prod") is None
    assert "invalid" in (network_name_problem("bad name") or "")
    with pytest.raises(InstallError, match="network name 'bad name'"):
        install(str(tmp_path / "bin"), str(tmp_path / "net.d"), network="bad name")
    assert not (tmp_path / "bin").exists() and not (tmp_path / "net.d").exists()
    with pytest.raises(InstallError, match="network name"):
        install(str(tmp_path / "bin"), str(tmp_path / "net.d"), network="../escape")
    with pytest.raises(InstallError, match="families"):
        install(str(tmp_path / "bin"), None, families=(5,))
    assert conflist("ok")["name"] == "ok"


def run_shim(stdin: bytes, env: dict[str, str | bytes] | None = None
             ) -> subprocess.CompletedProcess[bytes]:
    base: dict[str | bytes, str | bytes] = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc",
                                            "CNI_IFNAME": "eth0"}
    return subprocess.run([sys.executable, "-SI", str(SHIM)], input=stdin,
                          env={**base, **(env or {})},  # type: ignore[dict-item]
                          capture_output=True, timeout=60)


def shim_error(result: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


@pytest.mark.parametrize("name", [
    NOBODY + '"quoted"', NOBODY + "\\back\\slash", NOBODY + "\nnewline", NOBODY + "\t\u00e9",
])
def test_shim_error_documents_are_json_whatever_the_socket_name(name):
    doc = shim_error(run_shim(json.dumps({**CONF, "agent_socket": name}).encode()))
    assert doc["code"] == 11 and name in str(doc["msg"])
    assert doc["cniVersion"] == "1.0.0"


def test_shim_refuses_unusable_socket_names():
    for name in ("@x\ud800", "/" + "p" * 200):
        doc = shim_error(run_shim(json.dumps({**CONF, "agent_socket": name}).encode()))
        assert doc["code"] == 7 and "agent_socket" in str(doc["msg"])


def test_shim_error_version_is_a_supported_one():
    raw = b'{"cniVersion":"1\\"0","name":"n","agent_socket":"' + NOBODY.encode() + b'"}'
    doc = shim_error(run_shim(raw))
    assert doc["cniVersion"] == "1.1.0"


def test_shim_survives_deep_nesting():
    deep = (b'{"cniVersion":"0.4.0","name":"n","agent_socket":"x","a":'
            + b"[" * 100_000 + b"]" * 100_000 + b"}")
    doc = shim_error(run_shim(deep))
    assert doc["code"] == 6 and doc["cniVersion"] == "0.4.0"


def test_shim_refuses_oversized_stdin_unread():
    big = b'{"cniVersion":"0.4.0","pad":"' + b"x" * shim.MAX_STDIN + b'"}'
    doc = shim_error(run_shim(big, {"CNI_COMMAND": "ADD"}))
    assert doc["code"] == 6 and str(shim.MAX_STDIN) in str(doc["msg"])


def test_shim_passes_environment_bytes_through():
    """A value that is not UTF-8 reaches the agent as it is (it refuses it there)."""
    raw = json.dumps({**CONF, "agent_socket": NOBODY}).encode()
    doc = shim_error(run_shim(raw, {"CNI_ARGS": b"K=\xff\xfe"}))
    assert doc["code"] == 11


def test_wire_format_errors_never_quote_the_request():
    for bad in (shim.MAGIC + b'"quote:x,', shim.MAGIC + b"-5:abc,", shim.MAGIC + b"99:x,"):
        with pytest.raises(ValueError) as info:
            shim.decode_request(bad)
        assert '"' not in str(info.value) and "abc" not in str(info.value)


def test_server_limit_fits_the_largest_shim_request():
    assert sockets.MAX_REQUEST >= shim.MAX_REQUEST > shim.MAX_STDIN


def test_installs_running_side_by_side_share_no_temporary_file(tmp_path):
    """Lab hosts install into one directory at once; a shared `.tmp` name made one
    install's rename fail when another had moved the file away."""
    import threading
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(20):
                install(str(tmp_path / "bin"), str(tmp_path / "conf"))
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["l3fabric", "l3fabric-ipam"]
    assert (tmp_path / "bin" / "l3fabric").stat().st_mode & 0o777 == 0o755
