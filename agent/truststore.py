"""The trust root the agent holds now: the provisioned file plus every rotation since.

Each accepted rotation is kept as data_dir/trust/<version>.json (written atomically); on
start the chain is replayed from the provisioned root with protocol.trust.rotate, so a
file dropped into that directory by anyone without the root keys is refused.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import structlog

from agent.config import ConfigError
from protocol.dsse import Envelope
from protocol.errors import ProtocolError
from protocol.fsio import write_atomic
from protocol.trust import TrustRoot, load_trust_root, rotate, rotate_chain

log = structlog.get_logger("jetfleet.agent.trust")


def read_provisioned(path: Path) -> bytes:
    """The provisioned trust root's bytes; a missing or unreadable file is a config error
    naming the `trust_root` key (exit 2), not a bare errno."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"config key trust_root: cannot read the trust root {path}: {e.strerror or e}; "
            "copy DIR/trust.json from `jetfleet keys init DIR` there",
            key="trust_root",
        ) from e


class TrustStore:
    def __init__(self, provisioned: Path, data_dir: Path, now: datetime) -> None:
        self.dir = Path(data_dir) / "trust"
        self._lock = threading.Lock()
        # Expiry is judged on the newest root only (TUF): the provisioned file may well have
        # expired after the fleet rotated to a newer root that is stored in trust/.
        self._root = load_trust_root(read_provisioned(provisioned), now, check_expiry=False)
        if self.dir.is_dir():
            chain = sorted(
                (p for p in self.dir.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem)
            )
            for p in chain:
                if int(p.stem) <= self._root.version:
                    continue
                try:
                    env = Envelope.decode(p.read_bytes())
                    # Accepted before; older agents allowed skipped versions.
                    self._root = rotate(self._root, env, now, check_expiry=False, consecutive=False)
                except ProtocolError as e:
                    log.error("trust_chain_refused", file=str(p), code=e.code, reason=e.reason)
                    break
        if now >= self._root.expires:
            # Keep running: every command and bundle is then rejected with code
            # trust_expired, which the operator sees, instead of a restart loop they don't.
            log.error(
                "trust_root_expired",
                version=self._root.version,
                expires=self._root.expires.isoformat(),
                fix="push a new trust root (jetfleet keys rotate + keys push) or fix the clock",
            )

    @property
    def root(self) -> TrustRoot:
        with self._lock:
            return self._root

    def update(
        self, envelope: Envelope, now: datetime, chain: list[Envelope] | None = None
    ) -> TrustRoot:
        """Rotate to a new trust root through `chain`, the roots in between (oldest first;
        TUF's rule, one version at a time), persisting each before using it."""
        with self._lock:
            held = self.dir / f"{self._root.version}.json"
            if held.is_file() and held.read_bytes() == envelope.encode():
                return self._root  # stored already: a retried intake, not a replay
            steps = rotate_chain(self._root, [*(chain or []), envelope], now)
            self.dir.mkdir(parents=True, exist_ok=True)
            for root, env in steps:
                write_atomic(self.dir / f"{root.version}.json", env.encode())
            self._root = steps[-1][0]
            return self._root
