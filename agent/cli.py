"""`jetfleet-agent`: run the daemon, show the local state, install a bundle offline.

Exit codes as the controller's (docs/protocol.md#exit-codes): 0 ok, 1 operation failed,
2 usage or bad input (config), 3 verification failed.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import typer

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from agent.logs import configure_logging, import_structlog_without_rich

# Before anything imports structlog (agent.doctor below does): keeps rich out of the daemon.
import_structlog_without_rich()

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_VERIFY = 3

# Codes of a REJECTED install that mean "the bundle is not trusted" (exit 3).
VERIFY_CODES = {
    "unsigned", "bad_signature", "wrong_role", "threshold", "payload_type", "trust_root",
    "trust_expired", "trust_version", "bundle_invalid", "too_large", "malformed", "schema",
}  # fmt: skip

app = typer.Typer(
    name="jetfleet-agent",
    help="The jetfleet device agent: verifies, builds, gates and activates models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Output(str, Enum):
    human = "human"
    json = "json"


ConfigOption = typer.Option(
    None, "--config", "-c", help=f"agent.toml [default {DEFAULT_CONFIG_PATH}]"
)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"jetfleet-agent: {message}", err=True)
    raise typer.Exit(code)


def _config(path: Path | None) -> AgentConfig:
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    try:
        return load_config(path)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)


@app.command()
def run(
    config: Path | None = ConfigOption,
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    """Run the daemon (systemd Type=notify) until SIGTERM."""
    configure_logging(log_level)
    cfg = _config(config)
    import sqlite3

    from agent.daemon import AgentLockedError, run_agent
    from protocol.errors import ProtocolError
    from protocol.transport import TransportConfigError

    try:
        run_agent(cfg)
    except ConfigError as e:  # the trust_root key naming a file that cannot be read
        fail(e.reason, EXIT_USAGE)
    except AgentLockedError as e:
        fail(str(e), EXIT_FAILED)
    except TransportConfigError as e:
        fail(f"broker: {e.reason}", EXIT_USAGE)
    except ProtocolError as e:
        fail(f"trust root {cfg.trust_root}: {e.reason}", EXIT_VERIFY)
    except OSError as e:
        fail(f"{e}", EXIT_FAILED)
    except sqlite3.Error as e:  # cannot open it at all (a corrupt one is moved aside)
        fail(f"state database {Path(cfg.data_dir) / 'state.db'}: {e}", EXIT_FAILED)


def _trust_version(cfg: AgentConfig) -> int | None:
    """The trust root version the agent holds (provisioned file + stored rotations)."""
    from agent.truststore import TrustStore
    from protocol.errors import ProtocolError

    try:
        trust = TrustStore(cfg.trust_root, Path(cfg.data_dir), datetime.now(timezone.utc))
    except (ConfigError, ProtocolError):
        return None  # `doctor` says why
    return trust.root.version


def _local_state(cfg: AgentConfig, jobs: int) -> dict[str, Any]:
    """state.db opened read-only: this view must work when the disk is read-only or full."""
    import sqlite3

    from agent.activation import ModelStore
    from agent.status import StatusBuilder
    from agent.store import Store, StoreError

    db = Path(cfg.data_dir) / "state.db"
    if not db.is_file():
        fail(f"no agent state in {cfg.data_dir} (has the agent run yet?)", EXIT_FAILED)
    try:
        store = Store(db, readonly=True)
    except StoreError as e:
        fail(
            f"{e.reason}; the agent moves it aside and starts fresh at its next start", EXIT_FAILED
        )
    except sqlite3.Error as e:
        fail(f"cannot read the state database {db}: {e}", EXIT_FAILED)
    try:
        builder = StatusBuilder(
            cfg.device_id,
            cfg.groups,
            store,
            ModelStore(cfg.data_dir),
            trust_version=lambda: _trust_version(cfg),
        )
        data: dict[str, Any] = builder.build(online=False).to_dict()
        data.pop("online", None)
        data["pending_events"] = store.outbox_size()
        data["state_reset_at"] = store.reset_at()
        data["recent_jobs"] = [
            {
                "command_id": j.command_id,
                "kind": j.kind,
                "state": j.state.value,
                "model": j.model,
                "version": j.version,
                "code": j.code,
                "reason": j.reason,
            }
            for j in store.recent_jobs(jobs)
        ]
    finally:
        store.close()
    return data


@app.command()
def status(
    config: Path | None = ConfigOption,
    output: Output = typer.Option(Output.human, "--output", "-o", help="human or json"),
    jobs: int = typer.Option(5, help="how many recent jobs to list"),
) -> None:
    """Print the local state: active/previous version per model, jobs, pending events."""
    configure_logging("warning")  # stderr: stdout may be JSON
    cfg = _config(config)
    data = _local_state(cfg, jobs)
    if output is Output.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    typer.echo(f"device {cfg.device_id}  groups {', '.join(cfg.groups) or '-'}")
    trust = data.get("trust_version")
    typer.echo(f"trust root version {trust if trust is not None else '? (see doctor)'}")
    if data["state_reset_at"] is not None:
        when = datetime.fromtimestamp(data["state_reset_at"], timezone.utc)
        typer.echo(f"state reset at {when:%Y-%m-%d %H:%M:%S}Z (state.db was corrupt)")
    models = data.get("models") or {}
    if not models:
        typer.echo("models: none installed")
    for name, slot in sorted(models.items()):
        active, previous = slot.get("active") or "-", slot.get("previous") or "-"
        typer.echo(f"model {name}: active {active}, previous {previous}")
    job = data.get("job")
    typer.echo(
        f"job in flight: {job['kind']} {job['state']} {job['command_id']}"
        if job
        else "job in flight: none"
    )
    typer.echo(
        f"last seq {data.get('last_seq')}, events waiting to be sent {data['pending_events']}"
    )
    for j in data["recent_jobs"]:
        extra = f"  [{j['code']}] {j['reason']}" if j["code"] else ""
        what = f"{j['model'] or ''} {j['version'] or ''}".strip()
        typer.echo(f"  {j['command_id'][:8]} {j['kind']:<8} {j['state']:<11} {what}{extra}")


@app.command()
def install(
    bundle: Path = typer.Argument(..., help="the .jfb bundle file"),
    config: Path | None = ConfigOption,
    output: Output = typer.Option(Output.human, "--output", "-o", help="human or json"),
) -> None:
    """Air-gapped install: same verification, gate, activation and probation, offline.

    Events are recorded and sent to the controller when the daemon next connects."""
    configure_logging("warning")
    cfg = _config(config)
    if not bundle.is_file():
        fail(f"{bundle}: no such bundle file", EXIT_USAGE)
    from agent.daemon import AgentLockedError, lock_data_dir, report_reset
    from agent.journal import Journal
    from agent.store import JobRecord, open_store
    from agent.truststore import TrustStore
    from agent.worker import Worker
    from protocol.errors import ProtocolError
    from protocol.fsio import sha256_file
    from protocol.messages import CommandKind, JobState
    from protocol.topics import Topics

    try:
        lock = lock_data_dir(Path(cfg.data_dir))
    except AgentLockedError as e:
        fail(f"{e}: stop the agent or send a deploy command instead", EXIT_FAILED)
    try:
        try:
            trust = TrustStore(cfg.trust_root, Path(cfg.data_dir), datetime.now(timezone.utc))
        except ConfigError as e:
            fail(e.reason, EXIT_USAGE)
        except ProtocolError as e:
            fail(f"trust root {cfg.trust_root}: {e.reason}", EXIT_VERIFY)
        digest = sha256_file(bundle)
        store, reset = open_store(Path(cfg.data_dir) / "state.db")
        topics = Topics(cfg.topic_prefix)
        if reset is not None:
            report_reset(store, topics, cfg.device_id, reset)
        journal = Journal(store, topics, cfg.device_id)
        worker = Worker(cfg, store, journal, trust)
        worker.recover()
        job = JobRecord(
            command_id=str(uuid.uuid4()),
            kind=CommandKind.DEPLOY.value,
            state=JobState.QUEUED,
            rollout_id=None,
            model=None,
            version=None,
            envelope=None,
            data={
                "body": {
                    "url": bundle.resolve().as_uri(),
                    "sha256": digest,
                    "size": bundle.stat().st_size,
                },
                "offline": True,
            },
        )
        with store.tx() as db:
            store.insert_job(db, job)
        worker.run_job(job)
        final = store.job(job.command_id)
        store.close()
    finally:
        lock.close()
    assert final is not None
    result = {
        "command_id": final.command_id,
        "state": final.state.value,
        "model": final.model,
        "version": final.version,
        "code": final.code,
        "reason": final.reason,
    }
    if output is Output.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        line = f"{final.state.value}: {final.model or '?'} {final.version or '?'}"
        typer.echo(line + (f" [{final.code}] {final.reason}" if final.code else ""))
    if final.state is JobState.SUCCEEDED:
        raise typer.Exit(EXIT_OK)
    if final.state is JobState.REJECTED and final.code in VERIFY_CODES:
        raise typer.Exit(EXIT_VERIFY)
    raise typer.Exit(EXIT_FAILED)


# `jetfleet-agent doctor` (agent/doctor.py).
from agent.doctor import doctor_command  # noqa: E402

app.command("doctor")(doctor_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
