"""What the networks cost a step: the collective bytes of each tier, what an ideal layout would
move there, and a step time that adds the communication compute cannot hide.

The model (docs/chips.md, "Step time beyond one slice"):
- a collective moves its bytes at its tier's bandwidth per device: inside a granule (ICI,
  NVLink) or, when its group spans granules, at the slow network's (DCN, InfiniBand), since a
  ring is as fast as its slowest link;
- collectives inside a loop (the layer scan) overlap with that loop's compute: only what exceeds
  it is exposed; collectives outside every loop (a last gradient reduction, the optimizer's
  gathers) are exposed in full;
- the tiers do not share links, but the estimate adds their times (collectives of one layer
  wait on each other), which errs towards the slower step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kinoe_jax.parallel.mesh import granules_of


@dataclasses.dataclass
class NetworkEstimate:
    collectives_by_tier: dict  # network name -> bytes per device per step
    loop_bytes_by_tier: dict  # the part of each moved inside loops
    comm_s_by_tier: dict
    compute_s: float  # the roofline: every operation and kernel, collectives hidden
    exposed_comm_s: float
    estimated_step_s: float


def tier_names(chip) -> dict:
    return {"inner": chip.inner_net, "outer": chip.outer_net}


def bandwidths(chip) -> dict:
    """Bytes per second per device of each tier."""
    return {"inner": chip.inner_gbps * 1e9, "outer": chip.outer_gbps * 1e9}


def estimate(stats, kernel_rows: list, chip, compute_s: float) -> NetworkEstimate:
    """`stats`: hlo_stats.analyze's result; `kernel_rows`: priced kernels with their seconds."""
    names, bw = tier_names(chip), bandwidths(chip)
    kernel_loop_s = sum(r["seconds"] * stats.custom_calls_in_loops.get(r["name"], 0.0) / r["calls"]
                        for r in kernel_rows if r["calls"] and r["seconds"])
    loop_compute = stats.loop_roofline_s + kernel_loop_s
    comm = {t: b / bw[t] if bw[t] else float("inf") for t, b in stats.tier_bytes.items()}
    loop_comm = sum(b / bw[t] for t, b in stats.tier_loop_bytes.items() if bw[t])
    outside = sum(comm.values()) - loop_comm
    exposed = max(0.0, loop_comm - loop_compute) + max(0.0, outside)
    return NetworkEstimate(
        collectives_by_tier={names[t]: b for t, b in sorted(stats.tier_bytes.items())},
        loop_bytes_by_tier={names[t]: b for t, b in sorted(stats.tier_loop_bytes.items())},
        comm_s_by_tier={names[t]: s for t, s in sorted(comm.items())},
        compute_s=compute_s, exposed_comm_s=exposed, estimated_step_s=compute_s + exposed)


def ideal_bytes_by_tier(model_cfg, mesh, axis_tiers: dict, chip, params_bytes_per_device: float) -> dict:
    """Per device and step, what parameter and gradient traffic needs at the least, on the tier
    of the axis that carries it (activation traffic of tensor or expert axes is left out):
    - fsdp: gather the parameters for the forward and again for the backward, reduce-scatter the
      gradients, in the compute dtype (ring: (n - 1)/n of the full size each);
    - data: one all-reduce of each device's share of the gradients, in the compute dtype (the
      gradients of the cast weights are reduced before the fp32 update; ring: twice (n - 1)/n)."""
    names = tier_names(chip)
    out = {names["inner"]: 0.0, names["outer"]: 0.0}
    item = np.dtype(model_cfg.compute_dtype).itemsize
    n = mesh.shape.get("fsdp", 1)
    if n > 1:
        out[names[axis_tiers["fsdp"]]] += 3.0 * model_cfg.num_params() * item * (n - 1) / n
    d = mesh.shape.get("data", 1)
    if d > 1:  # parameters are held in fp32 (ModelConfig): 4 bytes each
        out[names[axis_tiers["data"]]] += 2.0 * params_bytes_per_device / 4 * item * (d - 1) / d
    return out


def granule_of(mesh, devices_per_granule: int | None = None) -> list:
    """The granule of each partition (the mesh's devices in order, as the compiled program numbers them)."""
    where = {d.id: i for i, g in enumerate(granules_of(list(mesh.devices.flat), devices_per_granule)) for d in g}
    return [where[d.id] for d in mesh.devices.flat]
