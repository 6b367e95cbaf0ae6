"""Fresh LoRA adapters for a model: their shapes come from the model itself, so this module sits
above the decoder (kinoe_jax/models/lora.py, which the layers use, does not import it)."""

from __future__ import annotations

import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from kinoe_jax.models import lora
from kinoe_jax.models.decoder import Transformer


def adapter_shapes(cfg) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """{path: (shape, logical axes)} of every adapter leaf of `cfg`'s model (nothing allocated)."""
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    flat = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {tuple(lora.key_name(k) for k in path): (tuple(leaf.value.shape), tuple(leaf.names))
            for path, leaf in flat if lora.is_adapter(path)}


def init_adapters(cfg, base_params, rng) -> dict:
    """`base_params` (no adapters: a kinoe checkpoint or an HF import) plus fresh adapters for
    `cfg.lora`: A random, B zero, so the model's output is the base's. Traceable under jit."""
    if cfg.lora is None:
        raise ValueError("init_adapters: ModelConfig.lora is None")
    adapters: dict = {}
    for path, (shape, names) in adapter_shapes(cfg).items():
        if path[-1] == "lora_b":
            value = jnp.zeros(shape, jnp.float32)
        else:
            n_in = math.prod(n for n, axis in zip(shape, names) if axis not in ("layers", lora.RANK_AXIS))
            key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
            value = lora.a_init(n_in)(key, shape, jnp.float32)
        node = adapters
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return lora.combine(lora.base_only(base_params), adapters)
