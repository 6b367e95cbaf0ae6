#!/usr/bin/env python3
"""Start the same kinoe_jax.train command on every worker of one Cloud TPU pod slice, or of
several slices joined by the data-centre network (multi-slice).

    python tools/launch/tpu_pod.py --tpu=kinoe-v5p-64 --zone=us-east5-a [--project=P] \\
        -- --gin_file=gin_configs/runs/tiny_ja.gin --workdir=/mnt/runs/x
    python tools/launch/tpu_pod.py --tpu=kinoe-a,kinoe-b --zone=... -- ...   # two slices
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

Several slices (--tpu=A,B,...; same type, same zone): steps 1 and 2 run on each slice, then step
3 starts every slice at once with the environment JAX's multi-slice runtime reads on every
worker: MEGASCALE_COORDINATOR_ADDRESS (worker 0 of the first slice, looked up with
`gcloud ... describe`), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID (this slice's place in the
list) and MEGASCALE_PORT. Unless a mesh gin is given, several slices train with
gin_configs/mesh/hsdp.gin: FSDP inside each slice, data parallel across them.

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
MEGASCALE_PORT = "8080"
MULTI_SLICE_MESH = "gin_configs/mesh/hsdp.gin"
COORDINATOR = "WORKER0_ADDRESS"  # the lookup's answer replaces it (a dry run looks nothing up)


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


def gcloud(args, *rest: str, workers: bool = True) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *rest, f"--zone={args.zone}"] + (["--worker=all"] if workers else [])
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def ssh(args, command: str, tpu: str | None = None) -> list[str]:
    return gcloud(args, "ssh", tpu or args.tpus[0], f"--command={command}")


def coordinator_lookup(args) -> list[str]:
    """The internal address of worker 0 of the first slice, which every slice's runtime dials."""
    return gcloud(args, "describe", args.tpus[0], "--format=value(networkEndpoints[0].ipAddress)", workers=False)


def slice_env(args, index: int, coordinator: str) -> dict:
    if len(args.tpus) == 1:
        return {}
    return {"MEGASCALE_COORDINATOR_ADDRESS": f"{coordinator}:{MEGASCALE_PORT}",
            "MEGASCALE_NUM_SLICES": str(len(args.tpus)), "MEGASCALE_SLICE_ID": str(index),
            "MEGASCALE_PORT": MEGASCALE_PORT}


def with_mesh(args, train_args: list[str]) -> list[str]:
    """Several slices train HSDP unless the arguments name a mesh gin of their own."""
    if len(args.tpus) > 1 and not any("gin_configs/mesh/" in a for a in train_args):
        return [*train_args, f"--gin_file={MULTI_SLICE_MESH}"]  # last: it decides the mesh
    return train_args


def train_command(args, train_args: list[str], extra_env: dict | None = None) -> str:
    env = {**ENV, **(extra_env or {}), **dict(e.split("=", 1) for e in args.env)}
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    run = f"cd {REMOTE_DIR} && {env} {REMOTE_VENV}/bin/python -m kinoe_jax.train {shlex.join(train_args)}"
    if args.detach:
        # One nohup'd process per worker; its raw console goes next to the per-process logs.
        return f"nohup bash -c {shlex.quote(run)} > ~/kinoe_train.out 2>&1 < /dev/null &"
    return run


def plan(args, train_args: list[str], tarball: str, coordinator: str = COORDINATOR) -> list[tuple[str, list]]:
    """[(what, [command, ...])]: the commands of a step run on every slice at once."""
    steps = []
    tpus = args.tpus
    if args.code == "copy":
        steps.append(("copy the code to every worker", [gcloud(args, "scp", tarball, f"{t}:~/") for t in tpus]))
        steps.append(("unpack it", [ssh(args, f"mkdir -p {REMOTE_DIR} && tar xzf ~/{TARBALL} -C {REMOTE_DIR}", t)
                                    for t in tpus]))
    if args.setup == "install":
        steps.append(("install kinoe_jax and jax[tpu] into a virtual environment", [ssh(
            args, f"python3 -m venv {REMOTE_VENV} && {REMOTE_VENV}/bin/pip install -q -U pip && "
                  f"cd {REMOTE_DIR} && {REMOTE_VENV}/bin/pip install -q -e . 'jax[tpu]'", t) for t in tpus]))
    if len(tpus) > 1:
        steps.append(("find the multi-slice coordinator (worker 0 of the first slice)", [coordinator_lookup(args)]))
    what = "start training on all workers at once" + (f" ({len(tpus)} slices)" if len(tpus) > 1 else "")
    steps.append((what, [ssh(args, train_command(args, with_mesh(args, train_args), slice_env(args, i, coordinator)), t)
                         for i, t in enumerate(tpus)]))
    return steps


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name; several slices: A,B,... (multi-slice)")
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
    args.tpus = [t.strip() for t in args.tpu.split(",")]
    if not all(args.tpus) or len(set(args.tpus)) != len(args.tpus):
        parser.error(f"--tpu takes distinct slice names separated by commas, got {args.tpu!r}")

    coordinator = COORDINATOR
    if len(args.tpus) > 1 and not args.dry_run:
        found = subprocess.run(coordinator_lookup(args), capture_output=True, text=True, check=False)
        if found.returncode or not found.stdout.strip():
            print(f"tpu_pod: cannot find worker 0 of {args.tpus[0]}: {found.stderr.strip()}", file=sys.stderr)
            return found.returncode or 1
        coordinator = found.stdout.strip().split(";")[0]
    with tempfile.TemporaryDirectory() as tmp:
        tarball = pack(tmp) if args.code == "copy" and not args.dry_run else TARBALL
        for i, (what, cmds) in enumerate(plan(args, train_args, tarball, coordinator), 1):
            print(f"# {i}. {what}", flush=True)
            for cmd in cmds:
                print(shlex.join(cmd), flush=True)
            if args.dry_run or "coordinator" in what:
                continue
            # Every slice at once: a multi-slice job starts only when all slices have joined.
            procs = [subprocess.Popen(cmd) for cmd in cmds]
            rc = next((r for r in (p.wait() for p in procs) if r), 0)
            if rc:
                print(f"tpu_pod: step {i} ({what}) failed with status {rc}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
