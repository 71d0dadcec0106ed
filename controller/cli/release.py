"""`jetfleet release ...`: the fleet's desired state (issue 13).

A release says which version of each model a group runs; a pin overrides it for one model
on one device. Both are operator-signed documents published retained on the broker, so a
robot converges to them on its own, with no controller running (agent/desired.py). Each
has a per-group (per-device) version that only goes up: the next one is the higher of the
broker's retained copy and this controller's history, plus one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import typer

from controller.bundles.publish import BundleConflictError, choose_bundle_url, publish_bundle
from controller.cli.common import (
    EXIT_FAILED,
    EXIT_VERIFY,
    Output,
    OutputOption,
    configure_cli_logging,
    fail,
    keyset,
    print_json,
    settings,
)
from controller.desired import releases
from controller.desired.releases import Build, ReleaseError, ReleaseSite, decode
from controller.desired.store import ReleaseStore
from controller.fleet.access import mqtt_options, open_registry
from controller.mqtt import ControllerMqtt
from controller.settings import ControllerSettings
from protocol.bundle import bundle_filename, verify_bundle
from protocol.errors import ProtocolError, VerificationError
from protocol.fsio import sha256_file
from protocol.ids import validate_id, validate_semver
from protocol.release import DesiredModel, Pins, Release
from protocol.topics import Topics
from protocol.transport import TransportConfigError

app = typer.Typer(help="The fleet's desired state: group releases and device pins.")

GroupOption = typer.Option(..., "--group", "-g", help="group name")
BundleOption = typer.Option(None, "--bundle", help="publish this .jfb first (verified)")
UrlOption = typer.Option(None, "--bundle-url", help="where devices fetch it")


# -- broker ----------------------------------------------------------------------------
def site(s: ControllerSettings) -> ReleaseSite:
    """The broker, history and operator key(s) the release commands work with."""
    try:
        ControllerMqtt(mqtt_options(s))  # TLS settings are checked on construction
    except TransportConfigError as e:
        fail(f"TLS settings: {e.reason}")
    return ReleaseSite(mqtt_options(s), Topics(s.prefix), _history(s), [keyset(s).operator])


def _history(s: ControllerSettings) -> ReleaseStore:
    return ReleaseStore(open_registry(s).conn)


def read_retained(s: ControllerSettings, topic: str, timeout: float = 10.0) -> dict[str, bytes]:
    """The retained messages on `topic` (a filter may hold +): topic -> payload."""
    try:
        return releases.read_retained(mqtt_options(s), Topics(s.prefix), topic, timeout)
    except ReleaseError as e:
        fail(e.reason, EXIT_FAILED)


# -- documents -------------------------------------------------------------------------
def publish(s: ControllerSettings, bundle: Path, model: str, version: str) -> None:
    """Verify BUNDLE is MODEL VERSION, signed by the release role, and publish it."""
    try:
        manifest = verify_bundle(bundle, keyset(s).trust, datetime.now(timezone.utc))
    except VerificationError as e:
        fail(f"bundle {bundle} failed verification [{e.code}]: {e.reason}", EXIT_VERIFY)
    except OSError as e:
        fail(f"bundle {bundle}: {e.strerror}")
    if (manifest.name, manifest.version) != (model, version):
        fail(f"bundle {bundle} is {manifest.name} {manifest.version}, not {model} {version}")
    try:
        publish_bundle(bundle.resolve(), s, model, version)
    except BundleConflictError as e:
        fail(str(e))


def published_model(
    s: ControllerSettings,
    model: str,
    version: str,
    bundle_url: str | None,
    bundle: Path | None = None,
) -> DesiredModel:
    """What devices need to fetch a published bundle (`rollout start` publishes, and so
    does --bundle here)."""
    try:
        validate_id(model, "model name")
        validate_semver(version)
    except ProtocolError as e:
        fail(e.reason)
    if bundle is not None:
        publish(s, bundle, model, version)
    path = s.bundle_dir / bundle_filename(model, version)
    if not path.is_file():
        fail(f"{model} {version} is not published: no {path} (pass --bundle FILE)")
    url, _why = choose_bundle_url(s, path, bundle_url)
    return DesiredModel(
        version=version, sha256=sha256_file(path), url=url, size=path.stat().st_size
    )


def _publish(
    s: ControllerSettings, scope: str, topic: str, current: Release | Pins | None, build: Build
) -> Release | Pins:
    try:
        return releases.publish_document(site(s), scope, topic, current, build)
    except ReleaseError as e:
        fail(e.reason, EXIT_FAILED)


def _show(doc: Release | Pins, scope: str, output: Output) -> None:
    if output is Output.json:
        print_json({"scope": scope, **doc.to_dict()})
        return
    typer.echo(f"{scope} version {doc.version} (issued {doc.issued_at.isoformat()})")
    for name, m in sorted(doc.models.items()):
        typer.echo(f"  {name} {m.version}  sha256 {m.sha256[:12]}…  {m.url}")


# -- commands --------------------------------------------------------------------------
@app.command("set")
def release_set(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="a published version of it"),
    group: str = GroupOption,
    bundle: Path | None = BundleOption,
    bundle_url: str | None = UrlOption,
    output: Output = OutputOption,
) -> None:
    """Make VERSION of MODEL the group's desired version (a new signed release)."""
    configure_cli_logging()
    s = settings(ctx)
    try:
        validate_id(group, "group name")
    except ProtocolError as e:
        fail(e.reason)
    want = published_model(s, model, version, bundle_url, bundle)
    try:
        doc = releases.set_group_release(site(s), group, model, want)
    except ReleaseError as e:
        fail(e.reason, EXIT_FAILED)
    _show(doc, f"group {group}", output)


@app.command("retry")
def release_retry(
    ctx: typer.Context,
    group: str = GroupOption,
    output: Output = OutputOption,
) -> None:
    """Republish the group's release as an explicit retry: robots that held a version back
    after it failed there try it once more."""
    configure_cli_logging()
    s = settings(ctx)
    topic = Topics(s.prefix).group_release(group)
    current = decode(Release, read_retained(s, topic).get(topic, b""))
    if not isinstance(current, Release):
        fail(f"group {group} has no release on the broker (see `jetfleet release set`)")
    doc = _publish(
        s,
        f"group:{group}",
        topic,
        current,
        lambda v, at: Release.new(
            group=group, version=v, issued_at=at, models=current.models, retry=True
        ),
    )
    _show(doc, f"group {group}", output)


@app.command("show")
def release_show(
    ctx: typer.Context,
    group: str | None = typer.Option(None, "--group", "-g", help="only this group"),
    output: Output = OutputOption,
) -> None:
    """The releases the broker holds now (what robots get on connect)."""
    configure_cli_logging()
    s = settings(ctx)
    topics = Topics(s.prefix)
    topic = topics.group_release(group) if group else f"{s.prefix}/groups/+/release"
    found = read_retained(s, topic)
    docs = [d for d in (decode(Release, p) for p in found.values()) if isinstance(d, Release)]
    if output is Output.json:
        print_json([d.to_dict() for d in sorted(docs, key=lambda d: d.group)])
        return
    if not docs:
        typer.echo("no release" + (f" for group {group}" if group else ""))
    for d in sorted(docs, key=lambda d: d.group):
        _show(d, f"group {d.group}", output)


@app.command("history")
def release_history(
    ctx: typer.Context,
    group: str | None = typer.Option(None, "--group", "-g", help="only this group"),
    output: Output = OutputOption,
) -> None:
    """Every release and pin document this controller signed, newest first."""
    configure_cli_logging()
    s = settings(ctx)
    entries = _history(s).history(f"group:{group}" if group else None)
    if output is Output.json:
        print_json(entries)
        return
    for e in entries:
        models = ", ".join(f"{n} {m['version']}" for n, m in sorted(e["models"].items()))
        typer.echo(f"{e['issued_at']}  {e['scope']} v{e['version']}: {models or '(none)'}")


def _pins(s: ControllerSettings, device: str) -> tuple[str, Pins | None]:
    try:
        validate_id(device)
    except ProtocolError as e:
        fail(e.reason)
    topic = Topics(s.prefix).device_pins(device)
    current = decode(Pins, read_retained(s, topic).get(topic, b""))
    return topic, current if isinstance(current, Pins) else None


@app.command("pin")
def release_pin(
    ctx: typer.Context,
    device: str = typer.Argument(..., help="device id"),
    model: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="a published version of it"),
    bundle: Path | None = BundleOption,
    bundle_url: str | None = UrlOption,
    output: Output = OutputOption,
) -> None:
    """Keep DEVICE on VERSION of MODEL, whatever its groups' releases say."""
    configure_cli_logging()
    s = settings(ctx)
    want = published_model(s, model, version, bundle_url, bundle)
    topic, current = _pins(s, device)
    models = {**(current.models if current else {}), model: want}
    doc = _publish(
        s,
        f"device:{device}",
        topic,
        current,
        lambda v, at: Pins.new(device=device, version=v, issued_at=at, models=models),
    )
    _show(doc, f"device {device} pins", output)


@app.command("unpin")
def release_unpin(
    ctx: typer.Context,
    device: str = typer.Argument(..., help="device id"),
    model: str | None = typer.Argument(None, help="model name (default: every pin)"),
    output: Output = OutputOption,
) -> None:
    """Let DEVICE follow its groups' releases again (for MODEL, or for every model)."""
    configure_cli_logging()
    s = settings(ctx)
    topic, current = _pins(s, device)
    held = dict(current.models) if current else {}
    if model is not None and model not in held:
        fail(f"device {device} has no pin for {model}")
    models = {n: m for n, m in held.items() if model is not None and n != model}
    doc = _publish(
        s,
        f"device:{device}",
        topic,
        current,
        lambda v, at: Pins.new(device=device, version=v, issued_at=at, models=models),
    )
    _show(doc, f"device {device} pins", output)


__all__ = ["app", "published_model", "read_retained"]
