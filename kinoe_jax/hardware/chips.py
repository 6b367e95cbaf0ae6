"""The chips kinoe_jax is built for: their figures, and compile-only devices of a whole slice.

`CHIPS` is the one table of per-chip facts (dense bf16 peak, memory as sold, memory bandwidth)
that MFU, the fit check and the roofline read. `target(name)` turns a friendly slice name into
the devices its own compiler sees, without the hardware:

  v5p-N, v4-N   N TensorCores (2 per chip, one JAX device per chip in megacore mode): v5p-8 is
                4 chips (2x2x1), v5p-16 8 chips (2x2x2), ... as Google Cloud names them
  v5e-N, v6e-N  N chips (one core each): v5e-8 is 2x4
  h100-N, h200-N  N GPUs, 8 per host (h100-64 is 8 hosts)
  KxNAME        K slices of NAME joined by the data-centre network (2xv5p-128, 4xv5e-256)

TPU slices come from libtpu (pip install 'jax[tpu]'), GPUs from the CUDA plugin's deviceless
compiler (jax-cuda12-plugin, jax-cuda12-pjrt) given the card's GpuTargetConfigProto.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_tflops: float  # dense bf16, per JAX device
    memory_gb: float  # per device, decimal GB as sold
    hbm_gbps: float  # memory bandwidth, GB/s
    device_kinds: tuple  # jax Device.device_kind values that mean this chip
    # Dense low-precision matmul peaks per JAX device, for the ModelConfig.matmul_dtype modes kinoe
    # trains with on this chip; 0: the mode is not offered here (see low_precision_peak).
    fp8_tflops: float = 0.0
    int8_tflops: float = 0.0

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    # The two networks (NETWORKS below): inside a slice or host, and between them.
    @property
    def inner_net(self) -> str:
        return NETWORKS[self.name][0]

    @property
    def inner_gbps(self) -> float:
        return NETWORKS[self.name][1]

    @property
    def outer_net(self) -> str:
        return NETWORKS[self.name][2]

    @property
    def outer_gbps(self) -> float:
        return NETWORKS[self.name][3]


# Low-precision peaks, dense (no sparsity), from the vendors' pages: Cloud TPU's "System
# architecture" pages for v5e (394 int8 TOPS), v5p (918) and v6e (1836); NVIDIA's H100 and H200
# SXM datasheets (3958 fp8 TFLOPS with 2:4 sparsity, so 1979 dense). v4 runs int8 at its bf16
# rate and the A100 has no fp8, so neither is offered a mode.
CHIPS = {c.name: c for c in (
    Chip("v5p", 459.0, 95.0, 2765.0, ("TPU v5",), int8_tflops=918.0),
    Chip("v5e", 197.0, 16.0, 819.0, ("TPU v5 lite", "TPU v5e"), int8_tflops=394.0),
    Chip("v6e", 918.0, 32.0, 1640.0, ("TPU v6 lite", "TPU v6e"), int8_tflops=1836.0),
    Chip("v4", 275.0, 32.0, 1228.0, ("TPU v4",)),
    Chip("h100", 989.0, 80.0, 3352.0, ("NVIDIA H100",), fp8_tflops=1979.0),
    Chip("h200", 989.0, 141.0, 4800.0, ("NVIDIA H200",), fp8_tflops=1979.0),
    Chip("a100", 312.0, 80.0, 2039.0, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB")),
    Chip("a100-40gb", 312.0, 40.0, 1555.0, ("NVIDIA A100",)),
)}


# Each chip's networks as (name, GB/s per device in one direction: what a ring collective can move
# in and out of each device at once) inside a slice or host, then between them.
# ICI: Google Cloud's TPU pages give the bidirectional ICI bandwidth per chip (v5p 1200 GB/s,
# v5e 400, v6e 800; v4 2400 Gbps = 300 GB/s); half of it is one direction. DCN: v5p's page gives
# 50 Gbps per chip; v5e's gives 2 x 100 Gbps NICs per 8-chip host (25 Gbps per chip); v6e's and
# v4's pages give no per-chip figure, so they are taken as v5p's 50 Gbps (an assumption, stated in
# docs/chips.md). NVLink 4 on H100/H200 SXM: 900 GB/s bidirectional per GPU (NVIDIA's datasheet);
# A100 SXM NVLink 3: 600. InfiniBand: one NIC per GPU, 400 Gb/s ConnectX-7 on H100/H200 nodes
# (DGX H100/H200), 200 Gb/s HDR on A100 nodes (DGX A100).
NETWORKS = {
    "v5p": ("ICI", 600.0, "DCN", 50 / 8), "v5e": ("ICI", 200.0, "DCN", 25 / 8),
    "v6e": ("ICI", 400.0, "DCN", 50 / 8), "v4": ("ICI", 150.0, "DCN", 50 / 8),
    "h100": ("NVLink", 450.0, "InfiniBand", 400 / 8), "h200": ("NVLink", 450.0, "InfiniBand", 400 / 8),
    "a100": ("NVLink", 300.0, "InfiniBand", 200 / 8), "a100-40gb": ("NVLink", 300.0, "InfiniBand", 200 / 8),
}


def low_precision_peak(chip: Chip, mode: str) -> float:
    """FLOP/s of `mode` ("fp8" | "int8") matmuls on `chip`; 0.0 where the chip is not offered it."""
    return {"fp8": chip.fp8_tflops, "int8": chip.int8_tflops}.get(mode, 0.0) * 1e12


def low_precision_modes(chip: Chip) -> tuple:
    return tuple(m for m in ("fp8", "int8") if low_precision_peak(chip, m) > 0)


def chip_for_device_kind(kind: str) -> Chip | None:
    """The chip a jax device_kind names (the longest matching prefix wins: 'TPU v5 lite' is v5e)."""
    best, length = None, -1
    for chip in CHIPS.values():
        for prefix in chip.device_kinds:
            if kind.startswith(prefix) and len(prefix) > length:
                best, length = chip, len(prefix)
    return best


# ----------------------------------------------------------------------------- targets
# Slice shapes in order of size (chips), as Google Cloud lays them out.
_TPU_3D = ((2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8),
           (8, 8, 16), (8, 16, 16), (16, 16, 16))
_TPU_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
_TPU_FAMILIES = {  # name: (TensorCores per JAX device, libtpu chip config, shapes)
    "v5p": (2, "megacore", _TPU_3D), "v4": (2, "megacore", _TPU_3D),
    "v5e": (1, "default", _TPU_2D), "v6e": (1, "default", _TPU_2D),
}
_GPU_FAMILIES = ("h100", "h200")  # the cards with a compiler description below
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    platform: str  # "tpu" | "gpu"
    num_devices: int  # -1: whatever the topology holds (a raw libtpu name)
    topology: str  # libtpu topology name, or the CUDA plugin's "slices x hosts x devices"
    chip_config: str = "default"
    host_bounds: tuple = (2, 2, 1)
    num_slices: int = 1

    @property
    def granules(self) -> int:
        """Groups of devices on the fast network: TPU slices, or GPU hosts."""
        if self.platform == "tpu":
            return self.num_slices
        return int(self.topology.split("x")[1])

    def describe(self) -> str:
        where = (f"libtpu topology {self.topology} ({self.chip_config})" if self.platform == "tpu"
                 else f"CUDA topology {self.topology}")
        joined = {"tpu": f", {self.num_slices} slices over {self.chip.outer_net}",
                  "gpu": f", {self.granules} hosts over {self.chip.outer_net}"}[self.platform]
        return f"{self.name}: {self.num_devices} x {self.chip.name}, {where}" + (joined if self.granules > 1 else "")

    def devices(self) -> list:
        """Compile-only devices of the slice (their compiler runs here; nothing executes)."""
        from jax.experimental import topologies

        from kinoe_jax.hardware import runtime

        if self.platform == "tpu" and "tpu" not in runtime.attached_accelerators():
            for key, value in runtime.TPU_COMPILE_ONLY_ENV.items():  # read when libtpu starts
                os.environ.setdefault(key, value)
        try:
            if self.platform == "tpu":
                topo = topologies.get_topology_desc(
                    platform="tpu", topology_name=self.topology, chip_config_name=self.chip_config,
                    chips_per_host_bounds=self.host_bounds, num_slices=self.num_slices)
            else:
                topo = topologies.get_topology_desc(self.topology, platform="cuda", topology=self.topology,
                                                    target_config=gpu_target_config(self.chip.name))
        except Exception as e:  # noqa: BLE001 - a missing compiler or a name it does not know
            need = ("libtpu (pip install 'jax[tpu]')" if self.platform == "tpu"
                    else "the CUDA compiler (pip install jax-cuda12-plugin jax-cuda12-pjrt nvidia-cudnn-cu12)")
            raise TargetError(f"target {self.name}: cannot describe {self.topology} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it needs {need}")
        devices = list(topo.devices)
        if self.num_devices > 0 and len(devices) != self.num_devices:
            raise TargetError(f"target {self.name}: expected {self.num_devices} devices, "
                              f"the compiler described {len(devices)}")
        return devices


class TargetError(ValueError):
    pass


def known_targets() -> str:
    return ("v5p-8, v5p-16, ... v5p-8192; v4-8 ...; v5e-1, v5e-4, v5e-8 ... v5e-256; v6e-1 ... v6e-256; "
            "h100-1 ... h100-8, h100-16, h100-64 (8 hosts), ...; h200-1 ... h200-8 ...; "
            "several TPU slices: 2xv5p-128, 4xv5e-256")


def target(name: str) -> Target:
    """Parse a friendly slice name ('v5p-16', 'v5e-8', 'h100-8', '2xv5p-128')."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
    if not m or (m.group(2) not in _TPU_FAMILIES and m.group(2) not in _GPU_FAMILIES):
        raise TargetError(f"unknown target {name!r}; known: {known_targets()}")
    slices, family, n = int(m.group(1) or 1), m.group(2), int(m.group(3))
    if slices < 1:
        raise TargetError(f"target {name!r}: the number of slices must be at least 1")
    if slices > 1:
        if family in _GPU_FAMILIES:
            raise TargetError(f"target {name!r}: GPU hosts are counted in the GPU number ({family}-{slices * n})")
        one = target(f"{family}-{n}")
        return dataclasses.replace(one, name=name, num_devices=one.num_devices * slices, num_slices=slices)

    chip = CHIPS[family]
    if family in _GPU_FAMILIES:
        if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
            raise TargetError(f"target {name!r}: {n} GPUs is not 1-8 GPUs or whole {GPUS_PER_HOST}-GPU hosts")
        hosts, per_host = (1, n) if n <= GPUS_PER_HOST else (n // GPUS_PER_HOST, GPUS_PER_HOST)
        return Target(name, chip, "gpu", n, f"1x{hosts}x{per_host}")
    cores, chip_config, shapes = _TPU_FAMILIES[family]
    sizes = {_prod(s) * cores: s for s in shapes}
    if n not in sizes:
        raise TargetError(f"target {name!r}: {family} slices come in {sorted(sizes)} "
                          f"{'TensorCores' if cores > 1 else 'chips'}")
    shape = sizes[n]
    bounds = (2, 2, 1) if _prod(shape) >= 4 else (1, 1, 1)
    topo = f"{family}:" + "x".join(str(d) for d in shape)
    return Target(name, chip, "tpu", _prod(shape), topo, chip_config, bounds)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


# ----------------------------------------------------------------------------- GPU targets
# The figures the CUDA compiler plans for (a stream_executor GpuTargetConfigProto). Both cards
# are GH100: 132 SMs, 228 KiB shared memory each, compute capability 9.0.
_GPU_INFO = {
    "h100": {"name": "NVIDIA H100 80GB HBM3", "memory": 84942979072, "bandwidth": 3352320000000},
    "h200": {"name": "NVIDIA H200", "memory": 150754820096, "bandwidth": 4800000000000},
}


def gpu_target_config(chip: str) -> str:
    if chip not in _GPU_INFO:
        raise TargetError(f"no GPU compiler description for {chip!r} (have: {sorted(_GPU_INFO)})")
    info = _GPU_INFO[chip]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {info["bandwidth"]}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.755
  device_memory_size: {info["memory"]}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{info["name"]}"
"""
