"""The training stream continues the same global sequence on any number of processes.

Processes are simulated: each is a ShardedStream holding its block of every micro-batch's rows
(as pipeline.rows_by_process gives them for a mesh), all reading the built-in corpus, shuffled
and packed. A step's global batch is the processes' blocks put side by side, micro-batch by
micro-batch; saving in one shape and restoring in another must give the uninterrupted batches.
"""

import os

import numpy as np
import pytest

from kinoe_jax.data import phases, pipeline
from kinoe_jax.data import pretraining as tasks
from kinoe_jax.data.sharded_stream import ShardedStream, check_layout, saved_shards
from kinoe_jax.utils.errors import ConfigError

CFG = pipeline.DataConfig(mixture=tasks.BUILTIN_CORPUS, seq_len=64, global_batch=8, grad_accum=2, shuffle_buffer=50)


@pytest.fixture(scope="module", autouse=True)
def builtin():
    tasks.register_builtin()


def streams(num_processes: int, num_shards: int, cfg=CFG) -> list[ShardedStream]:
    block = cfg.global_batch // cfg.grad_accum // num_processes
    layout = {p: (p * block, (p + 1) * block) for p in range(num_processes)}

    def make_shard(shard, count):
        return iter(pipeline.train_dataset(cfg, shard, count))

    return [ShardedStream(make_shard, cfg.global_batch, cfg.grad_accum, layout, p, default_shards=num_shards)
            for p in range(num_processes)]


def global_batch(group: list[ShardedStream], step: int) -> np.ndarray:
    """[grad_accum, rows, seq_len] target tokens of `step` as the mesh holds them."""
    parts = [s.next_for_step(step)["decoder_target_tokens"].reshape(CFG.grad_accum, -1, CFG.seq_len) for s in group]
    return np.concatenate(parts, axis=1)


def run(group, steps) -> list[np.ndarray]:
    return [global_batch(group, s) for s in steps]


def save(group, directory):
    os.makedirs(directory, exist_ok=True)
    for s in group:
        s.save(str(directory))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_a_changed_process_count_continues_the_same_batches(tmp_path, before, after):
    shards = before  # a run's shard count is its process count at the start
    reference = run(streams(before, shards), range(6))
    first = streams(before, shards)
    for got, want in zip(run(first, range(3)), reference[:3]):
        np.testing.assert_array_equal(got, want)
    save(first, tmp_path)
    count, names = saved_shards(str(tmp_path))
    assert count == shards and sorted(names) == list(range(shards))  # each shard saved once
    resumed = streams(after, 99)  # the checkpoint's shard count wins over the configured one
    for s in resumed:
        s.restore(str(tmp_path))
        assert s.num_shards == shards
    for got, want in zip(run(resumed, range(3, 6)), reference[3:]):
        np.testing.assert_array_equal(got, want)


def test_no_example_is_seen_twice_or_skipped_across_the_change(tmp_path):
    """The rows of steps 0-5 from 2 processes then 1 are those of 2 processes throughout, and
    steps differ from each other (the stream moved on rather than restarting)."""
    first = streams(2, 2)
    rows = run(first, range(3))
    save(first, tmp_path)
    (alone,) = streams(1, 1)
    alone.restore(str(tmp_path))
    rows += run([alone], range(3, 6))
    reference = run(streams(2, 2), range(6))
    for step, (got, want) in enumerate(zip(rows, reference)):
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
    assert not np.array_equal(rows[3], rows[0]), "the resumed stream restarted from its beginning"


def test_checkpoints_written_per_process_continue_as_shards(tmp_path):
    """Before shards, each process saved `process_<i>-of-<n>`: the same state under another name."""
    first = streams(2, 2)
    run(first, range(2))
    save(first, tmp_path)
    for name in os.listdir(tmp_path):
        os.rename(tmp_path / name, tmp_path / name.replace("shard_", "process_"))
    reference = streams(2, 2)
    run(reference, range(2))
    (alone,) = streams(1, 1)
    alone.restore(str(tmp_path))
    np.testing.assert_array_equal(run([alone], [2])[0], run(reference, [2])[0])


def test_a_stream_that_cannot_be_cut_the_same_way_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="4 shard.*grad_accum = 4") as e:
        check_layout(8, 4, 4, "checkpoint step 20")
    assert "\n" not in str(e.value)
    check_layout(8, 2, 4, "ok")
    first = streams(2, 2)
    run(first, range(1))
    save(first, tmp_path)
    # The same run on a grad_accum that splits a shard's 4 rows into 8 micro-batches cannot continue.
    (other,) = streams(1, 1, cfg=pipeline.DataConfig(**{**CFG.__dict__, "grad_accum": 8}))
    with pytest.raises(ConfigError, match="2 shard"):
        other.restore(str(tmp_path))


def test_a_plain_stream_has_no_phase_starts():
    """As before shards: run_info of a one-mixture run records no phases (no schedule warning on resume)."""
    assert phases.train_iterator(CFG, total_steps=10).starts == ()
