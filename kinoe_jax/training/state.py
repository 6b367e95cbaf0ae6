"""The train state: its shapes and shardings, a fresh one, and parameters taken from another run."""

from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models import lora as lora_lib
from kinoe_jax.models.stored import read_model_config
from kinoe_jax.parallel import sharding as shd
from kinoe_jax.training import checkpoint as ckpt
from kinoe_jax.training.objectives import trainable as trainable_lib
from kinoe_jax.utils.errors import ConfigError

log = logging.getLogger(__name__)


def abstract_state(model: Transformer, model_cfg: ModelConfig, tx, mesh, seq_len: int, zero1: bool, seed: int,
                   trainable=None):
    """Shapes and shardings of the whole train state, without allocating it. The optimizer
    state covers only the trainable parameters."""
    trainable = trainable or trainable_lib.for_model(model_cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), tokens)["params"])
    params = nn.meta.unbox(boxed)
    p_specs = shd.param_specs(boxed, mesh)
    t_params, _ = trainable_lib.split(params, trainable)
    t_specs, _ = trainable_lib.split(p_specs, trainable)
    opt_state = jax.eval_shape(tx.init, t_params)
    o_specs = shd.opt_state_specs(opt_state, t_params, t_specs, mesh, zero1)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    specs = {"step": jax.sharding.PartitionSpec(), "params": p_specs, "opt_state": o_specs,
             "rng": jax.sharding.PartitionSpec()}
    shardings = shd.to_named(mesh, specs)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings, specs


def init_state(model: Transformer, tx, shardings, seq_len: int, seed: int, trainable=None):
    trainable = trainable or trainable_lib.for_model(model.cfg)

    def init():
        rng = jax.random.PRNGKey(seed)
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(trainable_lib.split(params, trainable)[0]), "rng": jax.random.fold_in(rng, 1)}

    return jax.jit(init, out_shardings=shardings)()


@gin.configurable
def load_params_from(checkpoint_dir: str | None = None, step: int | None = None):
    """Start training from another run's parameters (continued pretraining, SFT after pretraining,
    DPO after SFT), or from an HF import (tools/convert_from_hf.py)."""
    return checkpoint_dir, step


def restore_base_params(checkpoint_dir: str, step: int | None, abstract_params, mesh):
    """Another run's base weights, laid out like `abstract_params` (adapters left out).

    A LoRA checkpoint's adapters are merged into its base first: LoRA DPO after LoRA SFT starts
    from (and is referenced against) the SFT model, with fresh adapters of its own."""
    step, fields = read_model_config(checkpoint_dir, step)
    source_cfg = ModelConfig(**fields)
    base_abstract = lora_lib.base_only(abstract_params)
    if source_cfg.lora is None:
        target = base_abstract
    else:  # the source's own tree (its adapters, its rank), on the same mesh
        src_abstract = abstract_state(Transformer(source_cfg), source_cfg, optax.identity(), mesh, 2, False, 0)[0]
        target = src_abstract["params"]
    manager = ckpt.make_manager(checkpoint_dir, ckpt.CheckpointConfig(async_save=False))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target},
        restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), {"params": target}),
        partial_restore=True)))["state"]["params"]
    manager.close()
    if source_cfg.lora is not None:
        shardings = jax.tree.map(lambda s: s.sharding, base_abstract)
        restored = jax.jit(lambda p: lora_lib.merge(source_cfg, p), out_shardings=shardings)(restored)
    log.info("initialised parameters from %s step %d%s", checkpoint_dir, step,
             " (its LoRA adapters merged into the base)" if source_cfg.lora is not None else "")
    return restored


def resolve_model_config(model_config, lora, overrides, init_dir, init_step) -> ModelConfig:
    """train.model_config, or the shape of the checkpoint the run starts from; then train.lora
    and train.model_overrides (remat, dtype, ...) on top."""
    if model_config is None:
        if init_dir is None:
            raise ConfigError("bind train.model_config = @ModelConfig() (a preset in gin_configs/models/), or "
                              "load_params_from.checkpoint_dir to take the shape of that checkpoint")
        fields = read_model_config(init_dir, init_step)[1]
        fields.pop("lora", None)  # a source's adapters are merged in; this run's come from train.lora
        model_config = ModelConfig(**fields)
    changes = dict(overrides or {})
    if lora is not None:
        changes["lora"] = lora
    return dataclasses.replace(model_config, **changes) if changes else model_config
