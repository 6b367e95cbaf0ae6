"""The launchers beyond one slice or node: what --dry_run prints for 2 TPU slices and 2 GPU nodes."""

import os
import shlex
import subprocess

from paths import REPO
from tools.launch import tpu_pod

TRAIN = ["--gin_file=gin_configs/runs/tiny_ja.gin", "--workdir=/mnt/runs/ja"]


def _remote(cmd: list) -> list:
    return shlex.split(next(a for a in cmd if a.startswith("--command=")).split("=", 1)[1])


def test_two_tpu_slices_start_together_with_the_multi_slice_environment(capsys):
    assert tpu_pod.main(["--dry_run", "--tpu=kinoe-a,kinoe-b", "--zone=z", "--code=skip", "--setup=skip", "--",
                         *TRAIN]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [shlex.split(ln) for ln in lines if not ln.startswith("#")]
    lookup, starts = cmds[0], cmds[1:]
    assert lookup[4:6] == ["describe", "kinoe-a"] and "--worker=all" not in lookup
    assert [c[5] for c in starts] == ["kinoe-a", "kinoe-b"] and all("--worker=all" in c for c in starts)
    for slice_id, cmd in enumerate(starts):
        words = _remote(cmd)
        env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())
        assert env["MEGASCALE_NUM_SLICES"] == "2" and env["MEGASCALE_SLICE_ID"] == str(slice_id)
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"{tpu_pod.COORDINATOR}:{tpu_pod.MEGASCALE_PORT}"
        train = words[words.index("-m") + 2:]
        assert train == [*TRAIN, "--gin_file=gin_configs/mesh/hsdp.gin"]  # HSDP unless told otherwise

    assert tpu_pod.main(["--dry_run", "--tpu=kinoe-a,kinoe-b", "--zone=z", "--code=skip", "--setup=skip", "--",
                         *TRAIN, "--gin_file=gin_configs/mesh/fsdp.gin"]) == 0
    last = [shlex.split(ln) for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")][-1]
    assert "gin_configs/mesh/hsdp.gin" not in " ".join(_remote(last))


def test_two_gpu_nodes_pick_hsdp_with_hosts_of_eight():
    script = os.path.join(REPO, "tools", "launch", "slurm_gpu.sbatch")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "SLURM_JOB_NUM_NODES": "2"}
    out = subprocess.run(["bash", script, "--dry_run", *TRAIN], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# 2 nodes x 8 GPUs")
    srun = shlex.split(out.stdout.strip().splitlines()[-1])
    train = srun[srun.index("-m") + 2:]
    assert train == [*TRAIN, "--gin_file=gin_configs/mesh/hsdp.gin", "--gin_bindings=make_mesh.devices_per_granule=8"]
    told = subprocess.run(["bash", script, "--dry_run", *TRAIN, "--gin_file=gin_configs/mesh/fsdp.gin"],
                          capture_output=True, text=True, env=env, check=False)
    assert "mesh/hsdp.gin" not in told.stdout and "mesh/fsdp.gin" in told.stdout
