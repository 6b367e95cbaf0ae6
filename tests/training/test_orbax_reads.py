"""A restore that fails on a damaged checkpoint leaves no read behind (no unraisable exceptions
later), so the fallback to an older checkpoint ends cleanly."""

import gc
import glob
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from kinoe_jax.training import checkpoint as ckpt


def _save(directory):
    manager = ckpt.make_manager(str(directory), ckpt.CheckpointConfig(async_save=False))
    state = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (256, 1024)) for i in range(24)}
    ckpt.save(manager, 1, state, None, {"note": "test"}, force=True)
    manager.wait_until_finished()
    manager.close()
    return state


def _damage(directory):
    files = sorted(glob.glob(str(directory / "1" / "state" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    os.truncate(files[-1], os.path.getsize(files[-1]) // 2)


def test_a_failed_restore_leaves_no_reads_behind(tmp_path, monkeypatch):
    state = _save(tmp_path)
    _damage(tmp_path)
    caught = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    manager = ckpt.make_manager(str(tmp_path), ckpt.CheckpointConfig(async_save=False))
    with pytest.raises(Exception, match="reading array"):
        ckpt.restore(manager, 1, abstract)
    manager.close()
    for _ in range(3):
        gc.collect()
    assert not caught, [f"{u.exc_type.__name__}: {u.exc_value}"[:200] for u in caught[:3]]
