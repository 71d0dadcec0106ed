"""`jetfleet bundle sign` after a key rotation, and what a bundle signed by a retired
release key is told (issue 19), through the real CLI on real bundles and key files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import make_mlp
from typer.testing import CliRunner, Result

from controller.cli.main import app


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("JETFLEET_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("JETFLEET_KEYS", str(tmp_path / "keys"))
    monkeypatch.setenv("JETFLEET_DB", str(tmp_path / "data" / "controller.db"))
    monkeypatch.setenv("JETFLEET_BROKER", "mqtt://127.0.0.1:1")  # never reached
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def run(cli: CliRunner, *args: str | Path) -> Result:
    return cli.invoke(app, [str(a) for a in args])


def built_before_a_rotation(cli: CliRunner, tmp_path: Path, name: str = "b.jfb") -> Path:
    model = make_mlp(tmp_path / "mlp.onnx", in_dim=8, hidden=16, out_dim=4)
    out = tmp_path / name
    r = run(cli, "bundle", "build", model, "--name", "m", "--version", "1.0.0", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_a_bundle_signed_by_a_retired_key_is_named_as_such_and_re_signed_without_rebuild(
    cli: CliRunner, tmp_path: Path
) -> None:
    assert run(cli, "keys", "init", tmp_path / "keys").exit_code == 0
    bundle = built_before_a_rotation(cli, tmp_path)
    before = json.loads(run(cli, "bundle", "inspect", bundle, "-o", "json").stdout)
    assert run(cli, "keys", "rotate").exit_code == 0

    verify = run(cli, "bundle", "verify", bundle)
    assert verify.exit_code == 3
    assert "signed by release key v1, retired by trust root v2" in verify.output
    assert f"jetfleet bundle sign {bundle}" in verify.output
    start = run(cli, "rollout", "start", bundle, "--target", "all")
    assert start.exit_code == 3
    assert "signed by release key v1, retired by trust root v2" in start.output

    signed = run(cli, "bundle", "sign", bundle, "-o", "json")
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.stdout)["retired_release_version"] == 1
    assert run(cli, "bundle", "verify", bundle).exit_code == 0
    after = json.loads(run(cli, "bundle", "inspect", bundle, "-o", "json").stdout)
    assert after["manifest"] == before["manifest"]  # the same files, not a rebuild
    assert after["signatures"] != before["signatures"]

    again = run(cli, "bundle", "sign", bundle)
    assert again.exit_code == 0 and "already signed by the current release key" in again.output


def test_a_tampered_bundle_is_not_re_signed(cli: CliRunner, tmp_path: Path) -> None:
    assert run(cli, "keys", "init", tmp_path / "keys").exit_code == 0
    bundle = built_before_a_rotation(cli, tmp_path)
    assert run(cli, "keys", "rotate").exit_code == 0
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))

    r = run(cli, "bundle", "sign", bundle, "--out", tmp_path / "resigned.jfb")
    assert r.exit_code == 3, r.output
    assert "does not verify against trust root v1" in r.output
    assert not (tmp_path / "resigned.jfb").exists()
    assert bundle.read_bytes() == bytes(data)
