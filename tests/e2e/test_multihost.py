"""Several processes on localhost (gloo collectives) behave like one process with all the devices.

Every run here is a real `python -m kinoe_jax.train` subprocess joined through
jax.distributed on a free localhost port. The workers import this module through a gin
`import` binding to register `kinoe_fixed_len`, a seqio task of ready-made 64-token rows cut from
the built-in corpus: with one row per example, the packed global batch of step s is the same set
of rows however many processes read it, so losses can be compared exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from paths import REPO, TESTS
from ports import free_port
from process_runs import _compilation_cache  # one XLA cache shared by every multi-process test

HERE = os.path.dirname(os.path.abspath(__file__))
FIXED_TASK = "kinoe_fixed_len"
SEQ_LEN = 64


# ----------------------------------------------------------------------------- the workers' task
def fixed_length_rows(seq_len: int = SEQ_LEN) -> np.ndarray:
    """The built-in training text, tokenized, joined with EOS and cut into full rows."""
    import glob

    from kinoe_jax.data.vocab import BUILTIN_DIR, EOS_ID, get_vocabulary

    vocab = get_vocabulary()
    ids: list[int] = []
    for path in sorted(glob.glob(os.path.join(BUILTIN_DIR, "corpus", "train", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    ids += list(vocab.encode(json.loads(line)["text"])) + [EOS_ID]
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


@gin.configurable
def register_fixed_length_task(seq_len: int = SEQ_LEN) -> None:
    import seqio
    import tensorflow as tf

    from kinoe_jax.data import pretraining as tasks

    rows = fixed_length_rows(seq_len)

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed  # one fixed order: shuffling is off in these runs
        return tf.data.Dataset.from_tensor_slices({"targets": rows})

    if FIXED_TASK in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(FIXED_TASK)
    seqio.TaskRegistry.add(FIXED_TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
                           preprocessors=[], output_features=tasks.output_features())


@gin.configurable
def warmup_then_flat(total_steps: int, peak_lr: float = 1e-3, warmup_steps: int = 2):
    """A schedule that ignores total_steps, so runs of different lengths compile the same step
    and later runs load it from the shared compilation cache instead of compiling again."""
    import jax.numpy as jnp

    del total_steps
    return lambda step: peak_lr * jnp.minimum((step + 1.0) / warmup_steps, 1.0)


# ----------------------------------------------------------------------------- launching
def _bindings(total_steps: int, extra=()) -> list[str]:
    from conftest import TEST_MODEL  # lazily: conftest would give a worker 8 devices

    return ["import test_multihost", *TEST_MODEL,
            "make_mesh.data = 1", "make_mesh.fsdp = 8",
            "train.register_tasks = @register_fixed_length_task", "make_optimizer.schedule = @warmup_then_flat",
            f"DataConfig.mixture = '{FIXED_TASK}'", "DataConfig.shuffle_buffer = 1",
            f"train.total_steps = {total_steps}", "CheckpointConfig.save_every = 4",
            "peak_flops_per_device.override = 1e12",
            "DistributedConfig.heartbeat_timeout_s = 10", *extra]


def start(workdir, num_processes: int, total_steps: int, extra=()) -> list[subprocess.Popen]:
    """Start kinoe_jax.train as `num_processes` processes sharing 8 simulated CPU devices."""
    path = os.pathsep.join([HERE, TESTS, os.environ.get("PYTHONPATH", "")])  # the workers import this module
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}",
               WANDB_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=_compilation_cache(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "kinoe_jax.train", f"--workdir={workdir}", "--gin_file=gin_configs/mesh/fsdp.gin"]
    cmd += [f"--gin_bindings={b}" for b in _bindings(total_steps, extra)]
    if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={num_processes}"]
    return [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


def wait_all(groups: list[list[subprocess.Popen]], timeout: float = 400) -> list[list[dict]]:
    """Wait for every process; record its status, output and wall-clock end time."""
    import threading

    results = [[{} for _ in g] for g in groups]

    def reap(p, slot):
        out, _ = p.communicate()
        slot.update(rc=p.returncode, out=out, end=time.time())

    threads = [threading.Thread(target=reap, args=(p, results[i][j]), daemon=True)
               for i, g in enumerate(groups) for j, p in enumerate(g)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.1))
    if any(t.is_alive() for t in threads):
        for g in groups:
            for p in g:
                p.kill()
        pytest.fail(f"processes still running after {timeout} s")
    return results


def losses(workdir) -> dict[int, float]:
    from kinoe_jax.training.metrics_writer import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def _check_ok(results, what):
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"{what}: process {i} exited {r['rc']}:\n{r['out'][-4000:]}"


# ----------------------------------------------------------------------------- tests
def test_data_shards_are_disjoint_and_cover_one_process():
    """seqio ShardInfo(process_index, process_count): by file when there are enough files (the
    built-in corpus has 2), by example otherwise (3 processes; the fixed-length task)."""
    from collections import Counter

    from kinoe_jax.data import pipeline, pretraining as tasks

    tasks.register_builtin()
    register_fixed_length_task()

    def segments(name, index, count):
        ds = pipeline.packed_dataset(name, "train", SEQ_LEN, 4, shuffle=False, seed=0, num_epochs=1,
                                     shard_index=index, num_shards=count)
        out = Counter()
        for b in ds.as_numpy_iterator():
            for tokens, seg in zip(b["decoder_target_tokens"], b["decoder_segment_ids"]):
                for s in set(seg.tolist()) - {0}:
                    out[tuple(tokens[seg == s].tolist())] += 1
        return out

    for name in (tasks.BUILTIN_CORPUS, FIXED_TASK):
        whole = segments(name, 0, 1)
        assert sum(whole.values()) > 20
        for count in (2, 3):
            parts = [segments(name, i, count) for i in range(count)]
            assert all(parts), f"{name}: an empty shard among {count}"
            # As multisets (a short line may occur in both files): every example exactly once.
            assert sum(parts, Counter()) == whole, f"{name}: {count} shards do not add up to one process's data"
            assert all(sum(p.values()) < sum(whole.values()) for p in parts)


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """The same 4 steps as 1 process x 8 devices and as 2 processes x 4 devices, side by side."""
    root = tmp_path_factory.mktemp("multihost")
    one, two = root / "one", root / "two"
    # Evaluation and the closing sample are collective too: every process must take part.
    extra = ["train.eval_every = 4", "train.sample_prompt = '日本'", "train.sample_tokens = 3"]
    results = wait_all([start(one, 1, 4, extra), start(two, 2, 4, extra)])
    _check_ok(results[0], "1 process")
    _check_ok(results[1], "2 processes")
    return {"one": one, "two": two, "results": results}


@pytest.mark.slow
def test_two_processes_match_one(base_runs):
    from kinoe_jax.training.metrics_writer import read_metrics

    one, two = losses(base_runs["one"]), losses(base_runs["two"])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for v in one.values()) and one[4] < one[1]
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)
    evals = [next(r["eval_loss"] for r in read_metrics(str(base_runs[k])) if r["step"] == 4) for k in ("one", "two")]
    np.testing.assert_allclose(evals[1], evals[0], rtol=1e-5)
    p0, p1 = base_runs["results"][1]
    assert "sample (greedy)" in p0["out"] and "sample (greedy)" not in p1["out"]
    two_dir = base_runs["two"]
    # Each process keeps its own log and saves its data shard's state; only process 0 writes metrics.
    for i in range(2):
        text = (two_dir / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 2" in text and "4 local / 8 global devices" in text
        assert (two_dir / "checkpoints" / "4" / "data_iter" / f"shard_{i}-of-2").is_dir()
    saved = os.listdir(base_runs["one"] / "checkpoints" / "4" / "data_iter")
    assert [n for n in saved if n.startswith(("shard_", "process_"))] == ["shard_0-of-1"]
    out1 = base_runs["results"][1][1]["out"]
    assert "kinoe_jax.train: mesh" not in out1, "process 1's console should only carry warnings"


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(base_runs):
    """2-process checkpoint -> 1 process (on another mesh), 1-process checkpoint -> 2 processes.

    Each continues its own data stream (2 shards, or 1) from where it stopped. One row per example,
    unshuffled: both streams give step s the same set of rows, so the two continuations see the
    same batches from the same restored parameters and their losses agree.
    """
    one, two = base_runs["one"], base_runs["two"]
    results = wait_all([start(two, 1, 6, ["make_mesh.data = 2", "make_mesh.fsdp = 4"]), start(one, 2, 6)])
    _check_ok(results[0], "1 process resuming a 2-process checkpoint")
    _check_ok(results[1], "2 processes resuming a 1-process checkpoint")
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([a[5], a[6]], [b[5], b[6]], rtol=1e-5)
    # Restored, not re-initialised: a fresh model starts near ln(vocab) = 8.29.
    assert a[5] < a[1] - 1e-3
    for log_file in (two / "logs" / "process_0.log", one / "logs" / "process_1.log"):
        text = log_file.read_text()
        assert "starts from its beginning" not in text and "restarts from its beginning" not in text, log_file
    for workdir, count in ((two, 2), (one, 1)):  # the shard count of the run's start, kept
        saved = os.listdir(workdir / "checkpoints" / "6" / "data_iter")
        assert sorted(n for n in saved if n.startswith("shard_")) == [f"shard_{i}-of-{count}" for i in range(count)]


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory):
    """Process 1 raises after step 2 in one run and is killed (SIGKILL) after step 2 in another."""
    root = tmp_path_factory.mktemp("faults")
    fault = ["fault_point.at_step = 2", "fault_point.process = 1", "CheckpointConfig.save_every = 100"]
    raised, killed = root / "raised", root / "killed"
    results = wait_all([start(raised, 2, 6, fault), start(killed, 2, 6, fault + ["fault_point.kind = 'kill'"])])
    return {"raised": raised, "killed": killed, "results": results}


@pytest.mark.slow
def test_a_failing_process_stops_all_and_is_named(failed_runs):
    from kinoe_jax.parallel.multihost import read_first_error

    results = failed_runs["results"][0]
    record = read_first_error(str(failed_runs["raised"]))
    outputs = "\n".join(f"---- process {i} (exit {r['rc']}):\n{r['out'][-3000:]}" for i, r in enumerate(results))
    assert record and record["process"] == 1 and "injected fault in process 1 at step 2" in record["error"], outputs
    summary = "process 1 of 2 on"
    for i, r in enumerate(results):
        assert r["rc"] != 0, f"process {i} exited 0"
        assert r["end"] - record["time"] < 60, f"process {i} took {r['end'] - record['time']:.0f} s to stop"
        line = next((ln for ln in r["out"].splitlines() if ln.startswith("kinoe_jax:") and summary in ln), None)
        assert line and "RuntimeError: injected fault in process 1 at step 2" in line, r["out"][-3000:]
    assert "Traceback" in (failed_runs["raised"] / "logs" / "process_1.log").read_text()
    assert "failed first" in (failed_runs["raised"] / "logs" / "process_0.log").read_text()


@pytest.mark.slow
def test_a_killed_process_stops_all_and_is_named(failed_runs):
    import re

    p0, p1 = failed_runs["results"][1]
    assert p1["rc"] == -9
    assert p0["rc"] != 0, "process 0 must not exit cleanly when process 1 vanished"
    assert p0["end"] - p1["end"] < 60, f"process 0 stopped {p0['end'] - p1['end']:.0f} s after the kill"
    # JAX's heartbeat verdict names the silent process (our own line when it had time to publish).
    named = re.search(r"stopped sending heartbeats\):\s*1\b", p0["out"]) or "process 1 of 2 on" in p0["out"]
    assert named, p0["out"][-4000:]


# ----------------------------------------------------------------------------- detection and launchers
def test_multi_process_is_detected_from_flags_and_cluster_env(monkeypatch):
    from kinoe_jax.parallel.multihost import DistributedConfig, wants_distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert wants_distributed(DistributedConfig())[0] is False
    assert wants_distributed(DistributedConfig(num_processes=1))[0] is False
    assert wants_distributed(DistributedConfig(num_processes=2))[0] is True
    assert wants_distributed(DistributedConfig(coordinator_address="h:1"))[0] is True
    # Inside `srun` (JAX's SLURM detector reads these): more than one task means multi-process.
    for k, v in {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"}.items():
        monkeypatch.setenv(k, v)
    wanted, reason = wants_distributed(DistributedConfig())
    assert wanted and "16" in reason, reason
    assert wants_distributed(DistributedConfig(auto_detect=False))[0] is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert wants_distributed(DistributedConfig())[0] is False
    with pytest.raises(ValueError, match="num_processes"):
        wants_distributed(DistributedConfig(num_processes=0))


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def test_slurm_script_dry_run(tmp_path):
    import shlex

    script = os.path.join(REPO, "tools", "launch", "slurm_gpu.sbatch")
    args = ["--gin_file=gin_configs/runs/tiny_ja.gin", f"--workdir={tmp_path}/run", "--gin_bindings=train.total_steps = 10"]
    out = subprocess.run(["bash", script, "--dry_run", *args], capture_output=True, text=True, env=_clean_env())
    assert out.returncode == 0, out.stderr
    srun = shlex.split(out.stdout.strip().splitlines()[-1])
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=8" in srun
    i = srun.index("-m")
    assert srun[i + 1] == "kinoe_jax.train" and srun[i + 2:] == args  # the arguments arrive intact
    assert any(a.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=") for a in srun)
    assert not (tmp_path / "run").exists(), "a dry run must not touch the workdir"
    # Without a workdir, or outside a SLURM job without --dry_run: a clear refusal.
    missing = subprocess.run(["bash", script, "--dry_run", args[0]], capture_output=True, text=True, env=_clean_env())
    assert missing.returncode == 2 and "--workdir" in missing.stderr
    outside = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=_clean_env())
    assert outside.returncode == 2 and "sbatch" in outside.stderr


def test_tpu_pod_launcher_dry_run(tmp_path, capsys):
    import shlex
    import tarfile

    from tools.launch import tpu_pod

    train_args = ["--gin_file=gin_configs/runs/tiny_ja.gin", "--workdir=/mnt/runs/ja",
                  "--gin_bindings=train.total_steps = 10"]
    assert tpu_pod.main(["--dry_run", "--tpu=kinoe-v5p-64", "--zone=us-east5-a", "--project=p", "--", *train_args]) == 0
    cmds = [shlex.split(ln) for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert [c[4] for c in cmds] == ["scp", "ssh", "ssh", "ssh"]
    for c in cmds:
        assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert "--worker=all" in c and "--zone=us-east5-a" in c and "--project=p" in c
    remote = next(a for a in cmds[-1] if a.startswith("--command=")).split("=", 1)[1]
    words = shlex.split(remote)
    assert words[words.index("-m") + 1] == "kinoe_jax.train" and words[-3:] == train_args
    assert "pip install" in " ".join(cmds[2]) and "jax[tpu]" in " ".join(cmds[2])

    assert tpu_pod.main(["--dry_run", "--tpu=t", "--zone=z", "--code=skip", "--setup=skip", "--detach", "--",
                         *train_args]) == 0
    only = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(only) == 1 and "nohup" in only[0]
    with pytest.raises(SystemExit):
        tpu_pod.main(["--dry_run", "--tpu=t", "--zone=z", "--", "--gin_file=x.gin"])  # no workdir

    with tarfile.open(tpu_pod.pack(str(tmp_path))) as tar:
        names = tar.getnames()
    assert "kinoe_jax/training/loop.py" in names and "gin_configs/runs/tiny_ja.gin" in names
    assert not any("__pycache__" in n or n.startswith(".venv") for n in names)
