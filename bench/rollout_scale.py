"""A rollout with waves 1,10%,100% to 1,000 simulated devices on one machine.

The devices (tests/controller/fleet.py SimFleet, spread over a few processes, one paho
client per process) handle the real agent protocol: each verifies the operator-signed
command (Ed25519, expiry, target) and acts on a command id once, emits the real job events
and a retained status; only download/build/gate are a fixed delay (`--work-s`).

Side by side in the same run, against the same devices and broker:
  baseline  a bare protocol loop: sign one command per device, publish a wave, wait until
            every device of the wave reported a terminal event; no SQLite, no registry
  jetfleet  controller.rollouts.driver.RolloutDriver: registry, rollout store (every command
            stored before it is published), failure accounting, persistent session
Reported: wall time of each, the controller's added time per device (jetfleet minus
baseline, over the number of devices; medians of the repetitions), messages handled per
second, and the controller process's peak RSS.

    .venv/bin/python bench/rollout_scale.py [--devices 1000] [--procs 4] [--work-s 1.0]
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "controller"), str(REPO / "tests")]

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
import structlog  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from controller.fleet.registry import Registry  # noqa: E402
from controller.mqtt import MqttOptions  # noqa: E402
from controller.rollouts.commands import CommandSigner  # noqa: E402
from controller.rollouts.driver import (  # noqa: E402
    RolloutDriver,
    create_rollout,
    parse_waves,
    plan_waves,
)
from controller.rollouts.store import RolloutStore  # noqa: E402
from controller.sandbox.localbroker import LocalMosquitto  # noqa: E402
from controller.security.keystore import init_keys  # noqa: E402
from protocol.messages import JobEvent  # noqa: E402
from protocol.topics import Topics  # noqa: E402

WAVES = "1,10%,100%"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sim_process(
    broker_url: str,
    trust_bytes: bytes,
    ids: list[str],
    step_s: float,
    ready: mp.Queue,
    stop: mp.Event,
) -> None:  # type: ignore[type-arg]
    from fleet import Behaviour, SimDevice, SimFleet

    from protocol.trust import load_trust_root

    trust = load_trust_root(trust_bytes, datetime.now(timezone.utc))
    devices = []
    for d in ids:
        dev = SimDevice(d, ["fleet"], behaviour=Behaviour(step_s=step_s))
        dev.models["detector"] = {"active": "1.0.0", "previous": None}
        dev.installed["detector"] = {"1.0.0"}
        devices.append(dev)
    fleet = SimFleet(broker_url, trust, devices, per_device_clients=False, name=f"sim{ids[0]}")
    fleet.start()
    ready.put(len(ids))
    stop.wait()
    fleet.stop()


class Baseline:
    """The bare protocol loop the controller is compared with."""

    def __init__(self, broker: LocalMosquitto, signer: CommandSigner) -> None:
        self.topics = Topics()
        self.signer = signer
        self.done: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(200)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(self.topics.all_events(), 1)
        subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        event = JobEvent.decode(msg.payload)
        if event.state.terminal:
            self.done.put(event.command_id)

    def run(self, waves: list[list[str]], version: str) -> float:
        t0 = time.perf_counter()
        for wave in waves:
            pending = set()
            infos = []
            for d in wave:
                signed = self.signer.deploy(
                    d,
                    url="file:///b.jfb",
                    sha256="ab" * 32,
                    size=1,
                    rollout_id="baseline",
                    name="detector",
                    version=version,
                )
                pending.add(signed.command_id)
                infos.append(self.client.publish(self.topics.device_cmd(d), signed.envelope, 1))
            for i in infos:
                i.wait_for_publish(60)
            while pending:
                pending.discard(self.done.get(timeout=120))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def controller_process(
    db: str,
    broker_url: str,
    operator_pem: bytes,
    ids: list[str],
    version: str,
    wave_timeout: float,
    profile: str,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """The controller as `jetfleet rollout start --wait` runs it, alone in its process so
    that its CPU time and RSS are its own: sync the registry from the retained statuses,
    plan and store the rollout, drive it to the end."""
    from controller.fleet.registry import sync_from_broker
    from controller.mqtt import ControllerMqtt
    from protocol.keys import SigningKey

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    rss_imports = rss_mib()
    signer = CommandSigner([SigningKey.from_pem(operator_pem)])
    opts = MqttOptions(broker=broker_url)
    cpu0 = cpu_s()
    registry = Registry.open(db)
    store = RolloutStore(registry.conn, offline=registry.offline_ids)
    with ControllerMqtt(opts) as m:
        synced = sync_from_broker(registry, m, timeout=60)
    assert synced >= len(ids), f"only {synced} statuses"
    rollout = create_rollout(
        store,
        registry,
        kind="deploy",
        model="detector",
        version=version,
        device_ids=ids,
        waves_spec=WAVES,
        max_failure_rate=0.05,
        wave_timeout=wave_timeout,
        auto_rollback=True,
        bundle_url="file:///b.jfb",
        bundle_sha256="ab" * 32,
        bundle_size=1,
    )
    cpu1 = cpu_s()
    driver = RolloutDriver(store, registry, signer, opts, rollout.id)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    final = driver.run()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    elapsed = time.perf_counter() - t0
    cpu2 = cpu_s()
    summary = store.summary(rollout.id)
    if final.state != "succeeded" or summary.failed:
        raise SystemExit(f"rollout {final.state}: {summary.failures[:3]}")
    registry.conn.close()
    out.put(
        {
            "elapsed": elapsed,
            "setup_cpu": cpu1 - cpu0,
            "drive_cpu": cpu2 - cpu1,
            "messages": driver.messages_handled,
            "busy": driver.busy_s,
            "rss_imports": rss_imports,
            "rss_peak": rss_mib(),
        }
    )


def run_jetfleet(
    ctx: Any,
    db: str,
    broker: LocalMosquitto,
    operator_pem: bytes,
    ids: list[str],
    version: str,
    wave_timeout: float,
    profile: str,
    server: psutil.Process | None,
) -> dict[str, float]:
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    server_cpu0 = tree_cpu_s(server)
    p = ctx.Process(
        target=controller_process,
        args=(db, broker.url, operator_pem, ids, version, wave_timeout, profile, out),
    )
    p.start()
    result: dict[str, float] = out.get(timeout=3600)
    p.join(60)
    result["db_server_cpu"] = tree_cpu_s(server) - server_cpu0
    return result


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tree_cpu_s(proc: psutil.Process | None) -> float:
    """CPU seconds of a server process and its children (PostgreSQL's backends)."""
    if proc is None:
        return 0.0
    # Backends that ended (the controller's connections) count in the server's
    # children_* times once reaped; the live ones in their own.
    t = proc.cpu_times()
    total = t.children_user + t.children_system
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def database(kind: str, tmp: Path) -> tuple[Any, Callable[[], str], psutil.Process | None]:
    """(server or None, a new database per call, the server's process for its CPU)."""
    if kind == "sqlite":
        counter = iter(range(1000))
        return None, lambda: str(tmp / f"controller-{next(counter)}.db"), None
    from tests.postgres import LocalPostgres, postgres_missing

    why = postgres_missing()
    if why:
        raise SystemExit(why)
    server = LocalPostgres()
    server.start()
    assert server.proc is not None
    return server, server.create_database, psutil.Process(server.proc.pid)


def start_sims(
    ctx: Any, broker: LocalMosquitto, trust: bytes, ids: list[str], procs: int, step_s: float
) -> tuple[list[Any], Any]:
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    stop = ctx.Event()
    chunk = (len(ids) + procs - 1) // procs
    workers = [
        ctx.Process(
            target=sim_process, args=(broker.url, trust, ids[i : i + chunk], step_s, ready, stop)
        )
        for i in range(0, len(ids), chunk)
    ]
    for p in workers:
        p.start()
    assert sum(ready.get(timeout=300) for _ in workers) == len(ids)
    return workers, stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--work-s", type=float, default=1.0, help="each job's fixed delay")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--profile", default="", help="cProfile the driver of the last rep here")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    tmp = Path(tempfile.mkdtemp(prefix="rollout-scale-"))
    keys = init_keys(tmp / "keys")
    signer = CommandSigner([keys.operator])
    ids = [f"robot-{i:05d}" for i in range(args.devices)]
    step_s = args.work_s / 8  # the terminal event comes eight steps after RECEIVED
    ctx = mp.get_context("spawn")
    server, new_db, server_proc = database(args.db, tmp)
    runs: list[dict[str, float]] = []
    base, base_cpu = [], []
    try:
        with LocalMosquitto(tmp / "broker") as broker:
            sims, stop = start_sims(ctx, broker, keys.trust_envelope, ids, args.procs, step_s)
            time.sleep(1.0)
            waves = plan_waves(ids, parse_waves(WAVES))
            try:
                baseline = Baseline(broker, signer)
                for rep in range(args.reps):
                    c0 = cpu_s()
                    base.append(baseline.run(waves, f"2.{rep}.0"))
                    base_cpu.append(cpu_s() - c0)
                    last = rep == args.reps - 1
                    r = run_jetfleet(
                        ctx, new_db(), broker, keys.operator.to_pem(), ids, f"3.{rep}.0",
                        wave_timeout=120 + 10 * args.work_s, server=server_proc,
                        profile=args.profile if last else "",
                    )  # fmt: skip
                    runs.append(r)
                    print(
                        f"rep {rep + 1}: baseline {base[-1]:.2f}s wall {base_cpu[-1]:.2f}s CPU;"
                        f"  jetfleet {r['elapsed']:.2f}s wall {r['drive_cpu']:.2f}s CPU "
                        f"(+{r['setup_cpu']:.2f}s sync and create, database server "
                        f"{r['db_server_cpu']:.2f}s), {r['messages']:.0f} messages, "
                        f"peak RSS {r['rss_peak']:.0f} MiB",
                        flush=True,
                    )
                baseline.close()
            finally:
                stop.set()
                for p in sims:
                    p.join(30)
    finally:
        if server is not None:
            server.stop()
    report(args, ids, waves, base, base_cpu, runs)


def report(
    args: argparse.Namespace,
    ids: list[str],
    waves: list[list[str]],
    base: list[float],
    base_cpu: list[float],
    runs: list[dict[str, float]],
) -> None:
    n = len(ids)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    b, o = statistics.median(base), med("elapsed")
    print()
    print(
        f"devices {n} in {args.procs} processes, waves {WAVES} "
        f"({'/'.join(str(len(w)) for w in waves)}), job work {args.work_s:g}s each, "
        f"database {args.db}; medians of {len(runs)}"
    )
    print(f"devices' own work (3 waves x work)   {3 * args.work_s:.2f} s")
    print(f"baseline bare protocol loop          {b:.2f} s wall, "
          f"{statistics.median(base_cpu) / n * 1000:.2f} ms CPU per device")  # fmt: skip
    print(f"jetfleet RolloutDriver               {o:.2f} s wall   ratio {o / b:.2f}x")
    drive = med("drive_cpu") / n * 1000
    print(f"controller CPU per device (driver)   {drive:.2f} ms   (goal < 5 ms)")
    print(
        f"  + registry sync and rollout create {med('setup_cpu') / n * 1000:.2f} ms; "
        f"database server {med('db_server_cpu') / n * 1000:.2f} ms"
    )
    print(f"controller wall added per device     {(o - b) / n * 1000:.2f} ms")
    print(
        f"messages handled                     {med('messages'):.0f} per rollout, "
        f"{med('messages') / med('busy'):.0f}/s of the driver's busy time"
    )
    print(
        f"controller process peak RSS          {max(r['rss_peak'] for r in runs):.0f} MiB "
        f"({statistics.median(r['rss_imports'] for r in runs):.0f} MiB after imports; "
        "goal < 300 MiB)"
    )


if __name__ == "__main__":
    main()
