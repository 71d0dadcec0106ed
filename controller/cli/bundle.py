"""`jetfleet bundle build|verify|inspect`: signed deployment bundles (docs/protocol.md)."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controller.bundles import accuracy_checks, bundler
from controller.cli.common import (
    EXIT_FAILED,
    EXIT_VERIFY,
    Output,
    OutputOption,
    fail,
    print_json,
    settings,
)
from controller.security import keystore
from protocol.bundle import extract_bundle, read_envelope, verify_bundle, write_bundle
from protocol.errors import ProtocolError, VerificationError
from protocol.manifest import GateSpec, Manifest, OutputCheck, Precision, Targets
from protocol.trust import TrustRoot, load_trust_root

app = typer.Typer(
    help="Build, verify and inspect signed model bundles (.jfb).", no_args_is_help=True
)

_GATE_DEFAULTS = GateSpec()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} B"


@app.command("build")
def build(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="the ONNX model (fp32)"),
    name: str = typer.Option(..., "--name", help="model name, e.g. detector"),
    version: str = typer.Option(..., "--version", help="semantic version, e.g. 1.4.0"),
    out: Path | None = typer.Option(None, "--out", help="output file (default: NAME-VERSION.jfb)"),
    golden: Path | None = typer.Option(
        None,
        "--golden",
        help="npz with inputs (input.<name> or <name>) and optionally reference outputs "
        "(output.<name>), or the .json of `polygraphy run --onnxrt --save-outputs`; without "
        "it, seeded random inputs",
    ),
    golden_inputs: Path | None = typer.Option(
        None,
        "--golden-inputs",
        help="with a Polygraphy --golden: the .json of `polygraphy run --save-inputs`",
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8"),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="npz of sample inputs for int8 calibration"
    ),
    atol: float = typer.Option(_GATE_DEFAULTS.atol, "--atol", min=0, help="gate: absolute tol."),
    rtol: float = typer.Option(_GATE_DEFAULTS.rtol, "--rtol", min=0, help="gate: relative tol."),
    accuracy: list[str] = typer.Option(
        [],
        "--accuracy",
        help="gate: an output's check OUTPUT=METRIC[:KEY=VALUE,...] (repeat), METRIC one of "
        "elementwise, max, mean, median, quantile, cosine, topk, boxes, e.g. "
        "logits=topk:k=5,min_agreement=0.98; default by precision (fp32 elementwise, fp16 "
        "quantile, int8 cosine)",
    ),
    latency_p99_ms: float | None = typer.Option(
        None, "--latency-p99-ms", help="gate: p99 latency budget in ms"
    ),
    min_throughput: float | None = typer.Option(
        None, "--min-throughput", help="gate: minimum inferences per second"
    ),
    max_regression_pct: float = typer.Option(
        _GATE_DEFAULTS.max_regression_pct,
        "--max-regression-pct",
        min=0,
        help="gate: allowed latency regression against the active engine, percent",
    ),
    probation_s: float = typer.Option(
        _GATE_DEFAULTS.probation_s, "--probation-s", min=0, help="seconds of live probation"
    ),
    profile: list[str] = typer.Option(
        [],
        "--profile",
        help="TensorRT profile INPUT:MIN/OPT/MAX, e.g. images:1x3x224x224/4x3x224x224/8x3x224x224",
    ),
    workspace_mb: int | None = typer.Option(
        None, "--workspace-mb", min=1, help="TensorRT builder workspace limit"
    ),
    dla_core: int | None = typer.Option(
        None, "--dla-core", min=0, help="build for this DLA core (Orin, Xavier)"
    ),
    device_model: list[str] = typer.Option(
        [], "--device-model", help="allowed device model (repeat); none: any"
    ),
    min_tensorrt: str | None = typer.Option(
        None, "--min-tensorrt", help="minimum TensorRT version, e.g. 8.6"
    ),
    min_jetpack: str | None = typer.Option(
        None, "--min-jetpack", help="minimum JetPack version, e.g. 6.0"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of generated golden inputs"),
    output: Output = OutputOption,
) -> None:
    """Build a bundle from an ONNX model and sign it with the release key (--keys DIR)."""
    if precision not in ("fp32", "fp16", "int8"):
        fail(f"--precision must be fp32, fp16 or int8, not {precision!r}")
    keys_dir = settings(ctx).keys
    if keys_dir is None:
        fail("no key directory to sign with: pass --keys DIR or set JETFLEET_KEYS")
    try:
        keys = keystore.load_keys(keys_dir)
        io = bundler.describe_model(model)
        profiles = dict(bundler.parse_profile(p, io) for p in profile)
        checks = dict(accuracy_checks.parse_accuracy(a, io.outputs) for a in accuracy)
        spec = bundler.BundleSpec(
            model=model,
            name=name,
            version=version,
            golden=golden,
            golden_inputs=golden_inputs,
            precision=_precision(precision),
            calibration=calibration,
            gate=GateSpec(
                atol=atol,
                rtol=rtol,
                outputs=checks,
                latency_p99_ms=latency_p99_ms,
                min_throughput=min_throughput,
                max_regression_pct=max_regression_pct,
                probation_s=probation_s,
            ),
            profiles=profiles,
            workspace_mb=workspace_mb,
            dla_core=dla_core,
            targets=Targets(
                device_models=device_model, min_tensorrt=min_tensorrt, min_jetpack=min_jetpack
            ),
            seed=seed,
        )
        result = bundler.build_bundle(spec, [keys.release], out)
    except (
        keystore.KeystoreError,
        bundler.BuildInputError,
        accuracy_checks.AccuracySpecError,
    ) as e:
        fail(str(e))
    except ProtocolError as e:
        fail(e.reason)
    except ValidationError as e:  # gate / targets values out of range
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"{e.title} {where}: {first['msg']}")
    except bundler.GoldenMismatchError as e:
        fail(f"refusing to build: {e}", EXIT_FAILED)
    except OSError as e:  # unwritable output, disk full
        fail(f"cannot write the bundle: {e.filename or ''}: {e.strerror}", EXIT_FAILED)
    for w in result.warnings:
        typer.echo(f"jetfleet: warning: {w}", err=True)
    m = result.manifest
    if output is Output.json:
        print_json(
            {
                "path": str(result.path),
                "sha256": result.sha256,
                "size": result.path.stat().st_size,
                "golden_outputs": result.golden_source,
                "golden_inputs": result.golden_inputs,
                "conversion_max_error": result.conversion_error,
                "warnings": result.warnings,
                "signed_by": keys.release.keyid,
                "manifest": m.to_dict(),
            }
        )
        return
    typer.echo(
        f"wrote {result.path} ({_mb(result.path.stat().st_size)}) {m.name} {m.version} "
        f"{m.build.precision}, sha256 {result.sha256}"
    )
    typer.echo(
        f"  golden: {result.golden_inputs} inputs, outputs "
        f"{'given and checked' if result.golden_source == 'given' else 'computed'} (fp32 ORT)"
    )
    typer.echo(f"  accuracy: {_accuracy_summary(m)}")
    typer.echo(f"  signed by release key {keys.release.keyid[:16]}…")


def _check_text(c: OutputCheck, g: GateSpec) -> str:
    atol, rtol = c.atol if c.atol is not None else g.atol, c.rtol if c.rtol is not None else g.rtol
    if c.metric == "elementwise":
        return f"elementwise atol {atol:g}, rtol {rtol:g}"
    if c.metric == "quantile":
        return f"quantile {c.error_quantile:g} of error: abs <= {atol:g} or rel <= {rtol:g}"
    if c.metric in ("max", "mean", "median"):
        return f"{c.metric} error: abs <= {atol:g} or rel <= {rtol:g}"
    if c.metric == "cosine":
        return f"cosine similarity >= {c.min_cosine:g}"
    if c.metric == "topk":
        return f"top-{c.k} agreement >= {c.min_agreement:g}"
    return (
        f"boxes (scores {c.scores}) >= {c.score_threshold:g}: IoU {c.iou:g} agreement >= "
        f"{c.min_agreement:g}"
    )


def _accuracy_summary(m: Manifest) -> str:
    g = m.gate
    parts = [f"{t.name}: {_check_text(g.outputs.get(t.name, OutputCheck()), g)}" for t in m.outputs]
    return "; ".join(parts)


def _precision(text: str) -> Precision:
    return "fp16" if text == "fp16" else "int8" if text == "int8" else "fp32"


def _load_trust(ctx: typer.Context, trust: Path | None, now: datetime) -> TrustRoot:
    if trust is None:
        keys = settings(ctx).keys
        if keys is None:
            fail("no trust root: pass --trust trust.json (or --keys DIR holding trust.json)")
        trust = keys / keystore.TRUST_FILE
    try:
        data = trust.read_bytes()
    except OSError as e:
        fail(f"cannot read trust root {trust}: {e.strerror}")
    try:
        return load_trust_root(data, now)
    except VerificationError as e:
        fail(f"verification failed: trust root {trust}: {e.reason} [{e.code}]", EXIT_VERIFY)


@app.command("sign")
def sign(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="the .jfb file"),
    out: Path | None = typer.Option(None, "--out", help="where to write it [default: in place]"),
    output: Output = OutputOption,
) -> None:
    """Re-sign a bundle with the current release key (after `keys rotate`), without
    rebuilding: its files and manifest stay as they are, checked against the retired
    release key that signed them first."""
    s = settings(ctx)
    if s.keys is None:
        fail("no key directory: pass --keys DIR or set JETFLEET_KEYS (see `jetfleet keys init`)")
    if not bundle.is_file():
        fail(f"bundle {bundle} does not exist or is not a file")
    try:
        keys = keystore.load_keys(s.keys)
        keyids = [sig.keyid for sig in read_envelope(bundle).signatures]
    except keystore.KeystoreError as e:
        fail(str(e), EXIT_VERIFY)
    except ProtocolError as e:
        fail(f"cannot read {bundle}: {e.reason} [{e.code}]", EXIT_VERIFY)
    dest = out or bundle
    if keys.release.keyid in keyids:
        if dest != bundle:
            shutil.copyfile(bundle, dest)
        _signed(dest, keys, None, output, "already signed by the current release key")
        return
    version = keystore.retired_release_version(s.keys, keyids)
    if version is None:
        fail(
            f"{bundle} is signed by no release key of {s.keys}, current or retired: "
            "it cannot be re-signed here (rebuild it)",
            EXIT_VERIFY,
        )
    try:
        _resign(bundle, dest, keystore.retired_trust(s.keys, version), keys)
    except keystore.KeystoreError as e:
        fail(str(e), EXIT_VERIFY)
    except VerificationError as e:
        fail(f"{bundle} does not verify against trust root v{version}: {e.reason}", EXIT_VERIFY)
    _signed(dest, keys, version, output, f"re-signed (was release key v{version})")


def _resign(bundle: Path, dest: Path, old: TrustRoot, keys: keystore.KeySet) -> None:
    """Extract and check every file against the old signature, then write the same
    manifest and files signed by the current release key."""
    # An expired old trust root still tells whether the files are the ones it signed.
    at = min(datetime.now(timezone.utc), old.expires - timedelta(seconds=1))
    with tempfile.TemporaryDirectory(prefix="jetfleet-sign-") as tmp:
        verified = extract_bundle(bundle, old, Path(tmp) / "x", at)
        files = {f.path: verified.root / f.path for f in verified.manifest.files}
        write_bundle(dest, verified.manifest, files, [keys.release])
    verify_bundle(dest, keys.trust, datetime.now(timezone.utc))


def _signed(dest: Path, keys: keystore.KeySet, was: int | None, output: Output, what: str) -> None:
    if output is Output.json:
        print_json(
            {
                "bundle": str(dest),
                "release_keyid": keys.release.keyid,
                "trust_version": keys.trust.version,
                "retired_release_version": was,
            }
        )
        return
    typer.echo(
        f"{dest}: {what}; signed by release key {keys.release.keyid[:16]}… "
        f"(trust root v{keys.trust.version})"
    )


@app.command("verify")
def verify(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="the .jfb file"),
    trust: Path | None = typer.Option(
        None, "--trust", help="trust.json (default: trust.json in the --keys DIR)"
    ),
    max_size_mb: float | None = typer.Option(None, "--max-size-mb", help="refuse larger bundles"),
    output: Output = OutputOption,
) -> None:
    """Verify signature, manifest and every file exactly as a device does (exit 3 if not)."""
    now = datetime.now(timezone.utc)
    root = _load_trust(ctx, trust, now)
    if not bundle.is_file():
        fail(f"bundle {bundle} does not exist or is not a file")
    cap = int(max_size_mb * 1e6) if max_size_mb is not None else None
    try:
        m = verify_bundle(bundle, root, now, max_size=cap)
    except VerificationError as e:
        reason = keystore.retired_signer_reason(settings(ctx).keys, bundle, root) or e.reason
        if output is Output.json:
            print_json({"ok": False, "code": e.code, "reason": reason, "bundle": str(bundle)})
        fail(f"verification failed: {bundle}: {reason} [{e.code}]", EXIT_VERIFY)
    signers = sorted(
        s.keyid for s in read_envelope(bundle).signatures if s.keyid in root.roles["release"].keyids
    )
    if output is Output.json:
        print_json(
            {
                "ok": True,
                "bundle": str(bundle),
                "name": m.name,
                "version": m.version,
                "files": len(m.files),
                "size": bundle.stat().st_size,
                "release_keyids": signers,
                "trust_version": root.version,
            }
        )
        return
    typer.echo(
        f"OK {bundle.name}: {m.name} {m.version} ({m.build.precision}), {len(m.files)} files, "
        f"{_mb(bundle.stat().st_size)}, signed by release key "
        f"{', '.join(k[:16] + '…' for k in signers)} (trust root v{root.version})"
    )


def _manifest_rows(m: Manifest) -> list[tuple[str, str]]:
    def shape(t: Any) -> str:
        return ", ".join(str(d) for d in t.shape)

    rows = [
        ("name", m.name),
        ("version", m.version),
        ("created", m.created_at.isoformat()),
        ("model / golden", f"{m.model} / {m.golden}"),
        ("inputs", ", ".join(f"{t.name} {t.dtype}[{shape(t)}]" for t in m.inputs)),
        ("outputs", ", ".join(f"{t.name} {t.dtype}[{shape(t)}]" for t in m.outputs)),
        ("precision", m.build.precision),
    ]
    for inp, p in m.build.profiles.items():
        rows.append(
            (f"profile {inp}", " / ".join("x".join(map(str, s)) for s in (p.min, p.opt, p.max)))
        )
    if m.build.workspace_mb is not None:
        rows.append(("workspace", f"{m.build.workspace_mb} MB"))
    if m.build.dla_core is not None:
        rows.append(("DLA core", str(m.build.dla_core)))
    t = m.targets
    rows.append(("device models", ", ".join(t.device_models) or "any"))
    rows.append(("min TensorRT / JetPack", f"{t.min_tensorrt or '-'} / {t.min_jetpack or '-'}"))
    g = m.gate
    rows.append(("gate accuracy", _accuracy_summary(m)))
    rows.append(
        (
            "gate speed",
            f"p99 budget {g.latency_p99_ms or '-'} ms, min throughput {g.min_throughput or '-'}/s, "
            f"max regression {g.max_regression_pct:g}%",
        )
    )
    rows.append(("probation", f"{g.probation_s:g} s"))
    return rows


@app.command("inspect")
def inspect(
    bundle: Path = typer.Argument(..., help="the .jfb file"),
    output: Output = OutputOption,
) -> None:
    """Show what a bundle claims: manifest, files, signing key ids (NOT verified)."""
    if not bundle.is_file():
        fail(f"bundle {bundle} does not exist or is not a file")
    try:
        env = read_envelope(bundle)
        m = Manifest.decode(env.payload_bytes())
    except ProtocolError as e:
        fail(f"cannot read {bundle}: {e.reason} [{e.code}]", EXIT_VERIFY)
    keyids = [s.keyid for s in env.signatures]
    if output is Output.json:
        print_json(
            {
                "bundle": str(bundle),
                "size": bundle.stat().st_size,
                "verified": False,
                "payload_type": env.payload_type,
                "signatures": [{"keyid": k} for k in keyids],
                "manifest": m.to_dict(),
            }
        )
        return
    console = Console(soft_wrap=True)
    table = Table(
        title=f"{bundle.name} (not verified: use `jetfleet bundle verify`)",
        title_justify="left",
        show_header=False,
    )
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in _manifest_rows(m):
        table.add_row(k, escape(v))
    console.print(table)
    # Plain lines: digests are compared whole, a table would crop them.
    console.print("files:")
    for f in m.files:
        console.print(f"  {escape(f.path)}  {f.size} bytes  sha256 {f.sha256}", highlight=False)
    console.print(f"signatures: {', '.join(keyids) or 'none'}")
