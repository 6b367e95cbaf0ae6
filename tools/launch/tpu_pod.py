#!/usr/bin/env python3
"""Start the same kinoe_jax.train command on every worker of a Cloud TPU pod slice.

    python tools/launch/tpu_pod.py --tpu=kinoe-v5p-64 --zone=us-east5-a [--project=P] \\
        -- --gin_file=gin_configs/runs/tiny_ja.gin --workdir=/mnt/runs/x
    python tools/launch/tpu_pod.py --dry_run ...     # print the gcloud commands, run nothing

Steps (each one `gcloud compute tpus tpu-vm ... --worker=all`, so every host gets the same thing):
  1. copy   pack this checkout's code (kinoe_jax/, gin_configs/, tools/, pyproject.toml) into a
            tarball, scp it to every worker and unpack it in ~/kinoe_jax (--code=skip to keep
            what is there)
  2. setup  create ~/kinoe_venv and `pip install -e . jax[tpu]` in it (--setup=skip once done)
  3. train  run `python -m kinoe_jax.train ARGS` on all workers at once. JAX finds the other
            hosts from the TPU metadata, so no coordinator address or process id is needed.
            --detach runs it under nohup (the run survives a dropped ssh session; follow it
            with `tail -f WORKDIR/logs/process_0.log`).

The workdir must be a path every worker sees (a Filestore/NFS mount or a gcsfuse-mounted
bucket at the same mount point): all hosts write checkpoint shards there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = ("kinoe_jax", "gin_configs", "tools", "pyproject.toml", "README.md")
REMOTE_DIR = "~/kinoe_jax"
REMOTE_VENV = "~/kinoe_venv"
TARBALL = "kinoe_jax_code.tar.gz"
ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def pack(dest: str) -> str:
    """The code, without caches or virtual environments, as a tarball."""
    def keep(info: tarfile.TarInfo):
        parts = info.name.split("/")
        if any(p in ("__pycache__", ".venv", ".git") or p.endswith(".pyc") for p in parts):
            return None
        return info

    path = os.path.join(dest, TARBALL)
    with tarfile.open(path, "w:gz") as tar:
        for name in CODE:
            if os.path.exists(os.path.join(REPO, name)):
                tar.add(os.path.join(REPO, name), arcname=name, filter=keep)
    return path


def gcloud(args, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *rest, f"--zone={args.zone}", "--worker=all"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def ssh(args, command: str) -> list[str]:
    return gcloud(args, "ssh", args.tpu, f"--command={command}")


def train_command(args, train_args: list[str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**ENV, **dict(e.split("=", 1) for e in args.env)}.items())
    run = f"cd {REMOTE_DIR} && {env} {REMOTE_VENV}/bin/python -m kinoe_jax.train {shlex.join(train_args)}"
    if args.detach:
        # One nohup'd process per worker; its raw console goes next to the per-process logs.
        return f"nohup bash -c {shlex.quote(run)} > ~/kinoe_train.out 2>&1 < /dev/null &"
    return run


def plan(args, train_args: list[str], tarball: str) -> list[tuple[str, list[str]]]:
    steps = []
    if args.code == "copy":
        steps.append(("copy the code to every worker", gcloud(args, "scp", tarball, f"{args.tpu}:~/")))
        steps.append(("unpack it", ssh(args, f"mkdir -p {REMOTE_DIR} && tar xzf ~/{TARBALL} -C {REMOTE_DIR}")))
    if args.setup == "install":
        steps.append(("install kinoe_jax and jax[tpu] into a virtual environment", ssh(
            args, f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -U pip && "
                  f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e . 'jax[tpu]'")))
    steps.append(("start training on all workers at once", ssh(args, train_command(args, train_args))))
    return steps


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--code", choices=("copy", "skip"), default="copy", help="copy this checkout to the workers")
    parser.add_argument("--setup", choices=("install", "skip"), default="install", help="pip install on the workers")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the trainer (repeatable)")
    parser.add_argument("--detach", action="store_true", help="run under nohup instead of holding the ssh session")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(own)
    if not any(a.startswith("--gin_file") for a in train_args):
        parser.error("give the training arguments after `--`, e.g. -- --gin_file=gin_configs/runs/tiny_ja.gin "
                     "--workdir=/mnt/runs/x")
    if not any(a.startswith("--workdir") for a in train_args):
        parser.error("pass --workdir= (after `--`) on a filesystem every worker mounts at the same path")
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env takes KEY=VALUE, got {bad}")

    with tempfile.TemporaryDirectory() as tmp:
        tarball = pack(tmp) if args.code == "copy" and not args.dry_run else TARBALL
        for i, (what, cmd) in enumerate(plan(args, train_args, tarball), 1):
            print(f"# {i}. {what}", flush=True)
            print(shlex.join(cmd), flush=True)
            if not args.dry_run:
                rc = subprocess.call(cmd)
                if rc:
                    print(f"tpu_pod: step {i} ({what}) failed with status {rc}", file=sys.stderr)
                    return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
