"""A rollout's policy: abort criteria per failure type, pace and scheduled start.

Anchors: AWS IoT Jobs `abortConfig` (`--abort-on`, `--min-finished`) and
`jobExecutionsRolloutConfig.maximumPerMinute` (`--max-per-minute`), hawkBit's `startAt`
(`--start-at`). The policy is stored with the rollout as one JSON column, so `resume`
(after a pause or a kill -9) drives it with the same rules. Parsing and judging are pure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from controller.rollouts.slo import SloError, parse_duration, parse_slo
from protocol.errors import CodedError

# The failure types an operator can put a threshold on (an assignment's terminal state).
FAILURE_TYPES = ("FAILED", "REJECTED", "ROLLED_BACK", "TIMED_OUT")
ALL = "ALL"
# AWS IoT Jobs' range for maximumPerMinute, and its jobExecutionsRetryConfig.
MAX_PER_MINUTE = 1000
MAX_RETRIES = 10
# DEFERRED: the robot stayed busy past its busy_timeout_s; a retry asks it again later.
RETRY_TYPES = ("FAILED", "TIMED_OUT", "DEFERRED")
# --offline: what a wave does with a robot that is offline (docs/operations.md). `wait`
# by default: a robot back before the wave's timeout runs the deploy with its wave, as
# always; one still away then is left to converge through the release (the rollout sets
# it when it completes) instead of counting as TIMED_OUT, so fleets that are never all
# online can roll out. The wave lasts no longer than before.
OFFLINE_MODES = ("wait", "skip", "fail")
DEFAULT_OFFLINE = "wait"
# The code of a device the wave left to its release (state CANCELED: not a failure).
OFFLINE_CODE = "offline"


class PolicyError(CodedError, ValueError):
    """A rollout option the engine cannot run with (one line, naming the option)."""

    code = "rollout_policy"


@dataclass(frozen=True)
class AbortCriterion:
    """Abort when the devices in `types` are more than `threshold` of the commanded ones."""

    types: tuple[str, ...]
    threshold: float  # 0..1

    @property
    def label(self) -> str:
        return "+".join(self.types) + f">{self.threshold * 100:g}%"


@dataclass(frozen=True)
class RolloutPolicy:
    abort_on: tuple[AbortCriterion, ...] = ()
    min_finished: int = 0
    max_per_minute: int | None = None
    start_at: float | None = None  # epoch seconds
    approve_waves: bool = False  # wait for `rollout promote` after each wave
    device_timeout: float | None = None  # seconds one device may stay in one job state
    retries: int = 0  # new commands for a device whose job ended in one of `retry_on`
    retry_on: tuple[str, ...] = ()
    retry_backoff: float = 10.0  # seconds before the first retry, doubling after
    slos: tuple[str, ...] = ()  # SLO expressions judged after each wave's bake (slo.py)
    bake: float | None = None  # seconds a wave bakes before its SLOs are judged
    bake_max: float | None = None  # NOT_ENOUGH_DATA extends the bake up to this
    slo_inconclusive: str = "abort"  # still not enough data at bake_max: abort | continue
    offline: str = DEFAULT_OFFLINE  # one of OFFLINE_MODES

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["abort_on"] = [c.label for c in self.abort_on]
        return d

    @classmethod
    def from_json(cls, text: str | None) -> RolloutPolicy:
        """A stored policy; a rollout stored before policies existed has none (NULL)."""
        if not text:
            return cls()
        d = json.loads(text)
        return cls(
            abort_on=parse_abort_on(",".join(d.get("abort_on") or [])),
            min_finished=int(d.get("min_finished") or 0),
            max_per_minute=d.get("max_per_minute"),
            start_at=d.get("start_at"),
            approve_waves=bool(d.get("approve_waves")),
            device_timeout=d.get("device_timeout"),
            retries=int(d.get("retries") or 0),
            retry_on=tuple(d.get("retry_on") or ()),
            retry_backoff=float(d.get("retry_backoff") or 10.0),
            slos=tuple(d.get("slos") or ()),
            bake=d.get("bake"),
            bake_max=d.get("bake_max"),
            slo_inconclusive=d.get("slo_inconclusive") or "abort",
            offline=str(d.get("offline") or DEFAULT_OFFLINE),
        )

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1-based)."""
        return self.retry_backoff * 2 ** (attempt - 1)

    @property
    def release_interval(self) -> float:
        """Seconds between two commands (0: release a wave at once)."""
        return 60.0 / self.max_per_minute if self.max_per_minute else 0.0

    def describe(self) -> str:
        """One line for `rollout status` (empty for the default policy)."""
        parts = []
        if self.abort_on:
            parts.append("abort on " + ",".join(c.label for c in self.abort_on))
        if self.min_finished:
            parts.append(f"no abort before {self.min_finished} finished")
        if self.max_per_minute:
            parts.append(f"at most {self.max_per_minute} commands/min")
        if self.start_at is not None:
            parts.append(f"start at {format_time(self.start_at)}")
        if self.retries:
            parts.append(
                f"{self.retries} retries on {'+'.join(self.retry_on)} "
                f"(back-off {self.retry_backoff:g}s, doubling)"
            )
        if self.device_timeout:
            parts.append(f"a device stuck {self.device_timeout:g}s in one state times out")
        if self.approve_waves:
            parts.append("each wave waits for `rollout promote`")
        if self.slos:
            parts.append(
                f"after each wave bake {self.bake:g}s (up to {self.bake_max:g}s for data), then "
                f"judge {' and '.join(self.slos)}; not enough data: {self.slo_inconclusive}"
            )
        return "; ".join(parts)

    @property
    def offline_text(self) -> str:
        return {
            "wait": "wait (waited for up to the wave timeout, then left to the release)",
            "skip": "skip (no command; left to converge through the release)",
            "fail": "fail (TIMED_OUT at the wave timeout, a failure)",
        }[self.offline]


def parse_abort_on(spec: str) -> tuple[AbortCriterion, ...]:
    """`ROLLED_BACK>5%,TIMED_OUT>20%`: one threshold per type; `FAILED+REJECTED>10%` counts
    those types together; `ALL>10%` every failure type."""
    if not spec.strip():
        return ()
    criteria: list[AbortCriterion] = []
    for part in (p.strip() for p in spec.split(",")):
        name, sep, pct = part.partition(">")
        if not sep or not pct.strip().endswith("%"):
            raise PolicyError(f"--abort-on {part!r}: expected TYPE>N% (e.g. ROLLED_BACK>5%)")
        types = tuple(t.strip().upper() for t in name.split("+"))
        for t in types:
            if t not in (*FAILURE_TYPES, ALL):
                raise PolicyError(
                    f"--abort-on {part!r}: {t or '(empty)'} is not one of "
                    f"{', '.join((*FAILURE_TYPES, ALL))}"
                )
        if ALL in types:
            types = FAILURE_TYPES
        try:
            value = float(pct.strip()[:-1])
        except ValueError:
            raise PolicyError(f"--abort-on {part!r}: {pct.strip()!r} is not a percentage") from None
        if not 0 <= value < 100:
            raise PolicyError(f"--abort-on {part!r}: the threshold must be within 0%..100%")
        criteria.append(AbortCriterion(tuple(dict.fromkeys(types)), value / 100.0))
    return tuple(criteria)


def parse_start_at(text: str, now: float) -> float:
    """ISO 8601 (`2026-11-26T22:00:00Z`; no zone means UTC) or `+30m`/`+2h`/`+90s` from now."""
    t = text.strip()
    if t.startswith("+"):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            return now + float(t[1:-1]) * units[t[-1]]
        except (KeyError, ValueError):
            raise PolicyError(f"--start-at {text!r}: expected +Ns, +Nm, +Nh or +Nd") from None
    try:
        at = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise PolicyError(
            f"--start-at {text!r}: expected an ISO 8601 time (2026-11-26T22:00:00Z) or +30m"
        ) from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp()


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_policy(
    *,
    abort_on: str = "",
    min_finished: int = 0,
    max_per_minute: int | None = None,
    start_at: str | None = None,
    approve_waves: bool = False,
    device_timeout: float | None = None,
    retries: int = 0,
    retry_on: str = "FAILED,TIMED_OUT",
    retry_backoff: float = 10.0,
    slos: tuple[str, ...] = (),
    bake: str | None = None,
    bake_max: str | None = None,
    slo_inconclusive: str = "abort",
    offline: str = DEFAULT_OFFLINE,
    now: float,
) -> RolloutPolicy:
    if min_finished < 0:
        raise PolicyError("--min-finished must be 0 or more")
    if device_timeout is not None and device_timeout <= 0:
        raise PolicyError("--device-timeout must be positive")
    if not 0 <= retries <= MAX_RETRIES:
        raise PolicyError(f"--retries {retries} is not within 0..{MAX_RETRIES}")
    if retry_backoff < 0:
        raise PolicyError("--retry-backoff must be 0 or more")
    if max_per_minute is not None and not 1 <= max_per_minute <= MAX_PER_MINUTE:
        raise PolicyError(f"--max-per-minute {max_per_minute} is not within 1..{MAX_PER_MINUTE}")
    if offline not in OFFLINE_MODES:
        raise PolicyError(f"--offline {offline!r}: use one of {', '.join(OFFLINE_MODES)}")
    return RolloutPolicy(
        abort_on=parse_abort_on(abort_on),
        min_finished=min_finished,
        max_per_minute=max_per_minute,
        start_at=parse_start_at(start_at, now) if start_at else None,
        approve_waves=approve_waves,
        device_timeout=device_timeout,
        retries=retries,
        retry_on=parse_retry_on(retry_on) if retries else (),
        retry_backoff=retry_backoff,
        **_slo_policy(slos, bake, bake_max, slo_inconclusive),
        offline=offline,
    )


def _slo_policy(
    slos: tuple[str, ...], bake: str | None, bake_max: str | None, inconclusive: str
) -> dict[str, Any]:
    """--slo/--bake/--bake-max/--slo-inconclusive, checked; the bake defaults to ending
    at 3× its length when data is short."""
    if not slos:
        if bake or bake_max:
            raise PolicyError("--bake needs at least one --slo to judge")
        return {}
    if inconclusive not in ("abort", "continue"):
        raise PolicyError(f"--slo-inconclusive {inconclusive!r}: expected abort or continue")
    if bake is None:
        raise PolicyError("--slo needs --bake DURATION (how long each wave runs before judging)")
    try:
        exprs = tuple(parse_slo(e).expr for e in slos)
        seconds = parse_duration(bake, "--bake")
        most = parse_duration(bake_max, "--bake-max") if bake_max else 3 * seconds
    except SloError as e:
        raise PolicyError(str(e)) from None
    if most < seconds:
        raise PolicyError(f"--bake-max {bake_max} is shorter than --bake {bake}")
    return {"slos": exprs, "bake": seconds, "bake_max": most, "slo_inconclusive": inconclusive}


def parse_retry_on(spec: str) -> tuple[str, ...]:
    """`TIMED_OUT,FAILED` or `ALL`: the failures a retry may cure (a REJECTED bundle or a
    ROLLED_BACK gate would only fail again)."""
    types: list[str] = []
    for t in (p.strip().upper() for p in spec.split(",")):
        if t == ALL:
            types.extend(RETRY_TYPES)
        elif t in RETRY_TYPES:
            types.append(t)
        else:
            raise PolicyError(
                f"--retry-on {spec!r}: {t or '(empty)'} is not one of "
                "FAILED, TIMED_OUT, DEFERRED, ALL"
            )
    return tuple(dict.fromkeys(types))


@dataclass
class Tally:
    """What the devices of a rollout have done so far: commanded, finished, and per state."""

    commanded: int = 0
    finished: int = 0
    states: dict[str, int] = field(default_factory=dict)


def abort_reason(
    policy: RolloutPolicy, max_failure_rate: float, tally: Tally, total: int, wave: int
) -> str | None:
    """Why the rollout must abort now, or None. Nothing is decided before `min_finished`
    devices finished (capped at the target's size, so a small rollout is still judged
    once every device finished)."""
    if tally.finished < min(policy.min_finished, total):
        return None
    if not tally.commanded:
        return None
    failed = sum(tally.states.get(t, 0) for t in FAILURE_TYPES)
    if crosses(tally.commanded, failed, max_failure_rate):
        return (
            f"failure rate {failed / tally.commanded:.0%} ({failed} of {tally.commanded}) "
            f"crossed --max-failure-rate {max_failure_rate:g} in wave {wave + 1}"
        )
    for c in policy.abort_on:
        n = sum(tally.states.get(t, 0) for t in c.types)
        if crosses(tally.commanded, n, c.threshold):
            return (
                f"{'+'.join(c.types)} {n / tally.commanded:.0%} ({n} of {tally.commanded}) "
                f"crossed --abort-on {c.label} in wave {wave + 1}"
            )
    return None


def crosses(assigned: int, failed: int, max_failure_rate: float) -> bool:
    """Strictly above the threshold aborts: 0.34 tolerates one failure out of three."""
    return assigned > 0 and failed / assigned > max_failure_rate + 1e-12


def exponential_sizes(base: int, factor: float, limit: int) -> list[int]:
    """Cumulative sizes of waves base, base·f, base·f², … until `limit` devices."""
    sizes, done, k = [], 0, 0
    while done < limit:
        done += max(1, math.ceil(base * factor**k - 1e-9))
        sizes.append(done)
        k += 1
    return sizes
