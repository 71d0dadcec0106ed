#!/usr/bin/env python3
"""A recorded stand-in for `docker`/`podman` (these machines have no container engine).

Every call is appended to $FAKE_RUNTIME_LOG as {"argv": [...]}. `run` accepts only the
options the agent uses (anything else fails like the real CLI), refuses an image not in
$FAKE_RUNTIME_IMAGES ({"image": "/path/to/its/python"}) and a mount whose source is
missing, then execs the command as the image would: its `python3` is the image's
interpreter, the environment is only the -e variables (PYTHONPATH seeing only what is
mounted below it), the working directory is /. `ps -aq` prints the ids in $FAKE_RUNTIME_PS;
`image inspect` knows the images of $FAKE_RUNTIME_IMAGES.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

VALUED = {"--name", "--label", "--network", "--user", "--group-add", "--runtime", "--device",
          "-v", "-e"}  # fmt: skip
FLAGS = {"--rm", "-i", "--init"}


def fail(msg: str) -> None:
    sys.stderr.write(f"Error: {msg}\n")
    sys.exit(125)


def run(args: list[str]) -> None:
    opts: list[tuple[str, str]] = []
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in FLAGS:
            continue
        if flag not in VALUED or not args:
            fail(f"unknown flag: {flag}")
        opts.append((flag, args.pop(0)))
    images = json.loads(os.environ.get("FAKE_RUNTIME_IMAGES", "{}"))
    if not args or args[0] not in images:
        fail(f"unable to find image '{args[0] if args else ''}' locally")
    image, command = args[0], args[1:]
    mounts = {}
    for flag, value in opts:
        if flag == "-v":
            src, dst = value.split(":")[:2]
            if not os.path.isdir(src):
                fail(f"statfs {src}: no such file or directory")
            mounts[dst] = src
    env = {"PATH": "/usr/bin:/bin"}
    env.update(v.split("=", 1) for f, v in opts if f == "-e")  # type: ignore[arg-type]
    if "PYTHONPATH" in env:  # the image's view of it: the mounts below that path
        inside, root = env["PYTHONPATH"].rstrip("/") + "/", tempfile.mkdtemp(prefix="fake-ctr-")
        for dst, src in mounts.items():
            if dst.startswith(inside):
                os.symlink(src, os.path.join(root, dst[len(inside) :]))
        env["PYTHONPATH"] = root
    if command and command[0] == "python3":
        command[0] = images[image]
    os.chdir("/")
    os.execve(command[0], command, env)


def main() -> None:
    with open(os.environ["FAKE_RUNTIME_LOG"], "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "run":
        run(args)
    elif cmd == "ps":
        path = os.environ.get("FAKE_RUNTIME_PS", "")
        if path and os.path.exists(path):
            with open(path) as f:
                sys.stdout.write(f.read())
    elif cmd == "image" and args[:1] == ["inspect"]:
        if args[1] not in json.loads(os.environ.get("FAKE_RUNTIME_IMAGES", "{}")):
            fail(f"{args[1]}: image not known")
    elif cmd != "rm":
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
