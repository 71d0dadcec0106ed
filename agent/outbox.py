"""Events leave in seq order, QoS 1, and stay in SQLite until the broker's PUBACK.

paho keeps unacknowledged QoS 1 messages in memory and resends them in order after a
reconnect; the outbox table covers what paho cannot: an agent restart. On start every
row still there is published again from the lowest seq (a consumer may see an event
twice, never out of order, never missing; it de-duplicates by seq).

Ordering across a reconnect: paho resends its unacknowledged messages only after the
on_connect callback, and sends a new publish at once, so a new event could overtake an
old one. The outbox therefore publishes only while connected, and after a reconnect
waits until everything published before the disconnect is acknowledged; if that does
not happen within STALE_RESEND_S it republishes from the oldest unacknowledged seq.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

from agent.store import Store

log = structlog.get_logger("jetfleet.agent.outbox")


STALE_RESEND_S = 10.0


class Outbox:
    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes], int],
        is_connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self._publish = publish
        self._is_connected = is_connected
        self._disconnected = threading.Event()
        self._stale: set[int] = set()
        self._stale_since = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked_mids: deque[int] = deque()
        self._mid_to_seq: dict[int, int] = {}
        self._last_sent = 0
        self.last_acked = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            self._flush_acks()

    def wake(self) -> None:
        self._wake.set()

    def on_published(self, mid: int) -> None:
        """paho's network thread, holding paho's message lock: only append and wake."""
        self._acked_mids.append(mid)
        self._wake.set()

    def on_disconnected(self) -> None:
        """paho's network thread: remember that in-flight messages will be resent."""
        self._disconnected.set()
        self._wake.set()

    def pending(self) -> int:
        return self.store.outbox_size()

    def _flush_acks(self) -> None:
        seqs = []
        while self._acked_mids:
            mid = self._acked_mids.popleft()
            seq = self._mid_to_seq.pop(mid, None)
            if seq is not None:
                seqs.append(seq)
        if seqs:
            self.store.outbox_ack(seqs)
            self.last_acked = max(self.last_acked, *seqs)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.pump()
            self._wake.wait(delay)
            self._wake.clear()

    def pump(self) -> float:
        """Publish what is due, in seq order; returns how long the thread may sleep.

        Called by the outbox thread and, to save a thread hop on the latency path, by
        whoever just committed an event (the command processor, the worker); the lock
        keeps one pump at a time, so the order holds."""
        with self._lock:
            try:
                self._flush_acks()
                if self._disconnected.is_set():
                    self._disconnected.clear()
                    self._stale = set(self._mid_to_seq)
                    self._stale_since = time.monotonic()
                self._stale &= set(self._mid_to_seq)
                if not self._is_connected():
                    self._stale_since = time.monotonic()
                    return 0.5
                if self._stale:
                    if time.monotonic() - self._stale_since < STALE_RESEND_S:
                        return 0.2
                    oldest = min(self._mid_to_seq[m] for m in self._stale)
                    log.warning("outbox_resend", from_seq=oldest, pending=len(self._stale))
                    self._last_sent = oldest - 1
                    self._mid_to_seq.clear()
                    self._stale.clear()
                while True:
                    rows = self.store.outbox_after(self._last_sent)
                    if not rows:
                        break
                    for seq, topic, payload in rows:
                        mid = self._publish(topic, payload)
                        self._mid_to_seq[mid] = seq
                        self._last_sent = seq
            except Exception:
                log.exception("outbox_error")
                return 1.0
        return 1.0
