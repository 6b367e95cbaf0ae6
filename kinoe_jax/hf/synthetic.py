"""Random kinoe checkpoints of any size, written as a stream (for tests and the benchmark)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from kinoe_jax.hf.mapping import param_shapes
from kinoe_jax.hf.orbax_io import LazyArray, write_checkpoint


def _random(shape, seed: int, scale: float, mean: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (mean + scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def random_params(cfg, seed: int = 0, scale: float = 0.2, per_layer_chunks: bool = True) -> dict:
    """A params tree of LazyArrays; norm scales near 1, everything else N(0, scale^2).

    per_layer_chunks=False stores each stacked leaf as one chunk, as a single-device training
    save does: the harder case for a reader that wants one layer at a time.
    """
    tree: dict = {}
    for path, shape in param_shapes(cfg).items():
        name = "/".join(path)
        leaf_seed = zlib.crc32(name.encode()) + seed * 7919
        is_norm = path[-1] == "scale"
        stacked = path[0] == "layers" and cfg.scan_layers
        depth = 1 if stacked and per_layer_chunks else 0

        def pieces(shape=shape, leaf_seed=leaf_seed, is_norm=is_norm, depth=depth):
            for index in np.ndindex(*shape[:depth]):
                s = leaf_seed + 104729 * (index[0] if index else 0)
                yield index, (lambda s=s: _random(shape[depth:], s, 0.1 if is_norm else scale, 1.0 if is_norm else 0.0))

        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = LazyArray(shape, np.dtype(np.float32), depth, pieces)
    return tree


def write_random_checkpoint(checkpoints_dir: str, cfg, step: int = 0, seed: int = 0, scale: float = 0.2,
                            per_layer_chunks: bool = True) -> None:
    """DIR/checkpoints/<step> holding random params (no optimizer state: exporters never read it)."""
    write_checkpoint(checkpoints_dir, step, {"params": random_params(cfg, seed, scale, per_layer_chunks)},
                     dataclasses.asdict(cfg))
