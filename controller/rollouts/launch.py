"""Starting a rollout: the checks against the fleet, the stored plan, and the detached
process that drives it (the CLI and the console hand rollouts to it alike).

`plan_rollout` stores nothing when a check fails: a never-seen device (unless
`allow_unseen`), a rollback of a model a target device does not hold, a device another
unfinished rollout still drives (DevicesHeldError, unless `force`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.fleet.access import mqtt_options
from controller.fleet.registry import Registry
from controller.rollouts.commands import CommandSigner
from controller.rollouts.driver import RolloutDriver, create_rollout
from controller.rollouts.policy import RolloutPolicy
from controller.rollouts.slo_bake import TelemetrySource
from controller.rollouts.store import Rollout, RolloutStore
from controller.security.keystore import KeySet, trust_update_signers
from controller.settings import ControllerSettings
from controller.telemetry.store import default_telemetry_db
from protocol.errors import CodedError
from protocol.topics import Topics


class UnseenDevicesError(CodedError, ValueError):
    """The target names devices this controller has never seen (a likely typo)."""

    code = "unseen_devices"


class RollbackModelError(CodedError, ValueError):
    """A rollback of a model some target devices do not hold (they would refuse it)."""

    code = "rollback_model_missing"


@dataclass(frozen=True)
class RolloutRequest:
    """What the operator asked for; `bundle` is (url, sha256, size) for a deploy."""

    kind: str
    model: str
    version: str
    target: str
    waves: str
    max_failure_rate: float
    wave_timeout: float
    auto_rollback: bool
    canary: str | None
    bundle: tuple[str, str, int] | None = None
    payload: str | None = None
    force: bool = False
    policy: RolloutPolicy | None = None
    allow_unseen: bool = False
    stage: bool = False  # deploy, build and gate, then wait STAGED for `rollout activate`


@dataclass(frozen=True)
class PlannedRollout:
    """The stored rollout, and the target devices worth a warning to the operator."""

    rollout: Rollout
    offline: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)


def id_list(ids: list[str], shown: int = 10) -> str:
    """The first `shown` ids, and how many more."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def never_seen_message(unknown: list[str], registry: Registry) -> str:
    known = [d.id for d in registry.devices()]
    return (
        f"--target names {len(unknown)} device(s) this controller has never seen: "
        f"{id_list(unknown)} (known: {id_list(known) or 'none'}); check the spelling "
        "(`jetfleet devices`), or pass --allow-unseen to command a device not yet connected"
    )


def check_rollback_model(registry: Registry, ids: list[str], model: str) -> None:
    """A rollback of a model a device does not hold is refused by that device anyway:
    refuse it here, before anything is signed, naming the models the fleet has."""
    records = {d.id: d for d in registry.devices()}
    lacking = [i for i in ids if i in records and model not in records[i].models]
    if not lacking:
        return
    fleet_models = sorted({m for i in ids if i in records for m in records[i].models})
    raise RollbackModelError(
        f"rollback --model {model}: {len(lacking)} target device(s) have no model {model!r}: "
        f"{id_list(lacking)} (their models: {', '.join(fleet_models) or 'none'})"
    )


def plan_rollout(store: RolloutStore, registry: Registry, req: RolloutRequest) -> PlannedRollout:
    """Resolve the target against the registry (refresh it first) and store the plan."""
    ids = registry.resolve_target(req.target)
    unknown = registry.unknown(ids)
    if unknown and not req.allow_unseen:
        raise UnseenDevicesError(never_seen_message(unknown, registry))
    if req.kind == "rollback":
        check_rollback_model(registry, ids, req.model)
    wanted = set(ids)
    offline = [d.id for d in registry.devices() if d.id in wanted and not d.online]
    bundle = req.bundle or (None, None, None)
    r = create_rollout(
        store,
        registry,
        kind=req.kind,
        model=req.model,
        version=req.version,
        device_ids=ids,
        waves_spec=req.waves,
        max_failure_rate=req.max_failure_rate,
        wave_timeout=req.wave_timeout,
        auto_rollback=req.auto_rollback,
        canary=req.canary,
        target=req.target,
        bundle_url=bundle[0],
        bundle_sha256=bundle[1],
        bundle_size=bundle[2],
        payload=req.payload,
        force=req.force,
        policy=req.policy,
        stage=req.stage,
    )
    return PlannedRollout(r, offline, unknown)


def spawn_driver(s: ControllerSettings, rollout_id: str) -> int:
    """Continue the rollout in a detached process (it outlives this command): `jetfleet
    rollout resume ID --wait` with these settings, logging to DATA_DIR/rollouts/ID.log."""
    args = [
        sys.executable,
        "-c",
        "from controller.cli.main import app; app()",
        "--broker",
        s.broker,
        "--db",
        str(s.db_target()),
    ]
    if s.keys:
        args += ["--keys", str(s.keys)]
    if s.context:  # its protocol and prefix too, whatever the current context is then
        args += ["--context", s.context]
    for opt, val in (("--ca", s.ca), ("--cert", s.cert), ("--key", s.key)):
        if val:
            args += [opt, val]
    args += ["rollout", "resume", rollout_id, "--wait", "--output", "json"]
    log_dir = s.db.parent / "rollouts"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JETFLEET_LOG_LEVEL": os.environ.get("JETFLEET_LOG_LEVEL", "info")}
    with (log_dir / f"{rollout_id}.log").open("ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return proc.pid


def command_signer(s: ControllerSettings, keys: KeySet, rollout: Rollout | None) -> CommandSigner:
    """The current operator key; for a trust update also the retired ones, since devices
    still on the old trust root know only those (see keystore.trust_update_signers).
    KeystoreError when the retired keys cannot be read."""
    if rollout is not None and rollout.kind == "trust_update" and s.keys is not None:
        return CommandSigner(trust_update_signers(s.keys, keys))
    return CommandSigner([keys.operator])


def make_driver(
    s: ControllerSettings,
    keys: KeySet,
    opened: tuple[RolloutStore, Registry],
    rollout_id: str,
    on_progress: Callable[[RolloutStore, str], None] | None = None,
    *,
    standby: bool = False,
) -> RolloutDriver:
    """The driver of a stored rollout on the settings' broker and telemetry, with the
    store and registry `open_store(s)` gave (the caller renders progress from them).
    `standby`: another live process drives it; follow, and take over at its lease's end."""
    store, registry = opened
    return RolloutDriver(
        store,
        registry,
        command_signer(s, keys, store.get(rollout_id)),
        mqtt_options(s),
        rollout_id,
        topics=Topics(s.prefix),
        on_progress=on_progress,
        slo_source=TelemetrySource(default_telemetry_db(s.db_target())),
        standby=standby,
    )
