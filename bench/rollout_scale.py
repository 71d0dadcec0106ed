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
import multiprocessing as mp
import queue
import resource
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "controller"), str(REPO / "tests")]

import paho.mqtt.client as mqtt  # noqa: E402
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


def run_jetfleet(
    tmp: Path,
    broker: LocalMosquitto,
    signer: CommandSigner,
    ids: list[str],
    version: str,
    wave_timeout: float,
) -> tuple[float, int, float]:
    registry = Registry.open(tmp / f"controller-{version}.db")
    store = RolloutStore(registry.conn, offline=registry.offline_ids)
    opts = MqttOptions(broker=broker.url)
    from controller.fleet.registry import sync_from_broker
    from controller.mqtt import ControllerMqtt

    with ControllerMqtt(opts) as m:
        synced = sync_from_broker(registry, m, timeout=30)
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
    driver = RolloutDriver(store, registry, signer, opts, rollout.id)
    t0 = time.perf_counter()
    final = driver.run()
    elapsed = time.perf_counter() - t0
    summary = store.summary(rollout.id)
    if final.state != "succeeded" or summary.failed:
        raise SystemExit(f"rollout {final.state}: {summary.failures[:3]}")
    registry.conn.close()
    return elapsed, driver.messages_handled, driver.busy_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--work-s", type=float, default=1.0, help="each job's fixed delay")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    tmp = Path(tempfile.mkdtemp(prefix="rollout-scale-"))
    keys = init_keys(tmp / "keys")
    signer = CommandSigner([keys.operator])
    ids = [f"robot-{i:04d}" for i in range(args.devices)]
    step_s = args.work_s / 8  # the terminal event comes eight steps after RECEIVED
    rss_start = rss_mib()
    with LocalMosquitto(tmp / "broker") as broker:
        ctx = mp.get_context("spawn")
        ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        stop = ctx.Event()
        chunk = (len(ids) + args.procs - 1) // args.procs
        procs = [
            ctx.Process(
                target=sim_process,
                args=(broker.url, keys.trust_envelope, ids[i : i + chunk], step_s, ready, stop),
            )
            for i in range(0, len(ids), chunk)
        ]
        for p in procs:
            p.start()
        assert sum(ready.get(timeout=120) for _ in procs) == len(ids)
        time.sleep(1.0)
        waves = plan_waves(ids, parse_waves(WAVES))
        base, ours, rates, capacity = [], [], [], []
        handled = 0
        try:
            baseline = Baseline(broker, signer)
            for rep in range(args.reps):
                base.append(baseline.run(waves, f"2.{rep}.0"))
                t, handled, busy = run_jetfleet(
                    tmp, broker, signer, ids, f"3.{rep}.0", wave_timeout=60 + 10 * args.work_s
                )
                ours.append(t)
                rates.append(handled / t)
                capacity.append(handled / busy)
                print(
                    f"rep {rep + 1}: baseline {base[-1]:.2f}s  jetfleet {t:.2f}s  "
                    f"({handled} messages)",
                    flush=True,
                )
            baseline.close()
        finally:
            stop.set()
            for p in procs:
                p.join(30)
    b, o = statistics.median(base), statistics.median(ours)
    added_ms = (o - b) / len(ids) * 1000
    peak = rss_mib()
    print()
    print(
        f"devices {len(ids)} in {len(procs)} processes, waves {WAVES} "
        f"({'/'.join(str(len(w)) for w in waves)}), job work {args.work_s:g}s each"
    )
    print(f"devices' own work (3 waves x work)  {3 * args.work_s:.2f} s")
    print(f"baseline bare protocol loop (median) {b:.2f} s")
    print(f"jetfleet RolloutDriver (median)      {o:.2f} s   ratio {o / b:.2f}x")
    print(f"controller added per device          {added_ms:.2f} ms   (goal < 50 ms)")
    print(
        f"messages handled per second (median) {statistics.median(rates):.0f} /s over the "
        f"rollout; {statistics.median(capacity):.0f} /s of the driver's busy time "
        "(its capacity: decode, verify ownership, SQLite)"
    )
    print(
        f"controller process peak RSS          {peak:.0f} MiB (at start {rss_start:.0f} MiB; "
        f"goal < 200 MiB)"
    )


if __name__ == "__main__":
    main()
