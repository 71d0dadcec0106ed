"""Fixtures shared by the controller's tests: operator keys, the CLI's environment on a
real broker, a signed bundle (version 2.0.0), and a witness of every command sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet import CommandCounter, build_bundle, cli_env

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet, init_keys


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    return init_keys(tmp_path / "keys")


@pytest.fixture
def env(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> dict[str, str]:
    return cli_env(tmp_path, mosquitto.url, tmp_path / "keys")


@pytest.fixture
def bundle(tmp_path: Path, keys: KeySet) -> Path:
    return build_bundle(tmp_path / "build", keys.release, version="2.0.0")


@pytest.fixture
def counter(mosquitto: LocalMosquitto) -> Iterator[CommandCounter]:
    c = CommandCounter(mosquitto.url)
    yield c
    c.close()
