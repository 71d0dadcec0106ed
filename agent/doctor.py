"""`jetfleet-agent doctor`: the checks an operator runs first on a robot.

Each check gives one line (pass, warn or fail) and, unless it passed, what to do. Exit
status: 0 when nothing failed, 1 when something did (warnings do not fail). `root` is the
file-system root the Jetson files are read from (/etc/nv_tegra_release,
/proc/device-tree/model, /proc/meminfo, /dev/...), so tests feed recorded Jetson files;
paths inside the config (trust root, TLS files, data dir) are used as written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import typer

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from agent.hardware import detect_hardware, meminfo_bytes, parse_version
from agent.store import Store, StoreError
from agent.truststore import TrustStore
from protocol.dsse import Envelope
from protocol.errors import ProtocolError, TrustExpiredError
from protocol.transport import (
    BrokerAddress,
    TransportConfigError,
    diagnose_tls,
    paho_client,
    parse_broker_urls,
)
from protocol.trust import TrustRoot

PASS, WARN, FAIL = "pass", "warn", "fail"
# Earliest plausible wall-clock time: a Jetson without an RTC battery boots in the past
# (1970, or the kernel's build date) until NTP answers, and every expiry check is then wrong.
EARLIEST_PLAUSIBLE = datetime(2025, 1, 1, tzinfo=timezone.utc)
TRUST_EXPIRY_WARNING = timedelta(days=30)
DEFAULT_MIN_FREE_MEM_MB = 512
# Jetson Linux R35 = JetPack 5, R36 = JetPack 6 (Ubuntu 22.04, Python 3.10); R32 (JetPack 4)
# has no Python 3.10 and no TensorRT 8.5+.
MIN_L4T_MAJOR = 35
# GPU device nodes: Jetson (L4T 35: nvhost-ctrl-gpu; L4T 36 also nvgpu/igpu0), then dGPU.
GPU_NODES = ("dev/nvhost-ctrl-gpu", "dev/nvgpu/igpu0/ctrl", "dev/nvidia0")


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""


def _result(name: str, status: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, status, detail, fix if status != PASS else "")


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


# ---------------------------------------------------------------------------- checks


def check_jetpack(root: Path, config: AgentConfig) -> CheckResult:
    hw = detect_hardware(root=root)
    model = hw.model or "unknown model"
    need_jetson = config.backend == "tensorrt"
    text = _read(root, "etc/nv_tegra_release")
    if text is None:
        return _result(
            "jetpack",
            FAIL if need_jetson else WARN,
            f"/etc/nv_tegra_release not found: not a Jetson ({model})",
            'on a Jetson, flash JetPack 5 or 6; elsewhere set backend = "onnxruntime"',
        )
    if hw.l4t is None:
        first = text.splitlines()[0] if text.strip() else "(empty)"
        return _result(
            "jetpack",
            FAIL,
            f"/etc/nv_tegra_release is not in the Jetson Linux format: {first[:80]!r}",
            "reinstall the nvidia-l4t-core package (JetPack) or reflash",
        )
    detail = (
        f"Jetson Linux R{hw.l4t}"
        + (f" (JetPack {hw.jetpack})" if hw.jetpack else "")
        + f", {model}"
    )
    if parse_version(hw.l4t)[0] < MIN_L4T_MAJOR:
        return _result(
            "jetpack",
            FAIL,
            detail + f": too old, jetfleet needs R{MIN_L4T_MAJOR}+ (JetPack 5 or 6)",
            "upgrade to JetPack 6 (Orin) or JetPack 5 (Xavier); JetPack 4 has no Python 3.10",
        )
    return _result("jetpack", PASS, detail)


def check_tensorrt(
    config: AgentConfig,
    import_module: Callable[[str], Any] = importlib.import_module,
    root: Path = Path("/"),
) -> CheckResult:
    try:
        trt = import_module("tensorrt")
    except Exception as e:  # ImportError, or a broken install raising anything at import
        status = _missing_status(config)
        fallback = "" if config.backend == "tensorrt" else _CPU_FALLBACK
        library = detect_hardware(root=root).tensorrt
        installed = f"; libnvinfer {library} is installed" if library else ""
        return _result(
            "tensorrt",
            status,
            f"the tensorrt module cannot be imported ({type(e).__name__}: {e}){installed}"
            + fallback,
            "on a Jetson: apt-get install python3-libnvinfer, and make sure the agent's venv "
            "was made with --system-site-packages (systemd/install.sh does)",
        )
    version = str(getattr(trt, "__version__", "unknown"))
    where = getattr(trt, "__file__", None) or "?"
    return _result("tensorrt", PASS, f"TensorRT {version} ({where})")


_CPU_FALLBACK = "; engines will use onnxruntime on the CPU (10-50x slower than TensorRT)"


def _missing_status(config: AgentConfig) -> str:
    """A missing TensorRT piece fails where TensorRT is required, else warns."""
    required = config.backend == "tensorrt" or (
        config.backend == "auto" and not config.allow_cpu_fallback
    )
    return FAIL if required else WARN


def check_pycuda(
    config: AgentConfig, import_module: Callable[[str], Any] = importlib.import_module
) -> CheckResult:
    """The TensorRT runner's CUDA layer: without it `auto` silently means the CPU."""
    if config.backend == "onnxruntime":
        return _result("pycuda", PASS, "not needed (backend = onnxruntime)")
    try:
        pycuda = import_module("pycuda.driver")
    except Exception as e:  # ImportError, or a pycuda built against another CUDA
        refused = (
            " and allow_cpu_fallback = false refuses that" if not config.allow_cpu_fallback else ""
        )
        fallback = "" if config.backend == "tensorrt" else _CPU_FALLBACK + refused
        return _result(
            "pycuda",
            _missing_status(config),
            f"pycuda cannot be imported ({type(e).__name__}: {e}): TensorRT engines cannot "
            "run" + fallback,
            "pycuda builds from source on JetPack 6 and needs nvcc: in the agent's venv run "
            "PATH=/usr/local/cuda/bin:$PATH pip install pycuda",
        )
    version = str(getattr(pycuda, "__version__", "") or "installed")
    return _result("pycuda", PASS, f"pycuda {version}")


def check_gpu(root: Path, config: AgentConfig) -> CheckResult:
    present = [root / n for n in GPU_NODES if (root / n).exists()]
    need_gpu = config.backend == "tensorrt"
    user = _username()
    if not present:
        return _result(
            "gpu",
            FAIL if need_gpu else WARN,
            "no GPU device node found (/dev/nvhost-ctrl-gpu, /dev/nvgpu/igpu0/ctrl, /dev/nvidia0)",
            "check the JetPack install (nvidia-l4t-kernel) or, in a container, pass the GPU "
            "devices through",
        )
    usable = [p for p in present if os.access(p, os.R_OK | os.W_OK)]
    shown = ", ".join("/" + str(p.relative_to(root)) for p in present)
    if not usable:
        return _result(
            "gpu",
            FAIL,
            f"{shown} exist but user {user} cannot open them",
            f"add {user} to the groups that own them: usermod -aG video,render {user} "
            "(the unit sets SupplementaryGroups=video render), and set no PrivateDevices=",
        )
    return _result("gpu", PASS, f"{shown} reachable by {user}")


def _username() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _not_writable(directory: Path) -> str | None:
    """Why `directory` cannot take a new file, or None. A real write, since root ignores
    permission bits; a read-only mount is named as such."""
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return f"{directory} is on a read-only file system"
    probe = directory / f".doctor-write-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return f"{directory} is not writable by {_username()}: {e.strerror or e}"
    os.close(fd)
    probe.unlink()
    return None


def check_disk(config: AgentConfig) -> CheckResult:
    minimum = config.limits.min_free_disk_mb
    target = _nearest_existing(config.data_dir)
    try:
        free_mb = shutil.disk_usage(target).free // (1024 * 1024)
        unwritable = _not_writable(target)
    except OSError as e:
        return _result("disk", FAIL, f"cannot read free space of {target}: {e.strerror}", "")
    if unwritable is not None:
        return _result(
            "disk",
            FAIL,
            unwritable,
            "the agent writes its state, downloads and engines there: remount it read-write "
            "(or point data_dir elsewhere) and make it owned by the agent's user",
        )
    suffix = "" if target == config.data_dir else f" ({config.data_dir} does not exist yet)"
    detail = f"{free_mb} MB free on {target}{suffix}, minimum {minimum} MB"
    if free_mb < minimum:
        return _result(
            "disk",
            FAIL,
            detail,
            "free space (old engines live in data_dir/engines; the cache evicts above "
            "limits.engine_cache_mb) or lower limits.min_free_disk_mb",
        )
    return _result("disk", PASS, detail)


def check_state(config: AgentConfig) -> CheckResult:
    """state.db read-only (the agent may be running), with SQLite's quick_check."""
    db = config.data_dir / "state.db"
    if not db.is_file():
        return _result("state", PASS, f"no {db} yet (the agent creates it at its first start)")
    try:
        store = Store(db, readonly=True)
    except StoreError as e:
        return _result(
            "state",
            FAIL,
            e.reason,
            "restart the agent: it moves the file aside as state.db.corrupt-<time> and starts "
            "fresh (installed models stay active; commands issued before are refused: "
            "re-issue them)",
        )
    except sqlite3.Error as e:
        return _result(
            "state",
            FAIL,
            f"cannot open {db}: {e}",
            "check that data_dir is owned by the agent's user and that the disk is healthy",
        )
    try:
        jobs, pending, reset_at = store.job_count(), store.outbox_size(), store.reset_at()
    finally:
        store.close()
    detail = f"{db}: integrity ok, {jobs} jobs, {pending} event(s) waiting to be sent"
    kept = sorted(
        p.name
        for p in db.parent.glob("state.db.corrupt-*")
        if not p.name.endswith(("-wal", "-shm"))
    )
    if reset_at is not None and kept:
        when = datetime.fromtimestamp(reset_at, timezone.utc)
        return _result(
            "state",
            WARN,
            f"{detail}; started fresh at {when:%Y-%m-%d %H:%M}Z after corruption "
            f"(corrupt copy: {kept[-1]})",
            "commands issued before that were refused as state_reset: re-issue them; "
            f"delete {kept[-1]} once it has been looked at",
        )
    return _result("state", PASS, detail)


def check_memory(root: Path, minimum_mb: int) -> CheckResult:
    available_bytes = meminfo_bytes("MemAvailable", root)
    if available_bytes is None:
        return _result("memory", WARN, "/proc/meminfo has no MemAvailable line", "")
    available = available_bytes >> 20
    detail = f"{available} MB available, minimum {minimum_mb} MB"
    if available < minimum_mb:
        return _result(
            "memory",
            FAIL,
            detail,
            "engine builds need memory: stop other workloads during a rollout, or enable "
            "zram/swap (Jetson shares memory between CPU and GPU)",
        )
    return _result("memory", PASS, detail)


def _load_trust(config: AgentConfig, now: datetime) -> tuple[TrustRoot | None, CheckResult]:
    """The trust root exactly as the agent loads it: the provisioned file, then the verified
    rotations kept in data_dir/trust/."""
    path = config.trust_root
    try:
        trust = TrustStore(path, config.data_dir, now).root
        trust.check_expiry(now)
    except ConfigError as e:
        why = getattr(e.__cause__, "strerror", None) or e.reason
        return None, _result(
            "trust",
            FAIL,
            f"trust root {path} (config key trust_root) cannot be read: {why}",
            "copy the DSSE trust root from `jetfleet keys init DIR` (DIR/trust.json) there",
        )
    except TrustExpiredError as e:
        return None, _result(
            "trust",
            FAIL,
            e.reason,
            "sign a new trust root (jetfleet keys rotate) and install it, or fix the clock",
        )
    except ProtocolError as e:
        return None, _result(
            "trust",
            FAIL,
            f"trust root {path} is not valid: {e.reason} [{e.code}]",
            "reinstall trust.json from the operator's key directory (jetfleet keys init)",
        )
    roles = ", ".join(f"{n} {r.threshold}/{len(r.keyids)}" for n, r in trust.roles.items())
    return trust, _result("trust", PASS, f"{path}: version {trust.version}, roles {roles}")


def _trust_expiry(config: AgentConfig) -> datetime | None:
    """The expiry of the newest trust root on disk, read without verifying (the clock check
    must work even when verification fails because of the clock)."""
    candidates = [config.trust_root, *(config.data_dir / "trust").glob("*.json")]
    newest: TrustRoot | None = None
    for path in candidates:
        try:
            root = TrustRoot.decode(Envelope.decode(path.read_bytes()).payload_bytes())
        except (OSError, ProtocolError, ValueError):
            continue
        if newest is None or root.version > newest.version:
            newest = root
    return newest.expires if newest is not None else None


def check_clock(config: AgentConfig, now: datetime, root: Path) -> CheckResult:
    expires = _trust_expiry(config)
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    if now < EARLIEST_PLAUSIBLE:
        return _result(
            "clock",
            FAIL,
            f"the clock says {stamp}, before {EARLIEST_PLAUSIBLE:%Y-%m-%d}: it was never set",
            "enable NTP (timedatectl set-ntp true) and check the network; signatures and "
            "command expiry depend on the time",
        )
    if expires is not None and now >= expires:
        return _result(
            "clock",
            FAIL,
            f"the clock says {stamp}, after the trust root expiry {expires:%Y-%m-%d %H:%M}Z",
            "if the clock is right, rotate the trust root (jetfleet keys rotate); otherwise "
            "fix the clock (timedatectl)",
        )
    synced = _ntp_synchronized(root)
    detail = f"{stamp}" + (
        f", trust root valid until {expires:%Y-%m-%d}" if expires is not None else ""
    )
    if expires is not None and expires - now < TRUST_EXPIRY_WARNING:
        return _result(
            "clock",
            WARN,
            detail + f": expires in {(expires - now).days} day(s)",
            "rotate the trust root soon (jetfleet keys rotate), then roll it out",
        )
    if synced is False:
        return _result(
            "clock",
            WARN,
            detail + "; NTP has not synchronized yet",
            "timedatectl set-ntp true; check that UDP 123 reaches a time server",
        )
    return _result("clock", PASS, detail + ("; NTP synchronized" if synced else ""))


def _ntp_synchronized(root: Path) -> bool | None:
    """systemd-timesyncd touches this file once synchronized; None when we cannot tell."""
    if (root / "run/systemd/timesync/synchronized").exists():
        return True
    if (root / "run/systemd/timesync").is_dir():
        return False
    return None


def check_broker(config: AgentConfig, timeout: float) -> CheckResult:
    """A real MQTT CONNECT with the configured TLS files and credentials, to each node
    when the url lists a cluster's nodes."""
    try:
        nodes = parse_broker_urls(config.broker.url)
    except TransportConfigError as e:
        return _result("broker", FAIL, e.reason, "fix [broker] url in the config")
    results = [_check_node(config, node, timeout) for node in nodes]
    return results[0] if len(results) == 1 else _cluster_verdict(results)


def _cluster_verdict(results: list[CheckResult]) -> CheckResult:
    """All nodes up: pass. Some down: warn, since the agent moves to the next node in the
    list; it cannot survive losing those too. None up: fail."""
    bad = [r for r in results if r.status != PASS]
    if not bad:
        return _result(
            "broker", PASS, f"all {len(results)} nodes: " + "; ".join(r.detail for r in results)
        )
    detail = f"{len(bad)} of {len(results)} nodes failed: " + "; ".join(r.detail for r in bad)
    return _result("broker", WARN if len(bad) < len(results) else FAIL, detail, bad[0].fix)


def _check_node(config: AgentConfig, node: BrokerAddress, timeout: float) -> CheckResult:
    b = config.broker
    try:
        # Never the device id: a CONNECT with it would take over the running agent's session.
        client, addr = paho_client(
            node.url,
            client_id=f"{config.device_id}-doctor-{os.getpid()}",
            protocol=b.protocol,
            ca=b.ca,
            cert=b.cert,
            key=b.key,
            username=b.username,
            password=b.password,
        )
    except TransportConfigError as e:
        return _result("broker", FAIL, e.reason, "fix [broker] ca/cert/key in the config")
    where = f"{addr.host}:{addr.port}"
    unreachable = _tcp_unreachable(addr, where, timeout)
    if unreachable is not None:
        return unreachable
    started = time.monotonic()
    outcome, failed = _connect_once(client, addr, where, timeout)
    if failed is not None:
        return failed
    return _connack_verdict(config, addr, where, outcome, timeout, time.monotonic() - started)


def _tcp_unreachable(addr: BrokerAddress, where: str, timeout: float) -> CheckResult | None:
    """TCP first, so "nothing listens" and "it listens but the TLS/MQTT talk fails" differ."""
    try:
        socket.create_connection((addr.host, addr.port), timeout=timeout).close()
    except OSError as e:
        return _result(
            "broker",
            FAIL,
            f"cannot reach {where}: {e.strerror or e}",
            "check the URL, the network, and that the broker listens there "
            f"(nc -vz {addr.host} {addr.port})",
        )
    return None


def _connect_once(
    client: paho.Client, addr: BrokerAddress, where: str, timeout: float
) -> tuple[dict[str, Any], CheckResult | None]:
    """CONNECT and wait for the CONNACK (or the hang-up): what happened, or the failure
    of the TLS handshake / socket."""
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        outcome["reason"] = reason

    def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        outcome.setdefault("dropped", reason)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect_timeout = timeout
    started = time.monotonic()
    try:
        client.connect(addr.host, addr.port, keepalive=max(5, int(timeout) + 5))
        while "reason" not in outcome and time.monotonic() - started < timeout:
            if client.loop(timeout=0.1) != paho.MQTT_ERR_SUCCESS:
                outcome.setdefault("dropped", "connection lost")
                break
    except ssl.SSLError as e:
        return outcome, _result(
            "broker",
            FAIL,
            f"TLS handshake with {where} failed: {e.reason or e}",
            "check [broker] ca (it must sign the broker's certificate, whose name must "
            "match the URL host) and the client certificate",
        )
    except OSError as e:
        return outcome, _socket_failure(addr, where, e)
    finally:
        with contextlib.suppress(Exception):  # best effort: the check's verdict stands
            client.disconnect()
    return outcome, None


def _socket_failure(addr: BrokerAddress, where: str, e: OSError) -> CheckResult:
    if addr.tls:
        return _result(
            "broker",
            FAIL,
            f"TLS handshake with {where} failed: {e.strerror or e}",
            "is that port a TLS listener? mqtts:// is usually port 8883, mqtt:// 1883",
        )
    return _result(
        "broker",
        FAIL,
        f"{where} dropped the connection: {e.strerror or e}",
        "check the broker's log; is it an MQTT port?",
    )


def _connack_verdict(
    config: AgentConfig,
    addr: BrokerAddress,
    where: str,
    outcome: dict[str, Any],
    timeout: float,
    elapsed_s: float,
) -> CheckResult:
    """What the broker's answer (or silence) to CONNECT says."""
    reason = outcome.get("reason")
    if reason is None and "dropped" in outcome:
        if addr.tls:
            # TLS 1.3: a rejected (or missing) client certificate shows after the handshake.
            return _tls_refusal(config, addr, where)
        return _result(
            "broker",
            FAIL,
            f"{where} closed the connection before CONNACK",
            "check the broker's log (ACL, max connections, protocol version)",
        )
    if reason is None:
        return _result(
            "broker",
            FAIL,
            f"{where} accepted TCP but sent no CONNACK within {timeout:.0f}s",
            "is it an MQTT port? mqtts:// on a plain port (or the reverse) also hangs",
        )
    if getattr(reason, "is_failure", False):
        return _result(
            "broker",
            FAIL,
            f"{where} refused the connection: {reason}",
            "check [broker] username/password or the client certificate, and the broker ACL",
        )
    b = config.broker
    proto = "MQTT 5" if b.protocol == "5" else "MQTT 3.1.1"
    tls_note = (", TLS" + (" with client certificate" if b.cert else "")) if addr.tls else ""
    return _result(
        "broker",
        PASS,
        f"connected to {where} ({proto}{tls_note}) in {elapsed_s * 1000:.0f} ms",
    )


def _tls_refusal(config: AgentConfig, addr: BrokerAddress, where: str) -> CheckResult:
    """The broker hung up after the handshake: read its alert on a second connection to
    say why (revoked, expired, unknown CA...) rather than only that it refused us."""
    b = config.broker
    why = diagnose_tls(addr, b.ca, b.cert, b.key, timeout=5.0) if b.cert else None
    if why and "revoked" in why:
        return _result(
            "broker",
            FAIL,
            f"{where} closed the TLS connection before CONNACK: {why}",
            f"this certificate was revoked (jetfleet pki revoke): issue a new one with "
            f"`jetfleet pki issue {config.device_id}` and install it as [broker] cert and key",
        )
    detail = why or (
        "it rejected the "
        + ("client certificate" if b.cert else "client, which sent no certificate")
    )
    return _result(
        "broker",
        FAIL,
        f"{where} closed the TLS connection before CONNACK: {detail}",
        "the broker requires a client certificate signed by its CA: set [broker] cert "
        "and key (jetfleet pki issue DEVICE_ID), and check that the certificate is valid",
    )


def check_builder(config: AgentConfig) -> CheckResult:
    """[engine] builder = "container": the runtime runs and the consumer's image is here."""
    from agent import container

    e = config.engine
    problem = container.image_problem(config)
    if problem:
        return _result("builder", FAIL, problem,
                       f"install {e.runtime} with the NVIDIA runtime and pull {e.image} "
                       "(the agent never pulls); see docs/integration.md")  # fmt: skip
    return _result("builder", PASS, f"engines build in {e.image} ({e.runtime})")


# ---------------------------------------------------------------------------- runner


def run_checks(
    config_path: Path | None,
    *,
    root: Path = Path("/"),
    now: datetime | None = None,
    broker_timeout: float = 5.0,
    min_free_mem_mb: int = DEFAULT_MIN_FREE_MEM_MB,
    import_module: Callable[[str], Any] = importlib.import_module,
) -> list[CheckResult]:
    now = now or datetime.now(timezone.utc)
    try:
        config = load_config(config_path)
    except ConfigError as e:
        return [
            _result(
                "config",
                FAIL,
                e.reason,
                "fix the config file (keys: docs/agent.md; see docs/operations.md); the other "
                "checks need it",
            )
        ]
    results = [
        _result("config", PASS, f"{config_path or 'environment'}: device {config.device_id}")
    ]
    results.append(check_jetpack(root, config))
    results.append(check_tensorrt(config, import_module, root))
    results.append(check_pycuda(config, import_module))
    results.append(check_gpu(root, config))
    results.append(check_disk(config))
    results.append(check_state(config))
    results.append(check_memory(root, min_free_mem_mb))
    results.append(check_clock(config, now, root))
    results.append(_load_trust(config, now)[1])
    results.append(check_broker(config, broker_timeout))
    if config.engine.builder == "container":
        results.append(check_builder(config))
    return results


def exit_code(results: list[CheckResult]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0


def render_human(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status.upper():4}  {r.name:<{width}}  {r.detail}")
        if r.fix:
            lines.append(f"{'':4}  {'':<{width}}  -> {r.fix}")
    failed = sum(r.status == FAIL for r in results)
    warned = sum(r.status == WARN for r in results)
    lines.append(
        "all checks passed"
        if not failed and not warned
        else f"{failed} failed, {warned} warning(s)"
    )
    return "\n".join(lines)


def render_json(results: list[CheckResult]) -> str:
    return json.dumps(
        {"ok": exit_code(results) == 0, "checks": [asdict(r) for r in results]}, indent=2
    )


class DoctorOutput(str, Enum):
    human = "human"
    json = "json"


def doctor_command(
    config: Path = typer.Option(DEFAULT_CONFIG_PATH, "--config", "-c", help="agent.toml"),
    output: DoctorOutput = typer.Option(DoctorOutput.human, "--output", "-o", help="human or json"),
    root: Path = typer.Option(
        Path("/"), "--root", help="read /etc, /proc and /dev below this directory"
    ),
    timeout: float = typer.Option(5.0, "--timeout", help="seconds to wait for the broker"),
    min_free_mem_mb: int = typer.Option(
        DEFAULT_MIN_FREE_MEM_MB, "--min-free-mem-mb", help="memory an engine build needs"
    ),
) -> None:
    """Check this robot: JetPack, TensorRT, GPU, disk, state, memory, clock, trust, broker."""
    results = run_checks(config, root=root, broker_timeout=timeout, min_free_mem_mb=min_free_mem_mb)
    text = render_json(results) if output == DoctorOutput.json else render_human(results)
    sys.stdout.write(text + "\n")
    raise typer.Exit(exit_code(results))


def main() -> None:  # `python -m agent.doctor`, before the agent CLI registers the command
    typer.run(doctor_command)


if __name__ == "__main__":
    main()
