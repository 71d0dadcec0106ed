"""Live updates: one poller reads the stores and fans changes out to every subscriber.

Twenty browsers on the fleet page cost one read of the fleet per interval, not twenty:
the poller runs while anyone listens, computes each view once, and pushes only what
changed to the subscribers of its topic (`fleet`, `rollouts`, `rollout:ID`, `robot:ID`:
the robot with its jobs, and its telemetry).
A subscriber whose queue is full (a stalled browser) loses its oldest events: its page
resyncs from the API on reconnect, and the server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from anyio import to_thread

from controller.console.data import ConsoleData

log = structlog.get_logger(__name__)

QUEUE_EVENTS = 64
HEARTBEAT_S = 15.0


@dataclass(eq=False)  # one per client, in a set by identity
class Subscriber:
    topics: frozenset[str]
    queue: asyncio.Queue[tuple[str, str]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_EVENTS)
    )

    def offer(self, event: str, data: str) -> None:
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait((event, data))


@dataclass
class Snapshot:
    """What the subscribers were last told, to push only changes."""

    robots: dict[str, str] = field(default_factory=dict)
    rollouts: dict[str, str] = field(default_factory=dict)
    rollout: dict[str, str] = field(default_factory=dict)
    robot: dict[str, str] = field(default_factory=dict)
    telemetry: dict[str, float] = field(default_factory=dict)


class Hub:
    def __init__(self, data: ConsoleData, interval_s: float = 1.0) -> None:
        self.data = data
        self.interval_s = interval_s
        self.subscribers: set[Subscriber] = set()
        self.polls = 0
        self._task: asyncio.Task[None] | None = None
        self._seen = Snapshot()

    def topics(self) -> set[str]:
        return {t for s in self.subscribers for t in s.topics}

    def publish(self, topic: str, event: str, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":"))
        for s in self.subscribers:
            if topic in s.topics:
                s.offer(event, data)

    async def stream(self, topics: frozenset[str]) -> AsyncIterator[str]:
        """Server-sent events for one client, until it goes away."""
        sub = Subscriber(topics)
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    event, data = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: {event}\ndata: {data}\n\n"
        finally:
            self.subscribers.discard(sub)

    async def _run(self) -> None:
        while self.subscribers:
            try:
                await to_thread.run_sync(self._poll_and_publish)
            except Exception as e:  # a locked or missing database: try again next time
                log.warning("console_poll_failed", error=str(e))
            await asyncio.sleep(self.interval_s)

    # The reads run on a worker thread; publishing touches asyncio queues, so it is
    # handed back to the loop.
    def _poll_and_publish(self) -> None:
        self.polls += 1
        topics = self.topics()
        out: list[tuple[str, str, Any]] = []
        if "fleet" in topics:
            out += self._fleet()
        if "rollouts" in topics or any(t.startswith("rollout:") for t in topics):
            out += self._rollouts(topics)
        robots = [t.split(":", 1)[1] for t in topics if t.startswith("robot:")]
        if robots:
            out += [e for device in sorted(robots) for e in self._one_robot(device)]
            out += self._telemetry(robots)
        if out:
            from anyio import from_thread

            from_thread.run_sync(self._publish_all, out)

    def _publish_all(self, out: list[tuple[str, str, Any]]) -> None:
        for topic, event, payload in out:
            self.publish(topic, event, payload)

    def _fleet(self) -> list[tuple[str, str, Any]]:
        rows = self.data.fleet_rows()
        now = {r["id"]: json.dumps(r, sort_keys=True) for r in rows}
        changed = [r for r in rows if self._seen.robots.get(r["id"]) != now[r["id"]]]
        gone = sorted(set(self._seen.robots) - set(now))
        self._seen.robots = now
        if not changed and not gone:
            return []
        # The whole fleet's counts ride along: no page asks the server for them again.
        counts = {
            "total": len(rows),
            "online": sum(1 for r in rows if r["online"]),
            "drifting": sum(1 for r in rows if r["drift"]),
        }
        return [("fleet", "robots", {"changed": changed, "gone": gone, "counts": counts})]

    def _rollouts(self, topics: set[str]) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        if "rollouts" in topics:  # a rollout's own page needs no list
            briefs = self.data.rollouts()
            now = {b["id"]: json.dumps(b, sort_keys=True) for b in briefs}
            changed = [b for b in briefs if self._seen.rollouts.get(b["id"]) != now[b["id"]]]
            self._seen.rollouts = now
            if changed:
                out.append(("rollouts", "rollouts", {"changed": changed}))
        for t in sorted(topics):
            if t.startswith("rollout:"):
                out += self._one_rollout(t)
        return out

    def _one_rollout(self, topic: str) -> list[tuple[str, str, Any]]:
        detail = self.data.rollout(topic.split(":", 1)[1])
        text = json.dumps(detail, sort_keys=True)
        if detail is None or self._seen.rollout.get(topic) == text:
            return []
        self._seen.rollout[topic] = text
        return [(topic, "rollout", detail)]

    def _one_robot(self, device: str) -> list[tuple[str, str, Any]]:
        """The robot page's top half (models, jobs and their states), when it changed."""
        detail = self.data.robot(device)
        text = json.dumps(detail, sort_keys=True)
        if detail is None or self._seen.robot.get(device) == text:
            return []
        self._seen.robot[device] = text
        return [(f"robot:{device}", "robot", detail)]

    def _telemetry(self, robots: list[str]) -> list[tuple[str, str, Any]]:
        latest = self.data.latest_telemetry()
        out: list[tuple[str, str, Any]] = []
        for device in robots:
            ts = latest.get(device)
            last = self._seen.telemetry.get(device)
            if ts is None or (last is not None and ts <= last):
                continue
            lo = last + 1e-6 if last is not None else ts
            points = self.data.telemetry_between(device, lo, time.time() + 1)
            self._seen.telemetry[device] = ts
            out.append((f"robot:{device}", "telemetry", {"device": device, **points}))
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
