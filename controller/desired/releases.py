"""The fleet's desired state on the controller side: sign and publish group releases and
device pins (issue 13). `jetfleet release ...` and a rollout that completes both go through
`set_group_release` / `publish_document`, so a release has one way onto the broker.

Each document's version only goes up: the next one is the higher of the broker's retained
copy and this controller's history (controller/desired/store.py), plus one. The broker
is untrusted; the devices verify what they get (agent/desired.py).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import structlog

from controller.desired.store import ReleaseStore
from controller.mqtt import ControllerMqtt, MqttError, MqttOptions
from controller.rollouts.store import SUCCEEDED, Rollout
from protocol.dsse import Envelope
from protocol.errors import CodedError, ProtocolError
from protocol.keys import SigningKey
from protocol.release import DesiredModel, Pins, Release, sign_release
from protocol.topics import Topics

log = structlog.get_logger("jetfleet.releases")


class ReleaseError(CodedError):
    """The broker could not be read or written; nothing was recorded."""

    code = "release_broker"


@dataclass(frozen=True)
class ReleaseSite:
    """Where releases live: the broker (read and written retained) and the controller's
    database (history), and the operator role's key(s) that sign."""

    options: MqttOptions
    topics: Topics
    history: ReleaseStore
    operator_keys: list[SigningKey]


# -- broker ----------------------------------------------------------------------------
def read_retained(
    options: MqttOptions, topics: Topics, topic: str, timeout: float = 10.0
) -> dict[str, bytes]:
    """The retained messages on `topic` (a filter may hold +): topic -> payload. A marker
    published after the subscription arrives after them, so its arrival means all came."""
    marker = f"{topics.prefix}/controller/sync/{uuid.uuid4().hex}"
    got: dict[str, bytes] = {}
    done = threading.Event()

    def on_message(t: str, payload: bytes, retained: bool) -> None:
        if t == marker:
            done.set()
        elif payload:
            got[t] = payload

    try:
        with ControllerMqtt(options).connect(timeout=timeout) as m:
            m.set_handler(on_message)
            m.subscribe([marker, topic], timeout=timeout)
            m.publish(marker, b"sync", qos=1)
            done.wait(timeout)
    except MqttError as e:
        raise ReleaseError(f"broker {options.broker}: {e}") from None
    return got


def publish_retained(options: MqttOptions, topic: str, payload: bytes) -> None:
    try:
        with ControllerMqtt(options).connect() as m:
            m.publish(topic, payload, qos=1, retain=True)
    except MqttError as e:
        raise ReleaseError(f"broker {options.broker}: {e}") from None


def decode(cls: type[Release] | type[Pins], payload: bytes) -> Release | Pins | None:
    """A retained document, read without verifying it (the devices verify)."""
    try:
        return cls.decode(Envelope.decode(payload).payload_bytes())
    except ProtocolError:
        return None


def current_release(site: ReleaseSite, group: str) -> Release | None:
    topic = site.topics.group_release(group)
    doc = decode(Release, read_retained(site.options, site.topics, topic).get(topic, b""))
    return doc if isinstance(doc, Release) else None


# -- documents -------------------------------------------------------------------------
Build = Callable[[int, datetime], Release | Pins]


def publish_document(
    site: ReleaseSite, scope: str, topic: str, current: Release | Pins | None, build: Build
) -> Release | Pins:
    """Sign the next version of a document (`build(version, issued_at)`), publish it
    retained on `topic`, and record it in the history."""
    version = max(current.version if current else 0, site.history.last_version(scope)) + 1
    doc = build(version, datetime.now(timezone.utc))
    envelope = sign_release(doc, site.operator_keys).encode()
    publish_retained(site.options, topic, envelope)
    site.history.record(scope, doc, envelope)
    return doc


def set_group_release(
    site: ReleaseSite, group: str, model: str, want: DesiredModel, *, only_if_changed: bool = False
) -> Release | None:
    """Make `want` the group's desired version of `model` (its other models unchanged):
    a new signed release. With `only_if_changed`, nothing is published when the retained
    release already says exactly that (returns None)."""
    current = current_release(site, group)
    if only_if_changed and current is not None and current.models.get(model) == want:
        return None
    models = {**(current.models if current else {}), model: want}
    doc = publish_document(
        site,
        f"group:{group}",
        site.topics.group_release(group),
        current,
        lambda v, at: Release.new(group=group, version=v, issued_at=at, models=models),
    )
    assert isinstance(doc, Release)
    return doc


def target_groups(target: str) -> list[str]:
    """The groups a rollout's --target names (`group:NAME`); none for ids or `all`."""
    target = target.strip()
    return [target[6:]] if target.startswith("group:") else []


def release_after_rollout(site: ReleaseSite, rollout: Rollout) -> list[str]:
    """A deploy rollout that completed makes its version the release of the groups it
    targeted, so robots that missed it (offline, skipped, added later) converge to it. An
    aborted one, or one that targets ids or `all`, leaves releases as they are. Returns
    the groups whose release it set; a broker that fails is logged, not raised (the
    rollout succeeded either way; `jetfleet release set` repairs it)."""
    if rollout.state != SUCCEEDED or rollout.kind != "deploy":
        return []
    assert rollout.bundle_url and rollout.bundle_sha256 and rollout.bundle_size
    want = DesiredModel(
        version=rollout.version,
        sha256=rollout.bundle_sha256,
        url=rollout.bundle_url,
        size=rollout.bundle_size,
    )
    done = []
    for group in target_groups(rollout.target):
        try:
            doc = set_group_release(site, group, rollout.model, want, only_if_changed=True)
        except ReleaseError as e:
            log.error("release_not_set", rollout_id=rollout.id, group=group, reason=e.reason)
            continue
        if doc is not None:
            log.info("release_set", rollout_id=rollout.id, group=group, version=doc.version)
        done.append(group)
    return done
