"""`rollout activate`: a staged rollout (`rollout start --stage`) goes on as the activation
of its STAGED devices, in waves, by the rules of any wave (failure threshold, abort,
automatic rollback), with an `activate` command per device instead of a deploy.

One rollout, two phases (rollouts.phase `stage`, then `activate`): the devices' deploy
jobs are the same across both (an activated job reports under its deploy's command id),
so every rule the driver has for a deploy's states, its cancel and its rollback holds as
is; what changes is the command a wave sends (controller/rollouts/driver.py). Devices not
STAGED when the activation is planned (failed, timed out, canceled by the stage's own
rules) are left out and reported; a device whose staged job expired since (stage_ttl_s)
answers its `activate` with not_staged, which the rollout reports without counting it as
a failure of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.rollouts.driver import RolloutError, check_plan, parse_waves, plan_waves
from controller.rollouts.policy import RolloutPolicy, make_policy
from controller.rollouts.store import JOB_STAGED, STAGED, Assignment, Rollout, RolloutStore


class ActivationError(RolloutError):
    """A rollout that cannot be activated (not staged, nothing staged, changed meanwhile)."""

    code = "activation"


@dataclass(frozen=True)
class ActivationPlan:
    rollout: Rollout
    devices: list[str]  # STAGED: each gets an `activate`, wave by wave
    left_out: list[Assignment]  # not STAGED: they keep their state and reason


def activation_policy(
    stored: RolloutPolicy,
    *,
    abort_on: str | None = None,
    min_finished: int | None = None,
    max_per_minute: int | None = None,
    approve_waves: bool | None = None,
    device_timeout: float | None = None,
    now: float,
) -> RolloutPolicy:
    """The stage's policy with what the operator gave instead (PolicyError if bad).
    Dropped: retries (a retry sends a new deploy, which an activation has none to
    send), SLOs (a staged rollout takes none) and the scheduled start."""
    return make_policy(
        abort_on=",".join(c.label for c in stored.abort_on) if abort_on is None else abort_on,
        min_finished=stored.min_finished if min_finished is None else min_finished,
        max_per_minute=stored.max_per_minute if max_per_minute is None else max_per_minute,
        approve_waves=stored.approve_waves if approve_waves is None else approve_waves,
        device_timeout=stored.device_timeout if device_timeout is None else device_timeout,
        offline=stored.offline,
        now=now,
    )


def activate_staged(
    store: RolloutStore,
    rollout_id: str,
    *,
    waves_spec: str | None,
    max_failure_rate: float | None,
    wave_timeout: float | None,
    auto_rollback: bool | None,
    policy: RolloutPolicy,
    canary: str | None = None,
    now: float,
) -> ActivationPlan:
    """Plan the activation's waves over the STAGED devices and store it (the rollout is
    `running` again, phase `activate`); options left None keep the stage's."""
    r = store.get(rollout_id)
    if r is None:
        raise ActivationError(f"no rollout {rollout_id!r}")
    if r.state != STAGED:
        hint = " (started without --stage)" if r.phase is None else ""
        raise ActivationError(
            f"rollout {r.id} is {r.state}{hint}; only a staged rollout can be activated"
        )
    spec = waves_spec or r.waves_spec
    rate = r.max_failure_rate if max_failure_rate is None else max_failure_rate
    timeout = r.wave_timeout if wave_timeout is None else wave_timeout
    check_plan(spec, rate, timeout)
    assignments = store.assignments(r.id)
    staged = [a.device_id for a in assignments if a.state == JOB_STAGED]
    left_out = [a for a in assignments if a.state != JOB_STAGED]
    if not staged:
        raise ActivationError(f"rollout {r.id} has no STAGED device to activate")
    if canary is not None and canary not in staged:
        raise ActivationError(f"--canary {canary!r} is not STAGED in rollout {r.id}")
    waves = plan_waves(staged, parse_waves(spec, len(staged)), canary)
    if not store.start_activation(
        r.id,
        waves,
        waves_spec=spec,
        max_failure_rate=rate,
        wave_timeout=timeout,
        auto_rollback=r.auto_rollback if auto_rollback is None else auto_rollback,
        policy=policy,
        at=now,
    ):
        raise ActivationError(f"rollout {r.id} changed meanwhile; see `jetfleet rollout status`")
    activated = store.get(r.id)
    assert activated is not None
    return ActivationPlan(activated, staged, left_out)
