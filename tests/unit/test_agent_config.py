"""The agent's settings: precedence and errors that name the setting."""

from __future__ import annotations

import pytest

from fabric.agent.config import ConfigError, load
from fabric.agent.main import build_parser


def parse(argv, env=None, tmp_path=None, toml=""):
    parser = build_parser()
    if tmp_path is not None:
        path = tmp_path / "agent.toml"
        path.write_text(toml)
        argv = ["--config", str(path), *argv]
    return load(parser.parse_args(argv), env or {})


def test_flags_beat_env_beat_file(tmp_path):
    toml = '[node]\naddress = "192.0.2.1"\nname = "from-file"\n[bgp]\nhold_time = 30\n'
    config = parse([], {}, tmp_path, toml)
    assert (config.node_name, config.hold_time) == ("from-file", 30)
    config = parse([], {"FABRIC_NODE_NAME": "from-env"}, tmp_path, toml)
    assert config.node_name == "from-env"
    config = parse(["--node-name", "from-flag"], {"FABRIC_NODE_NAME": "x"}, tmp_path, toml)
    assert config.node_name == "from-flag"


def test_etcd_endpoints_from_the_file(tmp_path):
    toml = '[node]\naddress = "192.0.2.1"\n[etcd]\nendpoints = "http://10.0.0.1:2379"\n'
    assert parse([], {}, tmp_path, toml).etcd.describe() == "http://10.0.0.1:2379"


@pytest.mark.parametrize("argv, env, toml, message", [
    ([], {}, "", "node address is required"),
    (["--node-address", "fd00::1"], {}, "", "--node-address: 'fd00::1': must be an IPv4"),
    (["--node-address", "192.0.2.1"], {"FABRIC_HOLD_TIME": "2"}, "",
     "FABRIC_HOLD_TIME: '2': must be from 3"),
    (["--node-address", "192.0.2.1"], {}, "[bgp]\nhold_time = true\n",
     "[bgp] hold_time: True: must be a number"),
    (["--node-address", "192.0.2.1"], {}, "[bgp]\nholdtime = 9\n",
     "unknown setting [bgp] holdtime"),
    (["--node-address", "192.0.2.1", "--keepalive", "5"], {}, "",
     "keepalive 5: ExaBGP sends keepalives every hold_time / 3"),
    (["--node-address", "192.0.2.1", "--node-name", "Bad_Name"], {}, "", "--node-name"),
])
def test_errors_name_the_setting(tmp_path, argv, env, toml, message):
    with pytest.raises(ConfigError) as info:
        parse(argv, env, tmp_path, toml)
    assert message in str(info.value)


def test_keepalive_matching_hold_time_is_fine(tmp_path):
    config = parse(["--node-address", "192.0.2.1", "--keepalive", "3"], {}, tmp_path, "")
    assert (config.hold_time, config.keepalive) == (9, 3)


def test_fabric_agent_refuses_a_bad_setting_in_one_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fabric.agent.main", "--config", "/dev/null",
                             "--node-address", "192.0.2.1", "--hold-time", "1"],
                            capture_output=True, text=True, timeout=60, env={})
    assert result.returncode == 2
    assert result.stderr == "fabric-agent: --hold-time: '1': must be from 3 to 65535\n"
    checked = subprocess.run([sys.executable, "-m", "fabric.agent.main", "--config",
                              "/dev/null", "--node-address", "192.0.2.1", "--check-config"],
                             capture_output=True, text=True, timeout=60, env={})
    assert checked.returncode == 0 and "hold_time = 9" in checked.stdout


def test_the_settings_table_in_the_docs_is_the_one_the_code_describes():
    from pathlib import Path

    from fabric.agent.config import settings_table

    page = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    assert settings_table() in page, "regenerate it: python -c 'from fabric.agent.config " \
        "import settings_table; print(settings_table())'"
    assert "MISSING" not in page
