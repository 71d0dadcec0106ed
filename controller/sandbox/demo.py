"""`jetfleet demo`: a whole fleet on this machine, in under two minutes.

A private Mosquitto, three real `jetfleet-agent` processes with their own data directories
(robot-01 in groups warehouse-a + canary, robot-02 and robot-03 in warehouse-a), and the
operator's real commands, each printed before it runs:

    jetfleet keys init                      root, release, operator keys + trust.json
    jetfleet bundle build  (v1.0.0)         a small ONNX model made here, signed
    jetfleet rollout start --waves 1,100%   the canary first, then everyone; robot-03 is
                                            off (charging): left to the release it sets
    robot-03 comes back                     it converges to the group's release by itself
    jetfleet bundle build  (v1.1.0)         same outputs, about 3x the compute
    jetfleet rollout start --waves 1,100%   the canary's gate measures the regression, the
                                            canary rolls back by itself, the rollout aborts
    jetfleet devices                        every robot still on 1.0.0
    telemetry                               one sample per robot from the telemetry topic

Agents and broker are stopped on every exit path (success, error, Ctrl-C, SIGTERM). The
working directory (keys, bundles, agent logs) is removed afterwards unless --keep, or the
demo failed: then its path is printed so the logs can be read.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from controller.sandbox.localbroker import LocalMosquitto
from protocol.errors import CodedError
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics
from protocol.transport import paho_client

MODEL = "detector"
OFF_ROBOT = "robot-03"  # off during the first rollout; catches up through the release
JITTER_S = 1.0  # the agents' convergence jitter: short, for a demo
GROUP = "warehouse-a"
AGENTS = (("robot-01", (GROUP, "canary")), ("robot-02", (GROUP,)), ("robot-03", (GROUP,)))
V1, V2 = "1.0.0", "1.1.0"
# Sized so the gate's latency measurement is far above timer noise on a laptop core, and
# the slower model's extra work (x3) is far above the allowed regression.
IN_DIM, HIDDEN, OUT_DIM = 256, 512, 16
EXTRA_WORK = 2.0
MAX_REGRESSION_PCT = 25.0
PROBATION_S = 2.0
TELEMETRY_INTERVAL_S = 2.0
STEP_TIMEOUT_S = 90.0


class DemoError(CodedError, RuntimeError):
    """A step of the demo did not do what it should; the message says which."""

    code = "demo"


@dataclass
class DemoOutcome:
    first_rollout: dict[str, Any] = field(default_factory=dict)
    second_rollout: dict[str, Any] = field(default_factory=dict)
    caught_up: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, str | None] = field(default_factory=dict)
    telemetry: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.first_rollout.get("state") == "succeeded"
            and self.caught_up.get("version") == V1
            and self.second_rollout.get("state") == "aborted"
            and bool(self.second_rollout.get("rolled_back"))
            and len(self.fleet) == len(AGENTS)
            and all(v == V1 for v in self.fleet.values())
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ---------------------------------------------------------------------------- the model


def make_model(path: Path, *, extra_work: float = 0.0, seed: int = 7) -> Path:
    """An MLP x[batch, 256] -> y[batch, 16]. `extra_work` adds a side branch with that many
    times the MLP's multiply-adds whose result is exactly zero (tanh(t) - tanh(t)) and is
    added to the output: same outputs, genuinely more compute (ORT has no rewrite for
    Sub(t, t), so it runs every time)."""
    # onnx here, not at the top: every `jetfleet` command imports this module.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [IN_DIM, HIDDEN, HIDDEN, OUT_DIM]
    nodes, inits = [], []
    cur = "x"
    for i in range(len(dims) - 1):
        a, b = dims[i], dims[i + 1]
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"]),
        ]
        cur = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    if extra_work > 0:
        macs = sum(dims[i] * dims[i + 1] for i in range(len(dims) - 1))
        width = max(1, round(extra_work * macs / (IN_DIM + OUT_DIM)))
        xrng = np.random.default_rng(seed + 1)
        e1 = (xrng.standard_normal((IN_DIM, width)) / np.sqrt(IN_DIM)).astype(np.float32)
        e2 = (xrng.standard_normal((width, OUT_DIM)) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(e1, "extra_w1"), numpy_helper.from_array(e2, "extra_w2")]
        nodes += [
            helper.make_node("MatMul", ["x", "extra_w1"], ["extra_mm1"]),
            helper.make_node("Relu", ["extra_mm1"], ["extra_r"]),
            helper.make_node("MatMul", ["extra_r", "extra_w2"], ["extra_mm2"]),
            helper.make_node("Tanh", ["extra_mm2"], ["extra_t"]),
            helper.make_node("Sub", ["extra_t", "extra_t"], ["extra_zero"]),
            helper.make_node("Add", [cur, "extra_zero"], ["y_sum"]),
        ]
        cur = "y_sum"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(
        nodes,
        "demo_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- processes


def jetfleet_argv() -> list[str]:
    """The `jetfleet` console script next to this interpreter, or the module itself."""
    script = Path(sys.executable).parent / "jetfleet"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from controller.cli.main import app; app()"]


class Agent:
    def __init__(self, device_id: str, groups: Sequence[str], workdir: Path) -> None:
        self.device_id = device_id
        self.groups = tuple(groups)
        self.dir = workdir / "agents" / device_id
        self.config = self.dir / "agent.toml"
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, broker_url: str, trust: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"device_id = {json.dumps(self.device_id)}",
            f"groups = {json.dumps(list(self.groups))}",
            f"data_dir = {json.dumps(str(self.dir / 'data'))}",
            f"trust_root = {json.dumps(str(trust))}",
            'backend = "onnxruntime"',
            "[broker]",
            f"url = {json.dumps(broker_url)}",
            "protocol = 5",
            "reconnect_max_s = 2.0",
            "[desired]",
            f"jitter_s = {JITTER_S}",
            "[telemetry]",
            f"interval_s = {TELEMETRY_INTERVAL_S}",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, env: dict[str, str]) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: a Ctrl-C in the terminal reaches the demo only,
                # and the demo stops the agents in order.
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the cleanup runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Demo:
    def __init__(self, workdir: Path, console: Console) -> None:
        self.workdir = workdir
        self.console = console
        self.keys = workdir / "keys"
        self.broker = LocalMosquitto(workdir / "broker")
        self.agents = [Agent(d, g, workdir) for d, g in AGENTS]
        self.env = {
            **os.environ,
            "JETFLEET_KEYS": str(self.keys),
            "JETFLEET_DB": str(workdir / "controller" / "controller.db"),
            # Keep the operator's own ~/.config/jetfleet and ~/.local/share out of the demo.
            "JETFLEET_CONFIG": str(workdir / "controller" / "config.toml"),
            "XDG_DATA_HOME": str(workdir / "controller" / "share"),
            "JETFLEET_LOG_LEVEL": "error",
        }
        self.env.pop("NOTIFY_SOCKET", None)
        # The agents import this checkout's packages even when run from a source tree.
        repo = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo, os.environ.get("PYTHONPATH", "")) if p
        )

    # -- narration
    def step(self, text: str) -> None:
        self.console.rule(f"[bold cyan]{text}")

    def jetfleet(self, *args: str, check: bool = True, show: bool = True) -> str:
        argv = [*jetfleet_argv(), *args]
        if show:
            self.console.print(f"[bold]$ jetfleet {shlex.join(args)}[/]")
        done = subprocess.run(
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S * 2,
            stdin=subprocess.DEVNULL,
        )
        if show:
            if done.stdout.strip():
                self.console.print(done.stdout.rstrip(), markup=False, highlight=False)
            if done.stderr.strip():
                self.console.print(done.stderr.rstrip(), markup=False, style="dim")
        if check and done.returncode != 0:
            raise DemoError(
                f"`jetfleet {shlex.join(args)}` exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        return done.stdout

    # -- the story
    def run(self) -> DemoOutcome:
        started = time.monotonic()
        outcome = DemoOutcome(workdir=str(self.workdir))
        self.env["JETFLEET_BROKER"] = self.start_broker()
        self.step("1. keys: root, release and operator keys, and the signed trust root")
        self.jetfleet("keys", "init", str(self.keys))
        self.step("2. a fleet of three robots, each running jetfleet-agent")
        self.start_agents()
        self.wait_fleet_online()
        self.jetfleet("devices")
        self.step(f"3. bundle {MODEL} {V1}: a small ONNX model, signed by the release key")
        models = self.workdir / "models"
        models.mkdir(exist_ok=True)
        v1 = self.build_bundle(make_model(models / "detector-v1.onnx"), V1)
        self.step(f"4. {OFF_ROBOT} goes off to charge")
        self.switch_off(OFF_ROBOT)
        self.step(
            f"5. roll {V1} out: the canary (robot-01) first, then the whole group; "
            f"{OFF_ROBOT} is left to the group's release, which the rollout sets"
        )
        outcome.first_rollout = self.rollout(v1, "--offline", "skip")
        if outcome.first_rollout.get("state") != "succeeded":
            raise DemoError(f"the {V1} rollout did not succeed: {outcome.first_rollout}")
        self.jetfleet("release", "show")
        self.jetfleet("devices", "--drift")
        self.step(f"6. {OFF_ROBOT} comes back: it converges to the release by itself")
        outcome.caught_up = self.catch_up(OFF_ROBOT)
        self.step(f"7. bundle {MODEL} {V2}: same outputs, about 3x the compute")
        v2 = self.build_bundle(make_model(models / "detector-v1.1.onnx", extra_work=EXTRA_WORK), V2)
        self.step(f"8. roll {V2} out: the canary's gate catches the slowdown")
        outcome.second_rollout = self.rollout(v2)
        self.step("9. the fleet: every robot still runs the first version, the release too")
        outcome.fleet = self.fleet_versions()
        self.jetfleet("devices")
        self.jetfleet("release", "show")
        self.step("10. telemetry: one sample per robot")
        outcome.telemetry = self.telemetry()
        outcome.seconds = round(time.monotonic() - started, 1)
        return outcome

    def start_broker(self) -> str:
        self.broker.start()
        self.console.print(f"Mosquitto listening on {self.broker.url}")
        return self.broker.url

    def start_agents(self) -> None:
        trust = self.keys / "trust.json"
        for a in self.agents:
            a.write_config(self.broker.url, trust)
            a.start(self.env)
            self.console.print(
                f"started jetfleet-agent {a.device_id} (groups {', '.join(a.groups)}), "
                f"data in {a.dir / 'data'}"
            )

    def _check_agents(self) -> None:
        for a in self.agents:
            if a.proc is not None and not a.alive():  # not one switched off on purpose
                tail = a.log.read_text(errors="replace")[-1500:] if a.log.exists() else ""
                raise DemoError(f"agent {a.device_id} exited; its log ends:\n{tail}")

    def wait_fleet_online(self) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_agents()
            devices = self.devices_json()
            online = {d["id"] for d in devices if d.get("online")}
            if online >= {a.device_id for a in self.agents}:
                return
            time.sleep(0.5)
        raise DemoError("the agents did not come online within 90 s (see their logs)")

    def devices_json(self) -> list[dict[str, Any]]:
        out = self.jetfleet("devices", "--output", "json", show=False, check=False)
        try:
            data = json.loads(out)
        except ValueError:
            return []
        if isinstance(data, dict):
            data = data.get("devices", [])
        return [d for d in data if isinstance(d, dict)]

    def fleet_versions(self) -> dict[str, str | None]:
        versions: dict[str, str | None] = {}
        for d in self.devices_json():
            slot = (d.get("models") or {}).get(MODEL) or {}
            versions[d["id"]] = slot.get("active")
        return versions

    def build_bundle(self, model: Path, version: str) -> Path:
        out = self.workdir / "bundles" / f"{MODEL}-{version}.jfb"
        out.parent.mkdir(exist_ok=True)
        self.jetfleet(
            "bundle",
            "build",
            str(model),
            "--name",
            MODEL,
            "--version",
            version,
            # Batches of 1 to 8 (TensorRT agents need the range); the gate runs batch 1.
            "--profile",
            f"x:1x{IN_DIM}/1x{IN_DIM}/8x{IN_DIM}",
            "--max-regression-pct",
            f"{MAX_REGRESSION_PCT:g}",
            "--probation-s",
            f"{PROBATION_S:g}",
            "--out",
            str(out),
        )
        return out

    def agent(self, device_id: str) -> Agent:
        return next(a for a in self.agents if a.device_id == device_id)

    def switch_off(self, device_id: str) -> None:
        self.agent(device_id).stop()
        self.console.print(f"stopped jetfleet-agent {device_id}")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(d["id"] == device_id and not d.get("online") for d in self.devices_json()):
                return
            time.sleep(0.5)
        raise DemoError(f"{device_id} still shows online {STEP_TIMEOUT_S:g} s after it stopped")

    def catch_up(self, device_id: str) -> dict[str, Any]:
        """Start the robot again and wait until it runs the release (no controller runs:
        every `jetfleet` command has exited)."""
        started = time.monotonic()
        self.agent(device_id).start(self.env)
        self.console.print(f"started jetfleet-agent {device_id} again")
        while time.monotonic() - started < STEP_TIMEOUT_S:
            self._check_agents()
            version = self.fleet_versions().get(device_id)
            if version == V1:
                took = round(time.monotonic() - started, 1)
                self.console.print(f"{device_id} runs {MODEL} {version} after {took:g} s")
                self.jetfleet("devices", "--drift")
                return {"device": device_id, "version": version, "seconds": took}
            time.sleep(0.5)
        raise DemoError(f"{device_id} did not converge to {V1} within {STEP_TIMEOUT_S:g} s")

    def rollout(self, bundle: Path, *extra: str) -> dict[str, Any]:
        self._check_agents()
        out = self.jetfleet(
            "rollout",
            "start",
            str(bundle),
            "--target",
            f"group:{GROUP}",
            "--waves",
            "1,100%",
            "--wave-timeout",
            f"{STEP_TIMEOUT_S:g}",
            *extra,
            "--wait",
            "--output",
            "json",
            check=False,
            show=False,
        )
        self.console.print(
            f"[bold]$ jetfleet rollout start {bundle.name} --target group:{GROUP} "
            f"--waves 1,100% {' '.join(extra)} --wait[/]".replace("  ", " ")
        )
        try:
            summary = json.loads(out)
        except ValueError as e:
            raise DemoError(
                f"`jetfleet rollout start` printed no JSON summary: {out[-500:]}"
            ) from e
        self.show_rollout(summary)
        return self.rollout_outcome(summary)

    @staticmethod
    def rollout_outcome(summary: dict[str, Any]) -> dict[str, Any]:
        rollout = summary.get("rollout", summary)
        devices = summary.get("devices", [])
        return {
            "id": rollout.get("id"),
            "version": rollout.get("version"),
            "state": rollout.get("state"),
            "abort_reason": rollout.get("abort_reason"),
            "devices": {d.get("device_id"): d.get("state") for d in devices},
            "rolled_back": sorted(
                d.get("device_id") for d in devices if d.get("state") == "ROLLED_BACK"
            ),
            "reasons": {d.get("device_id"): d.get("reason") for d in devices if d.get("reason")},
            "codes": {d.get("device_id"): d.get("code") for d in devices if d.get("code")},
            "gate": {d.get("device_id"): d.get("gate") for d in devices if d.get("gate")},
        }

    def show_rollout(self, summary: dict[str, Any]) -> None:
        o = self.rollout_outcome(summary)
        style = "green" if o["state"] == "succeeded" else "red"
        self.console.print(f"rollout {o['id']}: {o['version']} [{style}]{o['state']}[/]")
        table = Table("device", "state", "reason")
        for device, state in sorted(o["devices"].items()):
            code = o["codes"].get(device)
            reason = o["reasons"].get(device) or ""
            text = f"[{code}] {reason}" if code else reason
            table.add_row(device, state or "-", Text(text))  # not rich markup: [code] stays
        self.console.print(table)
        if o["abort_reason"]:
            self.console.print(f"[red]abort: {o['abort_reason']}[/]")

    def telemetry(self) -> dict[str, dict[str, Any]]:
        samples: dict[str, TelemetrySample] = {}
        done = threading.Event()
        topics = Topics()
        client, _ = paho_client(
            self.broker.url, client_id="jetfleet-demo-telemetry", protocol="3.1.1"
        )

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                sample = TelemetrySample.decode(bytes(msg.payload))
            except Exception:  # a malformed sample is skipped, as the ingester does
                return
            samples[sample.device_id] = sample
            if len(samples) == len(self.agents):
                done.set()

        client.on_message = on_message
        client.on_connect = lambda c, *_: c.subscribe(topics.all_telemetry(), qos=0)
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        try:
            done.wait(TELEMETRY_INTERVAL_S * 3 + 2)
        finally:
            client.disconnect()
            client.loop_stop()
        table = Table("device", "uptime", "cpu", "memory used", MODEL, "jobs done/failed")
        out: dict[str, dict[str, Any]] = {}
        for device, s in sorted(samples.items()):
            cpu = s.cpu.mean_percent
            mem = f"{s.mem.used / 2**20:.0f} MB" if s.mem else "-"
            m = s.models.get(MODEL)
            model = "-"
            if m is not None:
                live = f", live p99 {m.p99_ms:.2f} ms" if m.p99_ms is not None else ""
                model = f"{m.version or '-'}{live}"
            table.add_row(
                device,
                f"{s.uptime_s:.0f} s",
                f"{cpu:.0f}%" if cpu is not None else "-",
                mem,
                model,
                f"{s.jobs.done}/{s.jobs.failed}",
            )
            out[device] = json.loads(s.encode())
        self.console.print(table)
        if len(samples) < len(self.agents):
            self.console.print(f"[yellow]telemetry from {len(samples)} of {len(self.agents)}[/]")
        return out

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        self.broker.stop()


def run_demo(workdir: Path | None = None, *, keep: bool = False, console: Console) -> DemoOutcome:
    """Run the whole story; every process it started is stopped before it returns."""
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="jetfleet-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, console)
    ok = False
    try:
        with _terminate_as_interrupt():
            outcome = demo.run()
        ok = outcome.ok
        return outcome
    finally:
        demo.close()
        if own_dir and ok and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"demo files (keys, bundles, agent logs) kept in {work}")


def demo_command(
    workdir: Path | None = typer.Option(
        None, "--workdir", help="where keys, bundles and agent data go [default: a temp dir]"
    ),
    keep: bool = typer.Option(False, "--keep", help="keep the working directory afterwards"),
    output: str = typer.Option("human", "--output", "-o", help="human or json (the outcome)"),
) -> None:
    """Run a local fleet: broker, 3 agents, a canary rollout, an automatic rollback."""
    as_json = output == "json"
    # With --output json the narration goes to stderr and stdout carries the outcome only.
    console = Console(stderr=as_json, highlight=False)
    try:
        outcome = run_demo(workdir, keep=keep, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: agents and broker stopped[/]")
        raise typer.Exit(130) from None
    except (DemoError, OSError) as e:
        console.print(f"[red]demo failed: {e}[/]")
        raise typer.Exit(1) from e
    if as_json:
        sys.stdout.write(json.dumps(outcome.to_dict(), indent=2, default=str) + "\n")
    else:
        console.rule("[bold green]done" if outcome.ok else "[bold red]unexpected outcome")
        on_v1 = sum(v == V1 for v in outcome.fleet.values())
        rolled_back = ", ".join(outcome.second_rollout.get("rolled_back") or []) or "no robot"
        console.print(
            f"{V1} reached every robot ({OFF_ROBOT}, off during the rollout, through the "
            f"release in {outcome.caught_up.get('seconds')} s); {V2} was caught on the "
            f"canary ({rolled_back} rolled back by itself) and the rollout "
            f"{outcome.second_rollout.get('state')}; "
            f"{on_v1} of {len(AGENTS)} robots run {MODEL} {V1} ({outcome.seconds:.0f} s)."
        )
    raise typer.Exit(0 if outcome.ok else 1)
