"""The device mesh: axes data / fsdp / tensor / expert over the devices of every process.

A job larger than one slice or node has two networks: the fast one inside a granule (ICI inside
a TPU slice, NVLink inside a GPU host) and the slow one between granules (the data-centre
network between slices, InfiniBand between hosts). Each axis therefore has a size (the whole
mesh) and an outer size (how many granules it spans); the rest of it, the inner size, stays
inside a granule. Outer axes are the major index of their mesh axis, so a collective over an
axis with outer size 1 never leaves a granule. HSDP is fsdp inside, data outside
(gin_configs/mesh/hsdp.gin).
"""

from __future__ import annotations

import logging
import math

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from kinoe_jax.parallel.rules import MESH_AXES

log = logging.getLogger(__name__)


@gin.configurable
def make_mesh(data: int | str = -1, fsdp: int | str = 1, tensor: int | str = 1, expert: int | str = 1, devices=None,
              outer_data: int | None = None, outer_fsdp: int = 1, outer_tensor: int = 1, outer_expert: int = 1,
              devices_per_granule: int | None = None) -> Mesh:
    """Sizes per axis; one of them may be -1 to take the remaining devices, and one may be
    "inner" to take the devices of one granule that the other axes leave (HSDP: fsdp "inner").

    `outer_*`: granules (slices or hosts) each axis spans; their product is the number of
    granules. `outer_data=None` gives data whatever granules the other outer sizes leave.
    `devices_per_granule` groups devices into granules by count (one process per GPU: 8 per
    host); by default a granule is a TPU slice, or a process elsewhere."""
    devices = list(jax.devices()) if devices is None else list(devices)
    granules = granules_of(devices, devices_per_granule)
    outer = {"data": outer_data, "fsdp": outer_fsdp, "tensor": outer_tensor, "expert": outer_expert}
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    sizes = _fill(_granule_axis(sizes, outer, len(devices) // len(granules)), len(devices))
    outer = _outer_sizes(sizes, outer, len(granules), _granule_word(devices))
    inner = {a: sizes[a] // outer[a] for a in MESH_AXES}
    per_granule = len(devices) // len(granules)
    if math.prod(inner.values()) != per_granule:
        raise ValueError(f"make_mesh: inner sizes {inner} need {math.prod(inner.values())} devices per "
                         f"{_granule_word(devices)}, each has {per_granule}")
    inner_shape = tuple(inner[a] for a in MESH_AXES)
    outer_shape = tuple(outer[a] for a in MESH_AXES)
    blocks = np.empty((len(granules),) + inner_shape, dtype=object)
    for g, members in enumerate(granules):
        blocks[g] = _granule_mesh(inner_shape, members)
    # (outer..., inner...) -> (outer_0, inner_0, outer_1, inner_1, ...): outer is the major index.
    arr = blocks.reshape(outer_shape + inner_shape)
    n = len(MESH_AXES)
    arr = arr.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    arr = arr.reshape(tuple(sizes[a] for a in MESH_AXES))
    if len(granules) > 1:  # where each device landed: the first thing to read when a layout is slow
        where = {d.id: g for g, members in enumerate(granules) for d in members}
        log.info("mesh over %d %ss: outer %s, inner %s; %s of each device in mesh order: %s", len(granules),
                 _granule_word(devices), outer, inner, _granule_word(devices), [where[d.id] for d in arr.flat])
    return Mesh(arr, MESH_AXES)


def _fill(sizes: dict, num_devices: int) -> dict:
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"make_mesh: only one axis may be -1, got {fill}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"make_mesh: {num_devices} devices not divisible by the fixed axes {sizes}")
        sizes = {**sizes, fill[0]: num_devices // known}
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"make_mesh: axes {sizes} need {math.prod(sizes.values())} devices, there are {num_devices}")
    return sizes


def _granule_axis(sizes: dict, outer: dict, per_granule: int) -> dict:
    named = [a for a, v in sizes.items() if v == "inner"]
    bad = [f"{a}={v!r}" for a, v in sizes.items() if not (isinstance(v, int) or v == "inner")]
    if bad or len(named) > 1:
        raise ValueError(f"make_mesh: sizes are integers, -1, or \"inner\" for one axis; got {sizes}")
    if not named:
        return sizes
    others = math.prod(v // (outer[a] or 1) for a, v in sizes.items() if a != named[0] and v not in (-1, "inner"))
    if per_granule % others:
        raise ValueError(f"make_mesh: the other axes {sizes} do not divide the {per_granule} devices of a granule")
    return {**sizes, named[0]: per_granule // others * (outer[named[0]] or 1)}


def _outer_sizes(sizes: dict, outer: dict, num_granules: int, word: str) -> dict:
    fixed = math.prod(v for v in outer.values() if v is not None)
    if outer["data"] is None:
        if num_granules % fixed:
            raise ValueError(f"make_mesh: outer sizes {outer} do not divide the {num_granules} {word}s")
        left = num_granules // fixed
        # The granules go on data when it can take them; otherwise (FSDP over everything) on fsdp.
        if sizes["data"] % left == 0 or outer["fsdp"] != 1 or sizes["fsdp"] % left:
            outer = {**outer, "data": left}
        else:
            outer = {**outer, "data": 1, "fsdp": left}
    if math.prod(outer.values()) != num_granules:
        raise ValueError(f"make_mesh: outer sizes {outer} span {math.prod(outer.values())} {word}s, "
                         f"the devices form {num_granules}")
    for axis in MESH_AXES:
        if outer[axis] < 1 or sizes[axis] % outer[axis]:
            raise ValueError(f"make_mesh: axis {axis} of size {sizes[axis]} cannot span {outer[axis]} {word}s "
                             f"(sizes {sizes}, outer sizes {outer})")
    return outer


def granules_of(devices, devices_per_granule: int | None = None) -> list:
    """The devices grouped by the fast network they share, in a stable order: TPU slices, or
    processes (hosts) elsewhere, or runs of `devices_per_granule` in process order."""
    def key(d):
        return (getattr(d, "slice_index", 0) or 0) if d.platform == "tpu" else d.process_index

    ordered = sorted(devices, key=lambda d: (key(d), d.process_index, d.id))
    if devices_per_granule:
        if len(devices) % devices_per_granule:
            raise ValueError(f"make_mesh: {len(devices)} devices do not form granules of {devices_per_granule}")
        return [ordered[i:i + devices_per_granule] for i in range(0, len(ordered), devices_per_granule)]
    groups: dict = {}
    for d in ordered:
        groups.setdefault(key(d), []).append(d)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) > 1:
        raise ValueError(f"make_mesh: {_granule_word(devices)}s hold unequal device counts {sorted(sizes)}")
    return list(groups.values())


def _granule_word(devices) -> str:
    return "slice" if devices and devices[0].platform == "tpu" else "host"


def _granule_mesh(shape: tuple, devices: list) -> np.ndarray:
    try:
        # Topology-aware order on real TPU/GPU slices (ICI neighbours on the inner axes).
        from jax.experimental import mesh_utils

        return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU and odd topologies: plain order is fine
        return np.asarray(devices, dtype=object).reshape(shape)


def tier_of_axes(mesh: Mesh, devices_per_granule: int | None = None) -> dict:
    """Mesh axis -> "inner" when every collective over it stays inside a granule, else "outer"."""
    granule = {d.id: i for i, g in enumerate(granules_of(list(mesh.devices.flat), devices_per_granule)) for d in g}
    ids = np.vectorize(lambda d: granule[d.id])(mesh.devices)
    out = {}
    for i, axis in enumerate(mesh.axis_names):
        spread = np.ptp(ids, axis=i) if ids.shape[i] > 1 else np.zeros(1)
        out[axis] = "outer" if np.any(spread) else "inner"
    return out
