"""Bundle verification speed and memory: `verify_bundle` against `sha256sum` on one file.

    .venv/bin/python bench/verify_bundle.py [--size-mib 1024] [--runs 3] [--dir DIR]

Builds a signed bundle with a SIZE-MiB random "model" member in a temporary directory
(deleted afterwards), then, alternating so both see the same page-cache and CPU conditions,
times `verify_bundle` (signature + every header + SHA-256 of every member) and
`sha256sum` of the same file; prints the median throughput of each and their ratio
(goal >= 0.9). Peak RSS is measured in a child process that imports the library, records
its RSS, verifies the bundle once and reports its peak (ru_maxrss) above that baseline
(goal < 64 MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.bundle import make_manifest, verify_bundle, write_bundle  # noqa: E402
from protocol.keys import SigningKey  # noqa: E402
from protocol.trust import build_trust_root  # noqa: E402

CHILD = r"""
import json, resource, sys
from datetime import datetime, timezone
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from protocol.bundle import verify_bundle
from protocol.trust import load_trust_root
import psutil
now = datetime.now(timezone.utc)
trust = load_trust_root(Path(sys.argv[2]).read_bytes(), now)
base = psutil.Process().memory_info().rss
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
verify_bundle(Path(sys.argv[1]), trust, now)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "peak_before": peak_before, "peak": peak}))
"""


def _make_bundle(directory: Path, size_mib: int) -> tuple[Path, Path]:
    root, release, operator = (SigningKey.generate() for _ in range(3))
    trust_file = directory / "trust.json"
    trust_file.write_bytes(
        build_trust_root(root=[root], release=[release], operator=[operator]).encode()
    )
    model = directory / "model.onnx"
    with open(model, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    golden = directory / "golden.npz"
    golden.write_bytes(os.urandom(4096))
    files = {"model.onnx": model, "golden.npz": golden}
    manifest = make_manifest(
        name="bench",
        version="1.0.0",
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 3, 224, 224]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 1000]}],
    )
    bundle = write_bundle(directory / "bench-1.0.0.jfb", manifest, files, [release])
    model.unlink()  # only the bundle is needed from here on
    return bundle, trust_file


def _time(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary bundle goes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="jetfleet-bench-", dir=args.dir) as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        bundle, trust_file = _make_bundle(d, args.size_mib)
        build_s = time.perf_counter() - t0
        size = bundle.stat().st_size
        from protocol.trust import load_trust_root

        now = datetime.now(timezone.utc)
        trust = load_trust_root(trust_file.read_bytes(), now)

        def ours() -> None:
            verify_bundle(bundle, trust, now)

        def plain_hashlib() -> None:
            # The ceiling for any Python verifier: hashlib over the file, nothing else.
            h, view = hashlib.sha256(), memoryview(bytearray(1 << 20))
            with open(bundle, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    h.update(view[:n])

        def coreutils() -> None:
            subprocess.run(["sha256sum", str(bundle)], check=True, stdout=subprocess.DEVNULL)

        coreutils()  # warm the page cache once, for both
        mine, theirs, ceiling = [], [], []
        for _ in range(args.runs):
            mine.append(_time(ours))
            theirs.append(_time(coreutils))
            ceiling.append(_time(plain_hashlib))
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(bundle), str(trust_file), str(REPO)],
            check=True,
            capture_output=True,
            text=True,
        )
        mem = json.loads(child.stdout)
    mb = size / 1e6
    ours_s, sha_s = statistics.median(mine), statistics.median(theirs)
    raw_s = statistics.median(ceiling)
    # An upper bound: the peak may predate verify (imports); it is not subtracted.
    above = max(0, mem["peak"] - mem["baseline_rss"])
    print(f"bundle: {size / 2**20:.0f} MiB ({size} bytes), built and signed in {build_s:.1f} s")
    print(f"verify_bundle : median {ours_s:.3f} s  {mb / ours_s:8.0f} MB/s  runs {_fmt(mine)}")
    print(f"sha256sum     : median {sha_s:.3f} s  {mb / sha_s:8.0f} MB/s  runs {_fmt(theirs)}")
    print(f"hashlib loop  : median {raw_s:.3f} s  {mb / raw_s:8.0f} MB/s  runs {_fmt(ceiling)}")
    print(f"ratio verify/sha256sum throughput: {sha_s / ours_s:.3f}  (goal >= 0.9)")
    print(f"ratio verify/plain hashlib loop  : {raw_s / ours_s:.3f}  (parsing + checks overhead)")
    print(
        f"peak RSS of verify above the interpreter baseline: {above / 2**20:.1f} MiB "
        f"(baseline {mem['baseline_rss'] / 2**20:.1f} MiB, peak {mem['peak'] / 2**20:.1f} MiB; "
        "goal < 64 MiB)"
    )


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


if __name__ == "__main__":
    main()
