"""Jetson `tegrastats` lines: a parser for every board and JetPack we know, and a reader.

The format drifted across releases, and the parser takes them all:

- JetPack 4 (Nano, TX2, AGX Xavier): `RAM 1500/3964MB (lfb ...) ... GR3D_FREQ 0%@76 ...
  POM_5V_IN 2459/2459` (rails in mW without a unit, `current/average`), or on early AGX
  Xavier releases bare rail names (`GPU 463/463 CPU 618/618 ...`).
- JetPack 5/6 (Xavier NX, AGX Orin, Orin Nano/NX): a `MM-DD-YYYY HH:MM:SS` prefix,
  `GR3D_FREQ 0%` or `0%@[510]` or `0%@[0,0]` (one frequency per GPC), `EMC_FREQ 0%@2133`,
  lower-case sensors `cpu@45.5C`, rails `VDD_IN 5000mW/5000mW`, and -256C for an
  absent sensor.
- Later releases add a maximum: `VDD_IN 5000mW/5000mW/5200mW`, `cpu@51.9C/51.9C`.

Fields we do not know are ignored, so a new engine (`NVENC`, `OFA`, ...) breaks nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from protocol.errors import CodedError

log = structlog.get_logger(__name__)

TEGRASTATS_CANDIDATES = ("tegrastats", "/usr/bin/tegrastats")

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_GR3D = re.compile(r"\bGR3D(\d?)_FREQ (?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?(?=\s|$)")
# A rail: NAME cur/avg[/max] in mW, with or without the unit; the look-ahead keeps
# `RAM 1500/3964MB` and `SWAP 0/2048MB` out.
_RAIL = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "NC"})
# PMIC is a placeholder zone (a constant 100C on Nano and AGX Xavier, 50C on TX2): keeping
# it would put a fake 100 °C at the top of every fleet dashboard.
_NOT_SENSORS = frozenset({"PMIC"})
# tegrastats prints -256C for a sensor that is powered down or absent on this module.
_ABSENT_TEMP = -100.0


class TegrastatsParseError(CodedError, ValueError):
    """A line with none of the fields every tegrastats release prints (RAM, CPU)."""

    code = "tegrastats_parse"


@dataclass
class TegrastatsReading:
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_pct: list[float | None] = field(default_factory=list)  # None: core offline
    cpu_freq_mhz: list[int | None] = field(default_factory=list)
    gpu_load_pct: float | None = None
    gpu_freq_mhz: float | None = None
    emc_pct: float | None = None
    emc_freq_mhz: float | None = None
    temps_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, float] = field(default_factory=dict)  # instantaneous
    power_avg_mw: dict[str, float] = field(default_factory=dict)


def parse_tegrastats(line: str) -> TegrastatsReading:
    """Parse one line of `tegrastats` output; TegrastatsParseError if it is not one."""
    r = TegrastatsReading()
    if m := _RAM.search(line):
        r.ram_used_mb, r.ram_total_mb = int(m[1]), int(m[2])
    if m := _SWAP.search(line):
        r.swap_used_mb, r.swap_total_mb = int(m[1]), int(m[2])
    _parse_cpu(line, r)
    if r.ram_used_mb is None and not r.cpu_pct:
        raise TegrastatsParseError(f"not a tegrastats line: {line[:80]!r}")
    _parse_gpu(line, r)
    if m := _EMC.search(line):
        r.emc_pct = float(m[1])
        r.emc_freq_mhz = float(m[2]) if m[2] else None
    for name, value in _TEMP.findall(line):
        t = float(value)
        if t > _ABSENT_TEMP and name not in _NOT_SENSORS:
            r.temps_c[name] = t
    for rm in _RAIL.finditer(line):
        name = rm[1]
        if name in _NOT_RAILS or name in r.power_mw:
            continue
        r.power_mw[name] = float(rm[2])
        r.power_avg_mw[name] = float(rm[3])
    return r


def _parse_cpu(line: str, r: TegrastatsReading) -> None:
    m = _CPU.search(line)
    if not m:
        return
    shared_freq = int(m[2]) if m[2] else None  # JetPack 3: `CPU [1%,2%]@1734`
    for core in m[1].split(","):
        cm = _CORE.match(core.strip())
        if cm:
            r.cpu_pct.append(float(cm[1]))
            r.cpu_freq_mhz.append(int(cm[2]) if cm[2] else shared_freq)
        else:  # "off", or empty on some boards
            r.cpu_pct.append(None)
            r.cpu_freq_mhz.append(None)


def _parse_gpu(line: str, r: TegrastatsReading) -> None:
    loads: list[float] = []
    freqs: list[float] = []
    for gm in _GR3D.finditer(line):
        if gm[2] is not None:
            loads.append(float(gm[2]))
        if gm[3]:
            freqs.extend(float(f) for f in gm[3].split(",") if f)
    if loads:
        # GR3D_FREQ and GR3D2_FREQ are the two GPCs of one GPU: the busier one bounds it.
        r.gpu_load_pct = max(loads)
    if freqs:
        r.gpu_freq_mhz = max(freqs)


def find_tegrastats() -> str | None:
    for c in TEGRASTATS_CANDIDATES:
        path = shutil.which(c) or (c if Path(c).is_file() else None)
        if path:
            return path
    return None


class TegrastatsReader:
    """Runs `tegrastats --interval MS` and keeps the latest parsed line.

    One long-running process instead of one per sample: tegrastats averages over its
    interval, and starting it costs more than reading its pipe.
    """

    def __init__(self, interval_s: float = 1.0, command: Sequence[str] | None = None) -> None:
        self.interval_s = interval_s
        exe = find_tegrastats() if command is None else None
        if command is None and exe is None:
            raise FileNotFoundError("tegrastats is not installed (not a Jetson?)")
        self.command = (
            list(command)
            if command is not None
            else [str(exe), "--interval", str(max(int(interval_s * 1000), 100))]
        )
        self._lock = threading.Lock()
        self._latest: TegrastatsReading | None = None
        self._latest_at = 0.0
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self.parse_errors = 0

    def start(self) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._pump, name="tegrastats", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                reading = parse_tegrastats(line)
            except TegrastatsParseError as e:
                self.parse_errors += 1
                log.warning("tegrastats_unparsed", reason=str(e))
                continue
            with self._lock:
                self._latest, self._latest_at = reading, time.monotonic()
        log.info("tegrastats_exited", rc=proc.poll())

    def latest(self, max_age_s: float | None = None) -> TegrastatsReading | None:
        """The newest reading, or None when there is none younger than `max_age_s`."""
        with self._lock:
            if self._latest is None:
                return None
            if max_age_s is not None and time.monotonic() - self._latest_at > max_age_s:
                return None
            return self._latest

    def wait_first(self, timeout: float) -> TegrastatsReading | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (r := self.latest()) is not None:
                return r
            time.sleep(0.02)
        return None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The pump thread ends at EOF once the process is gone; close the pipe after it.
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if proc.stdout is not None:
            proc.stdout.close()
