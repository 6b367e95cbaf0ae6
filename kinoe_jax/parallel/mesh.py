"""The device mesh: axes data / fsdp / tensor / expert over the devices of every process."""

from __future__ import annotations

import math

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from kinoe_jax.parallel.rules import MESH_AXES


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None) -> Mesh:
    """Sizes per axis; one of them may be -1 to take the remaining devices."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices not divisible by the fixed axes {sizes}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"make_mesh: axes {sizes} need {math.prod(sizes.values())} devices, "
                         f"there are {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        # Topology-aware order on real TPU/GPU slices (ICI neighbours on the inner axes).
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU and odd topologies: plain order is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)
