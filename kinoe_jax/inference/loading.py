"""A trained model for inference: (ModelConfig, params) from a workdir or a checkpoint, and the
tokenizer the run trained with."""

from __future__ import annotations

import os

import jax
import numpy as np


def checkpoint_location(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(checkpoints/ directory, step) from a workdir, its checkpoints/ dir, or one step's directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        step, path = int(os.path.basename(path)), os.path.dirname(path)
    return path, step


def load_for_inference(path: str, step: int | None = None, mesh=None):
    """(ModelConfig, params). Without a mesh the params land on one device; with one, each is
    restored straight into the layout the rules table gives it there (a model too big for one
    device never has to fit on one)."""
    import orbax.checkpoint as ocp
    from etils import epath

    from kinoe_jax.models.stored import read_model_config
    from kinoe_jax.models import ModelConfig

    path, step = checkpoint_location(path, step)
    step, cfg_dict = read_model_config(path, step)
    cfg = ModelConfig(**cfg_dict)
    state_dir = epath.Path(path) / str(step) / "state"
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)  # newer Orbax wraps the tree in StepMetadata
    tree = getattr(tree, "tree", tree)
    params_meta = dict(tree)["params"]
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, params_meta)
    else:
        shardings = param_shardings(cfg, mesh)
    restore_args = jax.tree.map(lambda m, s: ocp.ArrayRestoreArgs(sharding=s, dtype=np.float32), params_meta,
                                shardings)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item={"params": params_meta},
                                               restore_args={"params": restore_args}, partial_restore=True))
    return cfg, restored["params"]


def param_shardings(cfg, mesh):
    """NamedShardings of the model's parameters on `mesh`, from the rules table."""
    import jax.numpy as jnp

    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel import sharding as shd

    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return shd.to_named(mesh, shd.param_specs(boxed, mesh))


def use_workdir_tokenizer(path: str) -> str | None:
    """A run copies its tokenizer into the workdir; prefer it to the built-in one. Returns it."""
    import gin

    from kinoe_jax.data import vocab as vocab_lib

    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        tok = os.path.join(candidate, "tokenizer.model")
        if os.path.exists(tok):
            gin.bind_parameter("tokenizer_path.path", tok)
            vocab_lib._vocab.cache_clear()
            return tok
    return None
