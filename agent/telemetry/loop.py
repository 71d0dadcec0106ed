"""The telemetry thread: sample, encode, publish, every `interval_s`, whatever happens.

Published QoS 0 by the caller's `publish` (the agent's MQTT client): a sample lost in
flight is replaced by the next one, so nothing is queued or retried here. A failing
sampler or publisher is logged (once per distinct error, then a count) and the loop goes
on; only stop() ends it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from agent.telemetry.sampler import TelemetrySampler

log = structlog.get_logger(__name__)


class TelemetryLoop:
    def __init__(
        self,
        sampler: TelemetrySampler,
        publish: Callable[[bytes], None],
        interval_s: float,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"telemetry interval_s must be > 0, not {interval_s}")
        self.sampler = sampler
        self.publish = publish
        self.interval_s = float(interval_s)
        self.published = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0, *, close_sampler: bool = True) -> None:
        """End the thread; by default also close the sampler (its tegrastats process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if close_sampler:
            self.sampler.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self) -> bool:
        """One sample + publish; False (logged, counted) when either failed."""
        try:
            payload = self.sampler.sample().encode()
            self.publish(payload)
        except Exception as e:  # the loop must outlive any bad sample or broker hiccup
            self.errors += 1
            reason = f"{type(e).__name__}: {e}"
            if reason != self.last_error:
                log.warning("telemetry_sample_failed", reason=reason, errors=self.errors)
            self.last_error = reason
            return False
        self.published += 1
        return True

    def _run(self) -> None:
        # A fixed schedule on the monotonic clock: a slow sample does not push every later
        # one back, and a long stall skips missed ticks instead of bursting to catch up.
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.tick()
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)
