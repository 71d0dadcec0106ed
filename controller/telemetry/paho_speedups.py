"""A faster decoding of incoming MQTT 5 PUBLISH properties, for telemetry ingestion only.

paho 2.x decodes every incoming MQTT 5 PUBLISH into a fresh `Properties`, whose
__init__ rebuilds three constant tables and whose unpack() first clears 27 names:
about 20 µs per message, half of paho's whole cost per telemetry sample (measured in
bench/telemetry_ingest.py). `PublishProperties` shares the tables (paho only reads them)
and skips the clearing for a fresh object with an empty property block, the common
case; anything else goes through paho's own code unchanged.

This swaps a class in paho's private packet module, so it is guarded twice: only on the
paho minor version it was written against (`WRITTEN_FOR`), and only when that module
still holds paho's own `Properties`. Otherwise `install()` says no and paho runs as
shipped, just slower. tests/controller/test_paho_speedups.py checks that it decodes
exactly as paho does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import structlog
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.properties import Properties

try:
    import paho.mqtt._packet as _paho_packet

    _packet: ModuleType | None = _paho_packet
except ImportError:  # a paho without that private module: nothing to speed up
    _packet = None

log = structlog.get_logger(__name__)

# The paho-mqtt release line (major.minor) whose private _packet module this replaces into.
WRITTEN_FOR = "2.2"


class PublishProperties(Properties):
    """paho's MQTT 5 Properties, built without rebuilding its lookup tables every time."""

    _tables: ClassVar[dict[str, Any] | None] = None

    def __init__(self, packetType: int) -> None:
        tables = PublishProperties._tables
        if tables is None:
            ref = Properties(packetType)
            tables = {k: getattr(ref, k) for k in ("types", "names", "properties")}
            PublishProperties._tables = tables
        object.__setattr__(self, "packetType", packetType)
        for k, v in tables.items():
            object.__setattr__(self, k, v)

    def unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":  # property length 0: nothing to read or clear
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)
        return result


def applies(version: str = PAHO_VERSION) -> bool:
    """Whether this paho version is the one the speed-up was written against."""
    return version.split(".")[:2] == WRITTEN_FOR.split(".")


def install() -> bool:
    """Decode incoming PUBLISH properties with PublishProperties; False (paho as shipped)
    on another paho version or when its packet module is not what this expects."""
    if not applies():
        log.info("paho_speedups_skipped", reason=f"paho {PAHO_VERSION}, not {WRITTEN_FOR}.x")
        return False
    if getattr(_packet, "Properties", None) not in (Properties, PublishProperties):
        log.warning("paho_speedups_skipped", reason="paho.mqtt._packet changed")
        return False
    _packet.Properties = PublishProperties  # type: ignore[union-attr]
    return True


def uninstall() -> None:
    """paho's own decoding again (the benchmark's baseline, and the equality test)."""
    if getattr(_packet, "Properties", None) is PublishProperties:
        _packet.Properties = Properties  # type: ignore[union-attr]


def installed() -> bool:
    return getattr(_packet, "Properties", None) is PublishProperties
