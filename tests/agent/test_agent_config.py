"""agent.toml (docs/agent.md) with environment overrides; errors name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

DOCUMENTED_EXAMPLE = """
device_id = "robot-0042"
groups = ["warehouse-a", "canary"]
data_dir = "/var/lib/jetfleet"
trust_root = "/etc/jetfleet/trust.json"
backend = "auto"
[broker]
url = "mqtt://broker.local:1883"
protocol = 5
ca = ""
cert = ""
key = ""
[activation]
hook = ""
health = ""
[telemetry]
interval_s = 5
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_spec_example_loads(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, DOCUMENTED_EXAMPLE))
    assert c.device_id == "robot-0042" and c.groups == ["warehouse-a", "canary"]
    assert c.broker.protocol == "5" and c.telemetry.interval_s == 5
    assert c.data_dir == Path("/var/lib/jetfleet")


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETFLEET_AGENT_BROKER__URL", "mqtts://other:8883")
    monkeypatch.setenv("JETFLEET_AGENT_BROKER__PROTOCOL", "3.1.1")
    monkeypatch.setenv("JETFLEET_AGENT_GROUPS", '["night-shift"]')
    monkeypatch.setenv("JETFLEET_AGENT_ACTIVATION__HOOK", "systemctl restart robot-ai")
    c = load_config(_write(tmp_path, DOCUMENTED_EXAMPLE))
    assert c.broker.url == "mqtts://other:8883" and c.broker.protocol == "3.1.1"
    assert c.groups == ["night-shift"]
    assert c.activation.hook == "systemctl restart robot-ai"
    assert c.device_id == "robot-0042"  # untouched keys stay from the file


def test_misspelled_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="activaton") as e:
        load_config(_write(tmp_path, 'device_id = "a"\n[activaton]\nhook = "x"\n'))
    assert e.value.key == "activaton"


def test_bad_protocol_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.protocol.*5 or 3\.1\.1"):
        load_config(_write(tmp_path, 'device_id = "a"\n[broker]\nprotocol = 4.5\n'))


def test_bad_broker_url_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.url.*mqtt://"):
        load_config(_write(tmp_path, 'device_id = "a"\n[broker]\nurl = "http://x"\n'))


def test_invalid_device_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device id"):
        load_config(_write(tmp_path, 'device_id = "Robot 42"\n'))


def test_missing_device_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"device_id.*missing"):
        load_config(_write(tmp_path, 'groups = ["a"]\n'))


def test_not_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = \n"))
