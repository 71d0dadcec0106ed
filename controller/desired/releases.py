"""The fleet's desired state on the controller side: sign and publish group releases and
device pins (issue 13). `jetfleet release ...` and a rollout that completes both go through
`publish_group_release` / `publish_document`, so a release has one way onto the broker.

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
from typing import Any

import structlog

from controller.desired.store import ReleaseStore
from controller.mqtt import ControllerMqtt, MqttError, MqttOptions
from controller.rollouts.store import ABORTED, SUCCEEDED, Rollout
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


def set_group_release(site: ReleaseSite, group: str, model: str, want: DesiredModel) -> Release:
    """Make `want` the group's desired version of `model` (its other models unchanged):
    a new signed release."""
    return publish_group_release(site, group, current_release(site, group), model, want)


def publish_group_release(
    site: ReleaseSite, group: str, current: Release | None, model: str, want: DesiredModel
) -> Release:
    """The release after `current` (the broker's, as read) with `want` for `model`."""
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
    aborted one, or one that targets ids or `all`, leaves releases as they are. Each
    group's outcome is recorded for `rollout status` (set; unchanged: the release said so
    already; failed). Returns the groups whose release now says so; a broker that fails
    is logged, not raised (the rollout succeeded either way; `jetfleet release set`
    repairs it)."""
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
            current = current_release(site, group)
            if current is not None and current.models.get(rollout.model) == want:
                site.history.record_rollout(rollout.id, group, "unchanged", current.version)
            else:
                doc = publish_group_release(site, group, current, rollout.model, want)
                site.history.record_rollout(rollout.id, group, "set", doc.version)
                log.info("release_set", rollout_id=rollout.id, group=group, version=doc.version)
        except ReleaseError as e:
            log.error("release_not_set", rollout_id=rollout.id, group=group, reason=e.reason)
            site.history.record_rollout(rollout.id, group, "failed", reason=e.reason)
            continue
        done.append(group)
    return done


def rollout_release(rollout: Rollout, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """What a rollout did to releases, as `rollout status` shows it: `groups` (the
    recorded outcome per group) and, when it set none, `none` saying why."""
    set_any = any(o["outcome"] in ("set", "unchanged") for o in outcomes)
    return {"groups": outcomes, "none": None if set_any else _why_no_release(rollout, outcomes)}


def _why_no_release(rollout: Rollout, outcomes: list[dict[str, Any]]) -> str:
    if rollout.kind != "deploy":
        return f"a {rollout.kind} rollout sets no release"
    if not target_groups(rollout.target):
        return "it targets devices, not a group (a rollout to group:NAME sets its release)"
    if rollout.state == ABORTED:
        return "aborted: the group's release stays where it was"
    if rollout.state != SUCCEEDED:
        return "not yet: the group's release is set when the rollout succeeds"
    if outcomes:
        return f"not published ({outcomes[0]['reason']}): `jetfleet release set` sets it"
    return "none recorded for this rollout"
