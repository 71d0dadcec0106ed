"""Test helpers for the controller: a keys directory, real bundles, and a simulated fleet.

`SimFleet` runs many simulated devices that speak the real agent protocol over a real
broker: each verifies the operator signature, expiry and target of every command with
`protocol.trust.verify_command`, acts on a command id once, emits real job events
(`JobEvent`, per-device monotonic `seq`) and keeps a retained `DeviceStatus` with its
active/previous version per model. Only the work of a job (download, build, gate) is
replaced by a fixed delay and a scripted outcome. It is what `bench/rollout_scale.py`
drives 1,000 of, and what the controller tests use where a real agent would add
nothing but minutes (the must-show tests use real agents: tests/agent/harness.py).
"""

from __future__ import annotations

import base64
import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import ProtocolError
from protocol.keys import SigningKey
from protocol.messages import (
    PIPELINE,
    ActivateBody,
    CancelBody,
    Command,
    CommandKind,
    DeployBody,
    DeviceStatus,
    JobEvent,
    JobState,
    RollbackBody,
)
from protocol.topics import Topics
from protocol.transport import parse_broker_url
from protocol.trust import TrustRoot, verify_command

# Every step of a deploy before SUCCEEDED (ON_HOLD only for a device told to hold; STAGED
# only for a staged deploy: it stops there until an `activate`).
DEPLOY_STEPS = tuple(s for s in PIPELINE[:-1] if s not in (JobState.STAGED, JobState.ON_HOLD))


def write_keys_dir(
    directory: Path,
    root: SigningKey,
    release: SigningKey,
    operator: SigningKey,
    trust_envelope: bytes,
) -> Path:
    """The layout of `jetfleet keys init DIR` (contracts.md): PEM keys and trust.json."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, key in (("root", root), ("release", release), ("operator", operator)):
        p = directory / f"{name}.key"
        p.write_bytes(key.to_pem())
        p.chmod(0o600)
    (directory / "trust.json").write_bytes(trust_envelope)
    return directory


def build_bundle(
    out_dir: Path,
    release: SigningKey,
    *,
    name: str = "detector",
    version: str = "1.0.0",
    extra_work: float = 0.0,
    seed: int = 0,
    gate: dict[str, Any] | None = None,
    in_dim: int = 64,
    hidden: int = 128,
    out_dim: int = 16,
    layers: int = 2,
) -> Path:
    """A real bundle: an ONNX MLP built with onnx.helper, golden outputs from ORT.
    `extra_work` adds genuine compute with identical outputs (a slower model)."""
    from models import make_golden, make_mlp, mlp_inputs, write_golden

    from protocol.bundle import bundle_filename, make_manifest, write_bundle

    work = out_dir / f"src-{name}-{version}-{extra_work:g}"
    work.mkdir(parents=True, exist_ok=True)
    model = make_mlp(
        work / "model.onnx",
        extra_work=extra_work,
        seed=seed,
        in_dim=in_dim,
        hidden=hidden,
        out_dim=out_dim,
        layers=layers,
    )
    feeds = mlp_inputs(4, in_dim=in_dim, seed=1)
    golden = write_golden(work / "golden.npz", make_golden(model, feeds))
    files = {"model.onnx": model, "golden.npz": golden}
    manifest = make_manifest(
        name=name,
        version=version,
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", in_dim]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", out_dim]}],
        gate=gate or {"probation_s": 0},
    )
    out = out_dir / f"{extra_work:g}" / bundle_filename(name, version)
    return write_bundle(out, manifest, files, [release])


@dataclass
class Behaviour:
    """What a simulated device does with a deploy: the scripted part of the simulation."""

    outcome: JobState = JobState.SUCCEEDED  # SUCCEEDED | ROLLED_BACK | FAILED | REJECTED
    step_s: float = 0.01  # delay between events (the job's "work")
    silent: bool = False  # never answers (a device that hangs): wave timeout territory
    hold_s: float = 0.0  # ON_HOLD this long after VALIDATING (outside its window, busy)
    code: str = "latency_regression"
    reason: str = "candidate p99 is 42% slower than the active engine (limit 10%)"


@dataclass
class SimDevice:
    device_id: str
    groups: list[str]
    models: dict[str, dict[str, str | None]] = field(default_factory=dict)
    installed: dict[str, set[str]] = field(default_factory=dict)
    behaviour: Behaviour = field(default_factory=Behaviour)
    seq: int = 0
    seen: set[str] = field(default_factory=set)
    job: dict[str, Any] | None = None
    commands_received: int = 0
    client: mqtt.Client | None = None
    commands: dict[str, Command] = field(default_factory=dict)
    progress: dict[str, JobState] = field(default_factory=dict)
    canceled: set[str] = field(default_factory=set)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class SimFleet:
    """Simulated devices on a real broker.

    `per_device_clients=True`: each device has its own paho client with a persistent
    session and a will (the agent's shape; needed for offline tests). False: one client
    serves every device of this fleet (how the 1,000-device bench stays cheap), still with
    a persistent session, subscribing to each device's own command topic."""

    def __init__(
        self,
        broker_url: str,
        trust: TrustRoot,
        devices: list[SimDevice],
        *,
        topics: Topics | None = None,
        per_device_clients: bool = True,
        name: str = "sim",
    ) -> None:
        self.address = parse_broker_url(broker_url)
        self.trust = trust
        self.topics = topics or Topics()
        self.devices = {d.device_id: d for d in devices}
        self.per_device = per_device_clients
        self.name = name
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._tie = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run_timers, daemon=True, name=name)
        self._shared: mqtt.Client | None = None
        self.events_published = 0
        self.rejections: list[tuple[str, str]] = []

    # -- connection ----------------------------------------------------------------------
    def _client(self, client_id: str, will_device: SimDevice | None) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        if will_device is not None:
            will = DeviceStatus.new(
                device_id=will_device.device_id, online=False, groups=will_device.groups
            )
            c.will_set(self.topics.status(will_device.device_id), will.encode(), 1, True)
            # The device answers on this client from the moment it connects: a command
            # queued in its session arrives right after CONNACK, and an answer sent before
            # `client` was set would be dropped (the device would look silent).
            will_device.client = c
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.connect(self.address.host, self.address.port, 30, clean_start=False, properties=props)
        c.loop_start()
        if not connected.wait(10):
            raise RuntimeError(f"simulated device {client_id} could not connect")
        return c

    def start(self) -> SimFleet:
        self._thread.start()
        if self.per_device:
            for d in self.devices.values():
                self.connect_device(d.device_id)
        else:
            self._shared = self._client(f"{self.name}-fleet", None)
            subs = [(self.topics.device_cmd(d), 1) for d in self.devices]
            for i in range(0, len(subs), 200):
                self._shared.subscribe(subs[i : i + 200])
            sent = [self._publish_status(d, online=True) for d in self.devices.values()]
            # Started means every retained status is at the broker: a sync right after
            # must find them all (on a loaded machine the publishes trail behind).
            for info in sent:
                if info is not None:
                    info.wait_for_publish(10)
        return self

    def connect_device(self, device_id: str) -> None:
        d = self.devices[device_id]
        client = self._client(f"{self.name}-{device_id}", d)  # sets d.client first
        client.subscribe(self.topics.device_cmd(device_id), 1)
        info = self._publish_status(d, online=True)
        if info is not None:
            info.wait_for_publish(10)

    def disconnect_device(self, device_id: str) -> None:
        """Go offline the way a powered-off robot does: the broker publishes the will."""
        d = self.devices[device_id]
        if d.client is not None:
            d.client.loop_stop()
            # Close the socket without DISCONNECT so the broker sends the will.
            sock = d.client.socket()
            if sock is not None:
                sock.close()
            d.client = None

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        clients = [d.client for d in self.devices.values() if d.client] + (
            [self._shared] if self._shared else []
        )
        for c in clients:
            c.disconnect()
            c.loop_stop()

    def __enter__(self) -> SimFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- publishing ------------------------------------------------------------------------
    def _pub_client(self, d: SimDevice) -> mqtt.Client | None:
        return d.client if self.per_device else self._shared

    def _publish_status(self, d: SimDevice, *, online: bool = True) -> mqtt.MQTTMessageInfo | None:
        status = DeviceStatus.new(
            device_id=d.device_id,
            online=online,
            agent_version="sim",
            groups=d.groups,
            hardware={"device_model": "simulated Jetson", "backend": "onnxruntime"},
            models=d.models,
            job=d.job,
            last_seq=d.seq,
        )
        c = self._pub_client(d)
        if c is None:
            return None
        return c.publish(self.topics.status(d.device_id), status.encode(), 1, retain=True)

    def _emit(self, d: SimDevice, command: Command, state: JobState, **extra: Any) -> None:
        body = command.body
        model = getattr(body, "name", None) or getattr(body, "model", None)
        version = getattr(body, "version", None) or getattr(body, "to_version", None)
        event = JobEvent.new(
            command_id=command.command_id,
            rollout_id=command.rollout_id,
            device_id=d.device_id,
            state=state,
            seq=d.next_seq(),
            kind=command.kind,
            model=model,
            version=version,
            **extra,
        )
        d.progress[command.command_id] = state
        d.job = {
            "command_id": command.command_id,
            "state": state.value,
            "kind": command.kind.value,
            "rollout_id": command.rollout_id,
            "model": model,
            "version": version,
        }
        c = self._pub_client(d)
        if c is not None:
            c.publish(self.topics.events(d.device_id), event.encode(), 1)
            self.events_published += 1

    # -- commands --------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except ProtocolError:
            return
        d = self.devices.get(parsed.name)
        if d is None or parsed.channel != "cmd":
            return
        with self._lock:
            d.commands_received += 1
            try:
                command = verify_command(
                    bytes(msg.payload),
                    self.trust,
                    device_id=d.device_id,
                    groups=d.groups,
                    now=datetime.now(timezone.utc),
                )
            except ProtocolError as e:
                self.rejections.append((d.device_id, e.code))
                return
            if command.command_id in d.seen:
                return  # acted on once already (docs/protocol.md, Commands)
            d.seen.add(command.command_id)
            if d.behaviour.silent and command.kind is CommandKind.DEPLOY:
                return
            d.commands[command.command_id] = command
            if isinstance(command.body, DeployBody):
                self._schedule_deploy(d, command)
            elif isinstance(command.body, CancelBody):
                self._later(0, lambda: self._cancel(d, command))
            elif isinstance(command.body, RollbackBody):
                self._schedule_rollback(d, command)
            elif isinstance(command.body, ActivateBody):
                self._later(0, lambda: self._activate(d, command))

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._tie), fn))
        self._wake.notify()

    def _schedule_deploy(self, d: SimDevice, command: Command) -> None:
        body = command.body
        assert isinstance(body, DeployBody) and body.name and body.version
        step = d.behaviour.step_s

        def step_to(state: JobState) -> None:
            if command.command_id not in d.canceled:
                why = {"code": "window", "reason": "outside the maintenance windows"}
                self._emit(d, command, state, **(why if state is JobState.ON_HOLD else {}))

        hold = d.behaviour.hold_s
        at = 0.0
        for state in DEPLOY_STEPS:
            if state is JobState.ACTIVATING and body.stage:
                # The agent's STAGED: gated, parked until an `activate` names this job.
                self._later(at, lambda: step_to(JobState.STAGED))
                return
            if state is JobState.ACTIVATING and hold:
                self._later(at, lambda: step_to(JobState.ON_HOLD))
                at += hold
            self._later(at, lambda s=state: step_to(s))
            at += step
        self._later(at, lambda: self._finish_deploy(d, command, body.name or "", body.version))

    def _activate(self, d: SimDevice, command: Command) -> None:
        """The agent's rule: only a STAGED deploy can be activated; it then goes on under
        its own command id (ACTIVATING, PROBATION, its outcome)."""
        assert isinstance(command.body, ActivateBody)
        target = command.body.command_id
        self._emit(d, command, JobState.RECEIVED)
        if d.progress.get(target) is not JobState.STAGED or target in d.canceled:
            self._emit(d, command, JobState.REJECTED, code="not_staged",
                       reason=f"job {target} is not STAGED on this device")  # fmt: skip
            return
        self._emit(d, command, JobState.SUCCEEDED, progress=1.0)
        deploy = d.commands[target]
        body = deploy.body
        assert isinstance(body, DeployBody)
        step = d.behaviour.step_s
        self._later(step, lambda: self._emit(d, deploy, JobState.ACTIVATING))
        self._later(2 * step, lambda: self._emit(d, deploy, JobState.PROBATION))
        self._later(3 * step, lambda: self._finish_deploy(d, deploy, body.name or "", body.version))

    def _cancel(self, d: SimDevice, command: Command) -> None:
        """The agent's rule: a job can be canceled until it starts activating."""
        assert isinstance(command.body, CancelBody)
        target = command.body.command_id
        self._emit(d, command, JobState.RECEIVED)
        state = d.progress.get(target)
        late = (JobState.ACTIVATING, JobState.PROBATION)
        if state is None or state.terminal or state in late:
            self._emit(
                d,
                command,
                JobState.REJECTED,
                code="not_cancelable",
                reason=f"job {target} is {state.value if state else 'unknown'}",
            )
            return
        d.canceled.add(target)
        self._emit(
            d,
            d.commands[target],
            JobState.CANCELED,
            code="canceled",
            reason="canceled by an operator command",
        )
        self._emit(d, command, JobState.SUCCEEDED, progress=1.0)
        self._publish_status(d)

    def _finish_deploy(self, d: SimDevice, command: Command, name: str, version: str) -> None:
        if command.command_id in d.canceled:
            return
        b = d.behaviour
        if b.outcome is JobState.SUCCEEDED:
            old = (d.models.get(name) or {}).get("active")
            d.models[name] = {"active": version, "previous": old}
            d.installed.setdefault(name, set()).add(version)
            self._emit(
                d,
                command,
                JobState.SUCCEEDED,
                progress=1.0,
                gate={"p99_ms": 1.0, "baseline_p99_ms": 1.0},
            )
        else:
            self._emit(d, command, b.outcome, reason=b.reason, code=b.code)
        self._publish_status(d)

    def _schedule_rollback(self, d: SimDevice, command: Command) -> None:
        body = command.body
        assert isinstance(body, RollbackBody)

        def run() -> None:
            self._emit(d, command, JobState.RECEIVED)
            if body.to_version not in d.installed.get(body.model, set()):
                reason = f"{body.model} {body.to_version} is not on this device"
                self._emit(d, command, JobState.REJECTED, code="unknown_version", reason=reason)
            else:
                old = (d.models.get(body.model) or {}).get("active")
                d.models[body.model] = {"active": body.to_version, "previous": old}
                self._emit(d, command, JobState.ACTIVATING)
                self._emit(d, command, JobState.SUCCEEDED, progress=1.0)
            self._publish_status(d)

        self._later(d.behaviour.step_s, run)

    def _run_timers(self) -> None:
        with self._lock:
            while not self._stop:
                if not self._heap:
                    self._wake.wait(0.5)
                    continue
                due, _, fn = self._heap[0]
                now = time.monotonic()
                if due > now:
                    self._wake.wait(due - now)
                    continue
                heapq.heappop(self._heap)
                fn()


def make_devices(
    n: int,
    *,
    prefix: str = "robot",
    groups: list[str] | None = None,
    model: str = "detector",
    active: str | None = "1.0.0",
    step_s: float = 0.01,
) -> list[SimDevice]:
    devices = []
    for i in range(n):
        d = SimDevice(f"{prefix}-{i:04d}", list(groups or ["fleet"]))
        if active:
            d.models[model] = {"active": active, "previous": None}
            d.installed[model] = {active}
        d.behaviour = Behaviour(step_s=step_s)
        devices.append(d)
    return devices


class CommandCounter:
    """A `mosquitto_sub`-style witness: counts every command message per device."""

    def __init__(self, broker_url: str, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        addr = parse_broker_url(broker_url)
        self.messages: dict[str, list[str]] = {}
        self.arrivals: list[tuple[float, str, str]] = []  # (monotonic time, device, kind)
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"{self.topics.prefix}/devices/+/cmd", 1)
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("command counter could not subscribe")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic.split("/")[-2]
        env = json.loads(msg.payload)
        command = json.loads(base64.b64decode(env["payload"]))
        with self._lock:
            self.messages.setdefault(device, []).append(
                f"{command['kind']}:{command['command_id']}"
            )
            self.arrivals.append((time.monotonic(), device, command["kind"]))

    def per_device(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self.messages.items()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ControllerHarness:
    """The controller's parts wired on one database, as the CLI wires them."""

    def __init__(
        self, db: str | Path, broker_url: str, operator: SigningKey, protocol: str = "5"
    ) -> None:
        from controller.fleet.registry import Registry
        from controller.mqtt import MqttOptions
        from controller.rollouts.commands import CommandSigner
        from controller.rollouts.store import RolloutStore

        self.registry = Registry.open(db)
        self.store = RolloutStore(self.registry.conn, offline=self.registry.offline_ids)
        self.signer = CommandSigner([operator])
        self.options = MqttOptions(broker=broker_url, protocol=protocol)

    def sync(self) -> int:
        from controller.fleet.registry import sync_from_broker
        from controller.mqtt import ControllerMqtt

        with ControllerMqtt(self.options).connect() as m:
            return sync_from_broker(self.registry, m)

    def create(self, device_ids: list[str], **kw: Any) -> str:
        from controller.rollouts.driver import create_rollout

        defaults: dict[str, Any] = {
            "kind": "deploy",
            "model": "detector",
            "version": "2.0.0",
            "waves_spec": "1,100%",
            "max_failure_rate": 0.05,
            "wave_timeout": 30.0,
            "auto_rollback": True,
            "bundle_url": "file:///srv/bundles/detector-2.0.0.jfb",
            "bundle_sha256": "ab" * 32,
            "bundle_size": 1234,
        }
        defaults.update(kw)
        return create_rollout(self.store, self.registry, device_ids=device_ids, **defaults).id

    def driver(self, rollout_id: str, **kw: Any) -> Any:
        from controller.rollouts.driver import RolloutDriver

        return RolloutDriver(self.store, self.registry, self.signer, self.options, rollout_id, **kw)

    def drive(self, rollout_id: str) -> Any:
        return self.driver(rollout_id).run()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def rollout_start(bundle: Path, target: str, waves: str, *options: str) -> list[str]:
    """The arguments of `jetfleet rollout start BUNDLE --target T --waves W OPTIONS…`."""
    return ["rollout", "start", str(bundle), "--target", target, "--waves", waves, *options]


def cli_ok(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """The output of a `jetfleet` command that must succeed."""
    out = run_cli(env, *args, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return str(out.stdout)


def runs(version: str, model: str = "detector") -> Callable[[Any], bool]:
    """A predicate on a robot's `DeviceStatus`: online, `model` active at `version`, and
    no job in flight."""

    def ok(s: Any) -> bool:
        slot = s.models.get(model)
        return bool(s.online and slot is not None and slot.active == version and s.job is None)

    return ok


def agent_config(root: Path, device: str, broker_url: str, **kw: Any) -> Path:
    """root/DEVICE/agent.toml for a real agent (tests/agent/harness.py): its data under
    root/DEVICE/data, the trust root of the keys at root/keys, group `fleet` unless
    `groups=` says otherwise; `kw` goes to `write_agent_config`."""
    from tests.agent.harness import write_agent_config

    options: dict[str, Any] = {
        "groups": ["fleet"],
        "data_dir": root / device / "data",
        "trust_root": root / "keys" / "trust.json",
        **kw,
    }
    return write_agent_config(
        root / device / "agent.toml", device_id=device, broker_url=broker_url, **options
    )


@contextmanager
def agent_lab(root: Path) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    """What a module of real-agent tests shares: operator keys under root/keys (their
    trust root is the agents'), a real Mosquitto, and the CLI's environment on both."""
    from controller.sandbox.localbroker import LocalMosquitto
    from controller.security.keystore import init_keys

    keys = init_keys(root / "keys")
    with LocalMosquitto(root / "broker") as broker:
        yield keys, broker, cli_env(root, broker.url, root / "keys")


def start_agents(root: Path, broker_url: str, devices: Iterable[str], **kw: Any) -> list[Any]:
    """A real agent subprocess per device (`agent_config(root, device, broker_url, **kw)`),
    each on one ONNX Runtime thread; the caller stops them."""
    from tests.agent.harness import AgentProcess

    return [
        AgentProcess(agent_config(root, d, broker_url, **kw), env={"OMP_NUM_THREADS": "1"}).start()
        for d in devices
    ]


@dataclass
class AgentFleet:
    """Real agents on a real broker, as the operator sees them: through `jetfleet`."""

    env: dict[str, str]
    keys: Any  # controller.security.keystore.KeySet
    root: Path

    def jetfleet(self, *args: str, timeout: float = 240) -> Any:
        return run_cli(self.env, *args, timeout=timeout)

    def devices(self) -> dict[str, dict[str, Any]]:
        out = self.jetfleet("devices", "--output", "json")
        assert out.returncode == 0, out.stderr
        return {d["id"]: d for d in json.loads(out.stdout)}

    def actives(self, model: str = "detector") -> dict[str, str | None]:
        """device -> the version of `model` it runs."""
        return {i: d["models"].get(model, {}).get("active") for i, d in self.devices().items()}


def cli_env(tmp: Path, broker_url: str, keys_dir: Path) -> dict[str, str]:
    """Environment for a `jetfleet` subprocess confined to `tmp` (no user config)."""
    import os

    env = dict(os.environ)
    env.update(
        JETFLEET_BROKER=broker_url,
        JETFLEET_KEYS=str(keys_dir),
        JETFLEET_DB=str(tmp / "data" / "controller.db"),
        XDG_DATA_HOME=str(tmp / "data"),
        XDG_CONFIG_HOME=str(tmp / "config"),
    )
    env.pop("JETFLEET_CONFIG", None)
    return env


def jetfleet_cmd(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-c", "from controller.cli.main import app; app()", *args]


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> Any:
    import subprocess

    return subprocess.run(
        jetfleet_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout
    )
